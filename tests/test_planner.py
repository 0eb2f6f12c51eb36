"""The planner on CPU reports of models whose activations make the peak:
plans fit their budgets, cost more time as budgets shrink, rebuild every
dropped value from values that are there, and read only the report."""

import json

import numpy as np
import pytest
import torch
from torch import nn

import mutwo_backend
from mutwo_backend import BudgetError, Plan, Report, plan_memory
from planner import PlanningError
from planner.budget import budget_bytes
from planner.problem import planning_problem
from planner_models import DeepMLP, SmallCNN, TiedLM, classify_step, token_batch  # (tests/)
from report_versions import schema_1_report  # (tests/)


CASES = {
    "mlp": (lambda: DeepMLP(), lambda: (torch.randn(2048, 256), torch.randint(0, 10, (2048,)))),
    "mlp-dropout": (lambda: DeepMLP(dropout=0.1), lambda: (torch.randn(2048, 256), torch.randint(0, 10, (2048,)))),
    "cnn-batchnorm": (lambda: SmallCNN(), lambda: (torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,)))),
    "tied": (lambda: TiedLM(), token_batch),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    build, batch = CASES[request.param]
    torch.manual_seed(0)
    model = build()
    optimizer = torch.optim.Adam(model.parameters(), fused=True)
    report = mutwo_backend.profile_train_step(classify_step, model, optimizer, *batch(), iters=1)
    return request.param, report


def activation_bytes_at_peak(data: dict) -> int:
    return data["memory"]["breakdown_at_peak"]["ACT"]


def budgets(data: dict) -> list[int]:
    """Budgets that remove 20%, 40% and 60% of the activation bytes at the peak."""
    return [int(data["memory"]["peak_bytes"] - share * activation_bytes_at_peak(data)) for share in (0.2, 0.4, 0.6)]


def test_plans_fit_their_budgets_and_cost_more_as_budgets_shrink(case):
    name, report = case
    data = report.to_dict()
    assert activation_bytes_at_peak(data) > 0.3 * data["memory"]["peak_bytes"], "activations must make the peak"
    times = []
    for budget in budgets(data):
        plan = plan_memory(report, budget, allow_swap=True)
        assert plan.predicted_peak_bytes <= plan.budget_bytes == budget, name
        times.append(plan.predicted_iteration_ms)
        assert plan.count("recompute") + plan.count("swap") > 0
    assert times == sorted(times), (name, times)  # never faster with less memory


def test_recompute_only_plans_fit_or_say_why(case):
    name, report = case
    for budget in budgets(report.to_dict()):
        try:
            plan = plan_memory(report, budget, allow_swap=False)
        except BudgetError as error:  # dropout's draws are not replayed (batch norm and in-place ops are)
            assert "lowest peak the planner reaches" in str(error) and "Raise the budget" in str(error)
            assert name == "mlp-dropout" and "random op" in str(error)
            continue
        assert plan.predicted_peak_bytes <= budget and plan.count("swap") == 0


def test_a_budget_at_or_above_the_baseline_keeps_everything(case):
    _, report = case
    for budget in (1.0, report.to_dict()["memory"]["peak_bytes"] * 2):
        plan = plan_memory(report, budget, allow_swap=True)
        assert plan.count("keep") == len(plan.decisions) == len(report.to_dict()["activations"])
        assert plan.predicted_iteration_ms == plan.baseline_iteration_ms
        # freed at their last use, not where eager drops them: never above the profile
        assert plan.predicted_peak_bytes <= plan.baseline_peak_bytes


def test_every_decision_names_an_activation_and_every_replay_reads_values_that_are_there(case):
    """A replayed node reads, by the report's inputs, a node replayed before
    it in the same list, or a value that is on the device then: kept, a
    parameter, input or state, or swapped back in before the recompute."""
    _, report = case
    data = report.to_dict()
    nodes = {n["name"]: n for n in data["nodes"]}
    activations = {a["name"] for a in data["activations"]}
    plan = plan_memory(report, budgets(data)[-1], allow_swap=True)
    assert {d.activation for d in plan.decisions} == activations
    action = {d.activation: d for d in plan.decisions}
    rank = {name: n["rank"] for name, n in nodes.items()}
    for decision in plan.decisions:
        if decision.action == "swap":
            assert rank[decision.swap_out_after] < rank[decision.prefetch_at]
        if decision.action != "recompute":
            continue
        rebuilt = set()
        assert decision.activation in decision.recompute_nodes
        for name in decision.recompute_nodes:
            assert nodes[name]["region"] in ("forward", "loss")
            for source in nodes[name]["inputs"]:
                dropped = source in action and action[source].action != "keep"
                assert source in rebuilt or not dropped or (
                    action[source].action == "swap" and rank[action[source].prefetch_at] <= rank[name]), \
                    (decision.activation, name, source)
            rebuilt.add(name)


def test_a_saved_report_plans_the_same_and_a_plan_round_trips(case, tmp_path):
    _, report = case
    budget = budgets(report.to_dict())[1]
    report.save(str(tmp_path), plots=False, trace=False)
    plan = plan_memory(report, budget, allow_swap=True)
    assert plan_memory(Report.load(str(tmp_path)), budget, allow_swap=True) == plan
    path = plan.save(str(tmp_path / "plan.json"))
    assert Plan.load(path) == plan
    with open(path) as f:
        data = json.load(f)
    assert data["schema"] == "mutwo.plan/1" and data["graph_fingerprint"] == plan.graph_fingerprint
    assert {"budget_bytes", "baseline_peak_bytes", "predicted_peak_bytes", "baseline_iteration_ms",
            "predicted_iteration_ms", "decisions"} <= set(data)
    assert {"activation", "memory_bytes", "action", "recompute_nodes", "swap_out_after", "prefetch_at",
            "recompute_ms", "exposed_ms", "swap_free_at"} == set(data["decisions"][0])


def test_predicted_time_adds_recompute_and_exposed_swap_to_the_baseline(case):
    _, report = case
    plan = plan_memory(report, budgets(report.to_dict())[-1], allow_swap=True)
    added = sum(d.recompute_ms + d.exposed_ms for d in plan.decisions)
    assert plan.predicted_iteration_ms == pytest.approx(plan.baseline_iteration_ms + added)
    data = report.to_dict()
    assert plan.baseline_iteration_ms == pytest.approx(data["meta"]["node_time_sum_ms"])
    for decision in plan.decisions:  # a replay costs its nodes' median times
        if decision.action == "recompute" and decision.recompute_ms:
            times = {n["name"]: n["run_time_ms"] for n in data["nodes"]}
            assert decision.recompute_ms == pytest.approx(sum(times[n] for n in decision.recompute_nodes))


def test_the_plan_prints_what_it_decided(case, capsys):
    _, report = case
    plan = plan_memory(report, budgets(report.to_dict())[-1], allow_swap=True)
    plan.print(top=3)
    out = capsys.readouterr().out
    assert "predicted" in out and "dropped activations" in out and "recompute" in out


def test_budget_spellings():
    assert budget_bytes(0.5, 1000) == 500
    assert budget_bytes(6 * 2 ** 30, 1) == 6 * 2 ** 30
    assert budget_bytes("6GiB", 1) == 6 * 2 ** 30 and budget_bytes("6GB", 1) == 6 * 10 ** 9
    assert budget_bytes("1.5 MiB", 1) == 3 * 2 ** 19
    for bad in (0.0, 1.5, -3, "six gigs", "6 parsecs", True, None):
        with pytest.raises(PlanningError, match="memory_budget"):
            budget_bytes(bad, 1000)


def test_an_impossible_budget_names_the_floor(case):
    _, report = case
    with pytest.raises(BudgetError, match="lowest peak the planner reaches is .* while .* runs, where .* live"):
        plan_memory(report, 0.01, allow_swap=True)


def test_bad_reports_and_solvers_are_named(case, tmp_path):
    _, report = case
    with pytest.raises(PlanningError, match="unknown solver 'annealing'"):
        plan_memory(report, 0.5, solver="annealing")
    with pytest.raises(PlanningError, match="schema 'mutwo.report/1'.*profile the step again"):
        plan_memory(schema_1_report(), 0.5)


def test_swaps_are_planned_for_gpu_reports_only_by_default(case):
    _, report = case
    data = report.to_dict()
    assert data["memory"]["measured_peak_bytes"] is None  # a CPU report
    try:
        assert plan_memory(report, budgets(data)[-1]).count("swap") == 0
    except BudgetError as error:  # (dropout) the way out it names is swapping
        assert str(error).endswith("or allow swaps.")


def test_the_problem_counts_each_storage_once_and_frees_at_last_use(case):
    """Candidates are activation storages: their bytes are the report's
    activation bytes; the keep-everything simulation is the report's own
    but for eager's longer references."""
    _, report = case
    data = report.to_dict()
    problem = planning_problem(data)
    assert sum(c.memory_bytes for c in problem.candidates) == sum(
        a["memory_bytes"] for a in data["activations"] if not data["storages"][a["storage"]]["resident"])
    from planner.simulate import MemoryTimeline
    during = MemoryTimeline(problem).during
    assert (during <= np.array([n["simulated_during_bytes"] for n in data["nodes"]])).all()
    assert during.max() <= data["memory"]["peak_bytes"]


def test_a_compile_report_is_planned_too():
    """torch.compile(backend="mutwo_profile"): the forward and backward
    graphs AOTAutograd made, planned against the compiled region's peak."""
    torch.manual_seed(0)
    model = DeepMLP()
    optimizer = torch.optim.Adam(model.parameters(), fused=True)
    compiled = torch.compile(model, backend="mutwo_profile", options={"warmup": 1, "iters": 1,
                                                                      "optimizer": optimizer})
    x, y = torch.randn(2048, 256), torch.randint(0, 10, (2048,))
    for _ in range(2):
        nn.functional.cross_entropy(compiled(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    report = mutwo_backend.get_report(compiled)
    graph = report.to_dict()["graphs"][0]
    budget = int(graph["memory"]["peak_bytes"] - 0.4 * graph["memory"]["breakdown_at_peak"]["ACT"])
    plan = plan_memory(report, budget, allow_swap=False)
    assert plan.predicted_peak_bytes <= budget and plan.count("recompute") > 0
    assert plan.baseline_peak_bytes == graph["memory"]["peak_bytes"]  # the compiled region's, on the CPU
