"""plan_memory: a report and a budget in, a Plan out."""

from .budget import budget_bytes
from .errors import PlanningError
from .greedy import Schedule, greedy_schedule
from .plan import Decision, Plan
from .problem import PlanningProblem, planning_problem

SOLVERS = ("greedy", "milp")


def plan_memory(report, memory_budget, allow_swap: bool | None = None, solver: str = "greedy",
                graph: int | None = None) -> Plan:
    """Keep, recompute or swap each activation of ``report`` (a Report or
    its dict) so that the step's peak fits ``memory_budget``: a float in
    (0, 1] (a fraction of the profiled peak: measured on a GPU, simulated on
    the CPU), an int (bytes) or a string with units ("6GiB", "6GB"). The
    budget covers the whole step's peak as ``max_memory_allocated`` sees it.

    ``allow_swap`` None plans swaps for a GPU report and none for a CPU
    one. ``solver`` "greedy" is μ-TWO's; "milp" solves small graphs
    exactly. A compile report of several dynamo graphs (graph breaks) is
    planned one forward/backward pair at a time: ``graph`` is its index in
    ``report["graphs"]`` (the backend "mutwo" plans each so). Raises
    BudgetError when no plan fits, naming the lowest peak reached and what
    holds it."""
    data = report.to_dict() if hasattr(report, "to_dict") else report
    if solver not in SOLVERS:
        raise PlanningError(f"unknown solver {solver!r}: choose one of {', '.join(SOLVERS)}")
    graphs = data.get("graphs") or [data]
    if graph is None and len(graphs) > 1:
        raise PlanningError(f"this compile report holds {len(graphs)} graphs (graph breaks): plan each "
                            f"forward/backward pair, plan_memory(report, budget, graph=i) for i in "
                            f"0..{len(graphs) - 1}, or compile with backend=\"mutwo\", which does.")
    if graph is not None and not 0 <= graph < len(graphs):
        raise PlanningError(f"graph={graph}: this report holds {len(graphs)} graph(s), 0 to {len(graphs) - 1}")
    graph = {**graphs[graph or 0], "schema": data.get("schema")}
    problem = planning_problem(graph)
    budget = budget_bytes(memory_budget, problem.baseline_peak_bytes)
    swap = problem.on_gpu if allow_swap is None else bool(allow_swap)
    if solver == "milp":
        from .milp import milp_schedule
        schedule = milp_schedule(problem, budget, swap)
    else:
        schedule = greedy_schedule(problem, budget, swap)
    return build_plan(problem, graph, schedule, budget, solver)


def build_plan(problem: PlanningProblem, data: dict, schedule: Schedule, budget: int, solver: str) -> Plan:
    """The Plan of a solver's schedule: a decision per activation of the report."""
    choice_of = {name: choice for choice in schedule.choices for name in choice.candidate.activations}
    decisions = []
    for act in data["activations"]:
        choice = choice_of.get(act["name"])
        if choice is None:
            decisions.append(Decision(act["name"], act["memory_bytes"], "keep", [], None, None, 0.0, 0.0))
            continue
        holds_bytes = act["name"] == choice.candidate.activations[0]  # costs counted once per storage
        recompute = choice.action == "recompute"
        decisions.append(Decision(
            act["name"], act["memory_bytes"], choice.action,
            list(choice.candidate.recompute_nodes) if recompute else [],
            None if recompute else problem.node_names[choice.swap_out_after],
            None if recompute else problem.node_names[choice.prefetch_at],
            choice.candidate.recompute_ms if recompute and holds_bytes else 0.0,
            choice.exposed_ms if holds_bytes else 0.0,
            None if recompute else problem.node_names[choice.away.away_from]))
    extra_ms = sum(d.recompute_ms + d.exposed_ms for d in decisions)
    notes = ["predicted time: the ops' median times (on a GPU, its kernel time) plus recompute and exposed swap "
             "time, as a CUDA graph replay runs it; run as the graph's Python code the host adds its overhead"]
    if problem.offset_bytes:
        notes.append(f"predicted peak includes {problem.offset_bytes:,} B the simulation misses (the measured "
                     "peak's excess over the simulated one: kernel workspaces)")
    if not problem.on_gpu:
        notes.append("a CPU report: times are the CPU's and the peak is simulated")
    return Plan(budget_bytes=budget, baseline_peak_bytes=problem.baseline_peak_bytes,
                predicted_peak_bytes=schedule.peak_bytes, baseline_iteration_ms=problem.baseline_iteration_ms,
                predicted_iteration_ms=problem.baseline_iteration_ms + extra_ms, decisions=decisions,
                graph_fingerprint=problem.fingerprint, solver=solver, notes=notes)
