"""The profiling interpreter on the CPU: records for every node, warm-up
excluded from medians, derived metrics equal to hand computation from the
recorded numbers, training unchanged, failures named."""

import copy
import errno
import operator
import os
import time

import numpy as np
import pytest
import torch
from torch import nn

import mutwo_backend
from mutwo_backend import interpreter as interpreter_module
from mutwo_backend import profiler as profiler_module
from mutwo_backend import report as report_module
from mutwo_backend.errors import MutwoError
from mutwo_backend.interpreter import NodeExecutionError
from mutwo_backend.models import get_model, zoo_train_step
from mutwo_backend.profiler import GraphProfiler, profile_train_step
from mutwo_backend.report import ReportNotSavedError
from passes import NodeType, Region, run_pipeline
from mutwo_backend.swap import DEFAULT_CPU_MODEL, CopyCost, _fit


class ThreeLayerMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 4)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def mlp_step(model, optimizer, x, y):
    loss = nn.functional.cross_entropy(mutwo_backend.sep(model(x)), y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss


def mlp_case(seed=0):
    torch.manual_seed(seed)
    model = ThreeLayerMLP()
    return model, torch.optim.Adam(model.parameters(), fused=True), torch.randn(8, 16), torch.randint(0, 4, (8,))


@pytest.fixture(scope="module")
def mlp_report():
    model, optimizer, x, y = mlp_case()
    start = time.perf_counter()
    report = profile_train_step(mlp_step, model, optimizer, x, y, warmup=1, iters=3).to_dict()
    report["test_wall_s"] = time.perf_counter() - start
    return report


def test_phase_seconds_account_for_the_call(mlp_report):
    phases = mlp_report["meta"]["phase_seconds"]
    assert list(phases) == ["capture", "passes", "swap calibration", "warm-up", "measurement", "report"]
    assert all(s >= 0 for s in phases.values())
    assert 0.9 * mlp_report["test_wall_s"] <= sum(phases.values()) <= mlp_report["test_wall_s"]


def test_every_node_has_a_time_and_memory_record(mlp_report):
    nodes = mlp_report["nodes"]
    assert [n["rank"] for n in nodes] == list(range(len(nodes)))
    for n in nodes:
        assert n["run_time_ms"] >= 0 and n["run_time_min_ms"] <= n["run_time_ms"] <= n["run_time_max_ms"]
        assert n["peak_bytes"] >= n["active_bytes"] >= 0 and n["output_bytes"] >= 0
    assert mlp_report["meta"]["timer"] == "cpu" and mlp_report["meta"]["iters"] == 3
    assert mlp_report["memory"]["measured_peak_bytes"] is None  # no allocator on the CPU
    assert mlp_report["meta"]["swap_model"]["estimated"] is True


def test_derived_metrics_equal_hand_computation(mlp_report):
    times = [n["run_time_ms"] for n in mlp_report["nodes"]]
    rank_of = {n["name"]: n["rank"] for n in mlp_report["nodes"]}
    out_bytes = {n["name"]: n["output_bytes"] for n in mlp_report["nodes"]}
    # The ReLU outputs of fc1 and fc2 are read by their backward: activations.
    # Recomputing relu means t(weight), addmm, relu from fc1's weight, bias and x.
    acts = {a["name"]: a for a in mlp_report["activations"]}
    relu = acts["relu"]
    assert relu["memory_bytes"] == 8 * 32 * 4
    assert relu["recompute_nodes"] == ["t", "addmm", "relu"] and relu["recomputable"]
    assert relu["recompute_srcs"] == ["p_in_1", "p_in_2", "args_1"]
    assert acts["relu_1"]["recompute_nodes"] == ["addmm_1", "relu_1"]
    for a in acts.values():
        inactive = sum(times[a["last_fw_rank"] + 1:a["first_bw_rank"]])
        assert a["inactive_time_ms"] == pytest.approx(inactive, rel=1e-9, abs=1e-12)
        assert a["swap_out_ms"] == pytest.approx(DEFAULT_CPU_MODEL.swap_out_ms(a["memory_bytes"]))
        assert a["swap_in_ms"] == pytest.approx(DEFAULT_CPU_MODEL.swap_in_ms(a["memory_bytes"]))
        assert a["swap_hidden"] == (a["swap_out_ms"] + a["swap_in_ms"] <= a["inactive_time_ms"])
        recompute = sum(times[rank_of[n]] for n in a["recompute_nodes"])
        assert a["recompute_time_ms"] == pytest.approx(recompute, rel=1e-9, abs=1e-12)
        if recompute > 0:
            assert a["recompute_ratio"] == pytest.approx(a["memory_bytes"] / recompute)
        # A chain recomputed in order holds at most its own outputs at once.
        assert 0 <= a["recompute_peak_bytes"] <= sum(out_bytes[n] for n in a["recompute_nodes"])
    # addmm's output (1 KiB) is alive while relu writes its own (1 KiB); t is a view.
    assert relu["recompute_peak_bytes"] == acts["relu_1"]["recompute_peak_bytes"] == 2 * 8 * 32 * 4
    assert acts["t_1"]["recompute_peak_bytes"] == 0


def test_warmup_iterations_run_the_plain_graph_and_only_measured_ones_are_interpreted(monkeypatch):
    """Warm-up iterations pay first-run costs outside the interpreter: it runs
    exactly ``iters`` times, and the first of them sleeps 50 ms in one node,
    which the max shows and the median does not."""
    runs, slept = [], []
    run_iteration = interpreter_module.ProfilingInterpreter.run_iteration
    call_function = interpreter_module.ProfilingInterpreter.call_function

    def counting(self, *args, **kwargs):
        runs.append(1)
        return run_iteration(self, *args, **kwargs)

    def slow_first_iteration(self, target, args, kwargs):
        if target is torch.ops.aten.relu.default and not slept:
            slept.append(target)
            time.sleep(0.05)
        return call_function(self, target, args, kwargs)

    monkeypatch.setattr(interpreter_module.ProfilingInterpreter, "run_iteration", counting)
    monkeypatch.setattr(interpreter_module.ProfilingInterpreter, "call_function", slow_first_iteration)
    for warmup in (2, 0):
        runs.clear()
        slept.clear()
        model, optimizer, x, y = mlp_case()
        report = profile_train_step(mlp_step, model, optimizer, x, y, warmup=warmup, iters=3).to_dict()
        assert len(runs) == 3 and report["meta"]["iters"] == 3
        relu = next(n for n in report["nodes"] if n["name"] == "relu")
        assert relu["run_time_max_ms"] >= 50 and relu["run_time_ms"] < 40


@pytest.mark.parametrize("optimizer_kwargs, method, warmup", [
    ({"fused": True}, "recorded", 0),
    # CPU Adam without foreach/fused reads its step count with .item(): traced
    ({"foreach": False}, "traced", 1),
])
def test_by_default_a_recorded_capture_is_the_warm_up(monkeypatch, optimizer_kwargs, method, warmup):
    """The recorded capture ran the step on copies of the state: no plain
    warm-up run follows it. A traced one ran nothing: one warm-up run. The
    model trains exactly as eager does over the iterations that ran."""
    plain_runs = []
    run = mutwo_backend.TrainStepGraph.run

    def counting(self, *args, executor=None):
        if executor is None:
            plain_runs.append(1)
        return run(self, *args, executor=executor)

    monkeypatch.setattr(mutwo_backend.TrainStepGraph, "run", counting)
    model, _, x, y = mlp_case()
    eager_model = copy.deepcopy(model)
    optimizer = torch.optim.Adam(model.parameters(), **optimizer_kwargs)
    eager_optimizer = torch.optim.Adam(eager_model.parameters(), **optimizer_kwargs)
    report = profile_train_step(mlp_step, model, optimizer, x, y, iters=2).to_dict()
    assert report["meta"]["capture_method"] == method
    assert report["meta"]["warmup"] == len(plain_runs) == warmup
    for _ in range(warmup + 2):
        mlp_step(eager_model, eager_optimizer, x, y)
    for a, b in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name, batch", [("mlp", 8), ("resnet18", 2)])
def test_profiled_iterations_train_exactly_as_eager(name, batch):
    spec = get_model(name)
    torch.manual_seed(0)
    model = spec.build()
    eager_model = copy.deepcopy(model)
    optimizer = torch.optim.Adam(model.parameters(), fused=True)
    eager_optimizer = torch.optim.Adam(eager_model.parameters(), fused=True)
    inputs, targets = spec.make_batch(batch, spec.default_seq_len, torch.device("cpu"))
    torch.manual_seed(1)
    profile_train_step(zoo_train_step(spec), model, optimizer, inputs, targets, warmup=1, iters=2)
    torch.manual_seed(1)
    for _ in range(3):
        zoo_train_step(spec)(eager_model, eager_optimizer, inputs, targets)
    for a, b in [*zip(model.parameters(), eager_model.parameters()),
                 *zip(model.buffers(), eager_model.buffers())]:
        assert (a.double() - b.double()).abs().max().item() <= 1e-6
    for p, q in zip(model.parameters(), eager_model.parameters()):
        for key, value in optimizer.state[p].items():
            assert (value.double() - eager_optimizer.state[q][key].double()).abs().max().item() <= 1e-6


def test_failing_node_is_named_and_model_stays_usable():
    """A node of the backward pass raises: the error names it, the iteration
    stops before the optimizer, and the model trains on eagerly afterwards."""
    model, optimizer, x, y = mlp_case()
    step = mutwo_backend.capture_train_step(mlp_step, model, optimizer, x, y)
    analysis = run_pipeline(step.gm, step.hints)
    failing = next(n for n in analysis.nodes if analysis.regions[n] is Region.BACKWARD
                   and n.target is torch.ops.aten.mm.default)

    def injected_failure(*args, **kwargs):
        raise RuntimeError("injected failure")

    failing.target = injected_failure
    step.gm.recompile()
    profiler = GraphProfiler(step.gm, analysis, torch.device("cpu"))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(NodeExecutionError, match=f"node {failing.name} .*injected failure"):
        step.run(x, y, executor=profiler.run)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert mlp_step(model, optimizer, x, y).isfinite()


def test_node_execution_error_names_the_node():
    model, optimizer, x, y = mlp_case()
    step = mutwo_backend.capture_train_step(mlp_step, model, optimizer, x, y)
    interp = interpreter_module.ProfilingInterpreter(step.gm, torch.device("cpu"), "cpu")
    inputs = step.graph_inputs(x[:, :3], y)  # wrong width: the first matmul fails
    with pytest.raises(NodeExecutionError, match=r"node (addmm|mm|t)\w* \(rank \d+"):
        interp.run_iteration(*inputs)


def test_swap_model_grows_with_size_and_fit_recovers_known_costs():
    sizes = [64 * 1024 * 4 ** k for k in range(8)]
    truth = CopyCost(latency_ms=0.012, bytes_per_ms=50e6)
    fitted = _fit(sizes, [truth.time_ms(s) for s in sizes])
    assert type(fitted.latency_ms) is float and type(fitted.bytes_per_ms) is float  # JSON-ready
    assert fitted.latency_ms == pytest.approx(0.012, rel=1e-6)
    assert fitted.bytes_per_ms == pytest.approx(50e6, rel=1e-6)
    times = [DEFAULT_CPU_MODEL.swap_out_ms(s) for s in sizes]
    assert all(np.diff(times) > 0)


def assert_unchanged(model, optimizer, model_state, optimizer_state, state_count):
    assert len(optimizer.state) == state_count
    assert all(torch.equal(model_state[k], v) for k, v in model.state_dict().items())
    after = optimizer.state_dict()
    assert after["param_groups"] == optimizer_state["param_groups"]
    assert after["state"].keys() == optimizer_state["state"].keys()
    for index, state in optimizer_state["state"].items():
        assert all(torch.equal(value, after["state"][index][key]) for key, value in state.items())


def no_sep_step(model, optimizer, x, y):
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()


def fails_after_the_capture(monkeypatch):
    """The passes fail: the capture has created the optimizer's state by then."""
    def failing_pipeline(*args, **kwargs):
        raise MutwoError("injected failure in the passes")
    monkeypatch.setattr(profiler_module, "run_pipeline", failing_pipeline)


BAD_CALLS = {  # what a user can get wrong, each documented
    "swap mode": ({"swap": "bogus"}, "unknown swap mode 'bogus'"),
    "GPU timer on the CPU": ({"timer": "cuda-events"}, "times CUDA kernels, but the step runs on cpu"),
    "unknown timer": ({"timer": "sundial"}, "unknown timer 'sundial'"),
    "iters": ({"iters": 0}, "need iters >= 1"),
    "warmup": ({"warmup": -1}, "warmup >= 0"),
    "module depth": ({"module_depth": 0}, "module_depth=0: give a positive integer"),
    "report_dir under a file": ({"report_dir": "FILE/report"}, "cannot write a report to"),
    "no separator": ({"step": no_sep_step}, "never called mutwo_backend.sep"),
    "failure after the capture": ({"patch": fails_after_the_capture}, "injected failure in the passes"),
}


@pytest.mark.parametrize("case", BAD_CALLS, ids=list(BAD_CALLS))
@pytest.mark.parametrize("trained", [False, True], ids=["fresh optimizer", "optimizer with state"])
def test_a_failed_call_changes_nothing(case, trained, tmp_path, monkeypatch):
    """Every bad input leaves the model and the optimizer exactly as they
    were, the count of optimizer states included: checked before anything
    runs, or undone when the failure comes after the capture made state."""
    kwargs, message = dict(BAD_CALLS[case][0]), BAD_CALLS[case][1]
    model, optimizer, x, y = mlp_case()
    if trained:
        mlp_step(model, optimizer, x, y)
    (tmp_path / "FILE").write_text("a file, not a directory")
    if "report_dir" in kwargs:
        kwargs["report_dir"] = str(tmp_path / kwargs["report_dir"])
    kwargs.pop("patch", lambda _: None)(monkeypatch)
    step = kwargs.pop("step", mlp_step)
    model_state = copy.deepcopy(model.state_dict())
    optimizer_state, count = copy.deepcopy(optimizer.state_dict()), len(optimizer.state)
    with pytest.raises(MutwoError, match=message):
        profile_train_step(step, model, optimizer, x, y, **kwargs)
    assert_unchanged(model, optimizer, model_state, optimizer_state, count)


def test_a_report_that_cannot_be_saved_is_not_lost(tmp_path, monkeypatch):
    """A disk that fills up after the profiling: the error holds the report."""
    model, optimizer, x, y = mlp_case()

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(report_module, "write_csv", disk_full)
    with pytest.raises(ReportNotSavedError, match="No space left on device.*not lost") as caught:
        profile_train_step(mlp_step, model, optimizer, x, y, iters=1, report_dir=str(tmp_path))
    assert caught.value.report.to_dict()["meta"]["iters"] == 1
    monkeypatch.undo()
    caught.value.report.save(str(tmp_path / "elsewhere"))
    assert os.path.exists(tmp_path / "elsewhere" / "nodes.csv")


def test_graph_profiler_in_the_course_loop(capsys):
    """The μ-TWO course's starter loop: warm-up runs, reset_stats(), measured
    runs, aggregate_stats(), print_stats(). Node times are of the measured
    runs only, and the model trains as eagerly."""
    model, optimizer, x, y = mlp_case()
    twin, twin_optimizer, _, _ = mlp_case()
    step = mutwo_backend.capture_train_step(mlp_step, model, optimizer, x, y)
    profiler = GraphProfiler(step.gm, run_pipeline(step.gm, step.hints), torch.device("cpu"),
                             freed_after=step.freed_after)
    for _ in range(2):
        step.run(x, y, executor=profiler.run)
    assert len(profiler.stats.records) == 2
    profiler.reset_stats()
    assert not profiler.stats.records
    for _ in range(3):
        step.run(x, y, executor=profiler.run)
    stats = profiler.aggregate_stats()
    assert stats.iterations == 3 and stats.run_time_ms.shape == (len(step.gm.graph.nodes),)
    assert stats.iteration_ms > 0
    profiler.print_stats()
    out = capsys.readouterr().out
    assert "3 measured iterations" in out and "median ms" in out
    for _ in range(5):
        mlp_step(twin, twin_optimizer, x, y)
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def test_unknown_swap_or_timer_is_a_clear_error():
    model, optimizer, x, y = mlp_case()
    with pytest.raises(MutwoError, match="unknown swap mode 'sometimes'"):
        profile_train_step(mlp_step, model, optimizer, x, y, swap="sometimes")
    if not torch.cuda.is_available():  # on a GPU machine the cupti timer is valid
        with pytest.raises(MutwoError, match="times CUDA kernels"):
            profile_train_step(mlp_step, model, optimizer, x, y, timer="cupti")


def test_interpreter_holds_no_values_after_a_run():
    """A forward graph's outputs (saved activations) must be freed at their
    last use in backward, not kept by the interpreter until the next run."""
    model, optimizer, x, y = mlp_case()
    step = mutwo_backend.capture_train_step(mlp_step, model, optimizer, x, y)
    interp = interpreter_module.ProfilingInterpreter(step.gm, torch.device("cpu"), "cpu")
    with torch.no_grad():
        loss, _ = interp.run_iteration(*step.graph_inputs(x, y))[0]
    assert loss.isfinite() and interp.env == {}


def test_values_live_as_long_as_eager_holds_them():
    """SGD reads each gradient once, in the middle of its update, and the
    loss reads the model output once; eager holds gradients in .grad until
    zero_grad and the output in the train step's local ``out``. The
    interpreter frees them there, not at their last read."""

    def step_with_local(model, optimizer, x, y):
        out = mutwo_backend.sep(model(x))  # held until the step returns
        loss = nn.functional.cross_entropy(out, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss

    model, _, x, y = mlp_case()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    step = mutwo_backend.capture_train_step(step_with_local, model, optimizer, x, y)
    analysis = run_pipeline(step.gm, step.hints)
    profiler = GraphProfiler(step.gm, analysis, torch.device("cpu"), freed_after=step.freed_after)
    interp = profiler.interpreter
    alive = {}  # storages (the analysis' keys) that values held by the interpreter refer to
    zero_grad = next(n for n in interp.nodes if "zero_grad" in str(n.args[0] if n.args else ""))
    last_update = interp.nodes[interp.index[zero_grad] - 2]  # before the step's record_function exit
    run_node = interp.run_node

    def watching_run_node(node):
        if node in (last_update, interp.nodes[-1]):
            alive[node] = {key for value in interp.env for key in analysis.storages.refs.get(value, ())}
        return run_node(node)

    interp.run_node = watching_run_node
    step.run(x, y, executor=profiler.run)
    storages = lambda nodes: {key for n in nodes for key in analysis.storages.refs[n]}  # noqa: E731
    grads = storages(n for n, kind in analysis.kinds.items() if kind is NodeType.GRAD)
    output = storages(n for n in interp.nodes if n.name == "sep")
    activations = storages(n for n, info in analysis.activations.items() if info.memory_bytes) - output
    assert len(grads) == 6 and grads | output <= alive[last_update]
    assert not grads & alive[interp.nodes[-1]]  # zero_grad dropped them
    assert activations and not activations & alive[last_update]


OPTIMIZERS = {
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    "adamw-single-tensor": lambda p: torch.optim.AdamW(p, foreach=False),
    "adam-fused": lambda p: torch.optim.Adam(p, fused=True),
}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the allocator's peak needs a CUDA GPU")
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_measured_peak_equals_the_eager_steps_on_cuda(optimizer):
    """Wide layers and a small batch put the peak in the optimizer step, where
    eager holds every gradient in .grad."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(),
                          nn.Linear(2048, 10))
    eager = copy.deepcopy(model).to(device)  # one model on the GPU at a time
    x, y = torch.randn(16, 2048, device=device), torch.randint(0, 10, (16,), device=device)
    eager_optimizer = OPTIMIZERS[optimizer](eager.parameters())
    mlp_step(eager, eager_optimizer, x, y)  # the optimizer state, as profile_train_step creates it
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    mlp_step(eager, eager_optimizer, x, y)
    torch.cuda.synchronize()
    eager_peak = torch.cuda.max_memory_allocated()
    del eager, eager_optimizer
    model.to(device)
    report = profile_train_step(mlp_step, model, OPTIMIZERS[optimizer](model.parameters()), x, y,
                                warmup=1, iters=1).to_dict()
    measured = report["memory"]["measured_peak_bytes"]
    assert abs(measured - eager_peak) <= 0.01 * eager_peak, (measured, eager_peak)


def _ops_recorded_by_a_profiler() -> bool:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        torch.ones(4).relu()
    return any(e.name() == "aten::relu" for e in prof.profiler.kineto_results.events())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="cupti times GPU kernels")
def test_cupti_node_times_add_up_to_the_kernel_time_of_an_eager_step_on_cuda(monkeypatch):
    """The kernels of the node's ops are found through their launches, with
    the ops' own CPU events off; record functions are on again afterwards,
    also after a node that raised."""
    from torch.profiler import ProfilerActivity, profile
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2048, 4096), nn.ReLU(), nn.Linear(4096, 2048), nn.ReLU(),
                          nn.Linear(2048, 10)).to(device)
    eager = copy.deepcopy(model)
    eager_optimizer = torch.optim.Adam(eager.parameters(), fused=True)
    x, y = torch.randn(512, 2048, device=device), torch.randint(0, 10, (512,), device=device)
    for _ in range(2):
        mlp_step(eager, eager_optimizer, x, y)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        mlp_step(eager, eager_optimizer, x, y)
        torch.cuda.synchronize()
    kernel_ms = sum(e.duration_ns() for e in prof.profiler.kineto_results.events()
                    if e.device_type() != torch.autograd.DeviceType.CPU) / 1e6
    del eager, eager_optimizer
    report = profile_train_step(mlp_step, model, torch.optim.Adam(model.parameters(), fused=True), x, y,
                                iters=3, timer="cupti").to_dict()
    assert abs(report["meta"]["iteration_time_ms"] - kernel_ms) <= 0.05 * kernel_ms, kernel_ms
    assert _ops_recorded_by_a_profiler()

    call_function = interpreter_module.ProfilingInterpreter.call_function

    def failing_relu(self, target, args, kwargs):
        if target is torch.ops.aten.relu.default:
            raise RuntimeError("no relu today")
        return call_function(self, target, args, kwargs)

    monkeypatch.setattr(interpreter_module.ProfilingInterpreter, "call_function", failing_relu)
    with pytest.raises(NodeExecutionError, match="no relu today"):
        profile_train_step(mlp_step, model, torch.optim.Adam(model.parameters(), fused=True), x, y,
                           iters=1, timer="cupti")
    assert _ops_recorded_by_a_profiler()


def test_getitem_nodes_are_untimed_and_ops_are_timed():
    """Indexing a multi-output op's result launches nothing: 0 ms, while the
    ops around it are timed."""
    model, optimizer, x, y = mlp_case()
    step = mutwo_backend.capture_train_step(mlp_step, model, optimizer, x, y)
    interp = interpreter_module.ProfilingInterpreter(step.gm, torch.device("cpu"), "cpu")
    getitems = [i for i, n in enumerate(interp.nodes) if n.target is operator.getitem]
    assert len(getitems) > 10 and interp.untimed == frozenset(getitems)
    records = []

    def interpreted(*inputs):
        out, record = interp.run_iteration(*inputs)
        records.append(record)
        return out

    step.run(x, y, executor=interpreted)
    assert (records[0].run_time_ms[getitems] == 0).all()
    ops = [i for i, n in enumerate(interp.nodes) if n.op == "call_function" and i not in interp.untimed]
    assert (records[0].run_time_ms[ops] > 0).all()


def test_statistics_take_allocator_readings_from_the_records_that_hold_them():
    from mutwo_backend.interpreter import IterationRecord
    from mutwo_backend.statistics import Statistics
    stats = Statistics()
    readings = np.array([5, 7, 6])
    stats.add(IterationRecord(np.array([1.0, 2.0, 3.0]), 10.0, allocated_after_bytes=readings,
                              peak_bytes=readings + 1, peak_before_bytes=4,
                              outside_peak_bytes={"before_forward": 4}))
    assert stats.has_memory()
    for times in ([3.0, 2.0, 1.0], [2.0, 2.0, 2.0]):
        stats.add(IterationRecord(np.array(times), 11.0))
    aggregated = stats.aggregate()
    assert aggregated.iterations == 3 and aggregated.run_time_ms.tolist() == [2.0, 2.0, 2.0]
    assert aggregated.peak_bytes.tolist() == [6, 8, 7] and aggregated.allocated_after_bytes.tolist() == [5, 7, 6]
    assert aggregated.outside_peak_bytes == {"before_forward": 4}
    stats.reset()
    stats.add(IterationRecord(np.array([1.0]), 1.0))
    assert not stats.has_memory() and stats.aggregate().peak_bytes is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the allocator's readings need a CUDA GPU")
def test_allocator_is_read_in_one_measured_iteration_with_the_readings_of_every_one_on_cuda(monkeypatch):
    """Reading the allocator in one of three iterations gives the same
    per-node readings as reading it in each: every iteration allocates the same."""
    device = torch.device("cuda")
    model, optimizer, x, y = mlp_case()
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), fused=True)
    x, y = x.to(device), y.to(device)
    step = mutwo_backend.capture_train_step(mlp_step, model, optimizer, x, y)
    analysis = run_pipeline(step.gm, step.hints, allocator_rounding=True)
    profiler = GraphProfiler(step.gm, analysis, device, freed_after=step.freed_after)
    step.run(x, y)
    reads = []
    run_iteration = interpreter_module.ProfilingInterpreter.run_iteration

    def recording(self, *args, **kwargs):
        reads.append(kwargs.get("read_memory", True))
        return run_iteration(self, *args, **kwargs)

    monkeypatch.setattr(interpreter_module.ProfilingInterpreter, "run_iteration", recording)
    for _ in range(3):
        step.run(x, y, executor=profiler.run)
    assert reads == [True, False, False]
    once = profiler.aggregate_stats()
    every = []

    def reading_every_time(*inputs):
        out, record = profiler.interpreter.run_iteration(*inputs)
        every.append(record)
        return out

    for _ in range(2):
        step.run(x, y, executor=reading_every_time)
    for record in every:
        assert record.allocated_after_bytes.tolist() == once.allocated_after_bytes.tolist()
        assert record.peak_bytes.tolist() == once.peak_bytes.tolist()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the swap calibration copies to and from a GPU")
def test_queued_calibration_agrees_with_copies_timed_one_by_one_on_cuda(monkeypatch):
    """The calibration's copies, queued at once behind a GPU spin, time as
    copies timed alone do; without room beside the step nothing is queued."""
    from mutwo_backend import swap
    device = swap._indexed(torch.device("cuda"))
    for state in ("_MODELS", "_QUEUED", "_TOUCHED"):
        monkeypatch.setattr(swap, state, {})
    too_big = 2 * torch.cuda.get_device_properties(device).total_memory
    swap.start_calibration(device, step_peak_bytes=too_big)
    assert device not in swap._QUEUED
    swap.start_calibration(device, step_peak_bytes=0)
    queued = swap._QUEUED[device]
    assert queued.gap_free
    model = swap.swap_model(device)
    assert not model.estimated and device not in swap._QUEUED
    for size in (2 ** 26, 2 ** 28):  # large enough for the host's launch gaps not to count
        alone = swap.median_copy_ms(queued.on_host[:size], queued.on_device[:size])
        assert model.swap_out_ms(size) == pytest.approx(alone, rel=0.1), size


def test_resident_bytes_are_the_graph_inputs_sizes():
    """What a step holds before it runs: parameters, buffers, optimizer
    state and the batch, each tensor's own size."""
    from mutwo_backend.capture import capture_train_step
    from mutwo_backend.device_memory import resident_bytes
    model, optimizer, x, y = mlp_case()
    step = capture_train_step(mlp_step, model, optimizer, x, y)
    analysis = run_pipeline(step.gm, step.hints)
    tensors = [*model.parameters(), *model.buffers(), x, y,
               *(v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor))]
    assert resident_bytes(analysis) == sum(t.untyped_storage().nbytes() for t in tensors)


@pytest.mark.parametrize("warmup, where", [(1, "warm-up"), (None, "measurement")])
def test_out_of_memory_while_profiling_names_the_step_peak_and_the_ways_out(monkeypatch, warmup, where):
    """An out-of-memory error while the step runs comes out as a
    StepDoesNotFitError (a MutwoError the CLI prints and the sweep stops
    at) that says where and what to do, raised from the original error."""
    from mutwo_backend.capture import TrainStepGraph
    from mutwo_backend.cli import is_out_of_memory

    def out_of_memory(self, *args, executor=None):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(TrainStepGraph, "run", out_of_memory)
    model, optimizer, x, y = mlp_case()
    with pytest.raises(mutwo_backend.StepDoesNotFitError, match=f"during the {where}.*GiB.*smaller batch") as error:
        profile_train_step(mlp_step, model, optimizer, x, y, warmup=warmup)
    assert isinstance(error.value.__cause__, torch.OutOfMemoryError)
    assert isinstance(error.value, MutwoError) and is_out_of_memory(error.value)


def test_the_fit_check_compares_the_peak_beyond_the_inputs_with_free_memory(monkeypatch):
    """On the CPU with the GPU's answers stubbed: refused one byte short of
    the simulated peak beyond the inputs, passed with exactly that free."""
    from mutwo_backend import device_memory
    from mutwo_backend.capture import capture_train_step
    model, optimizer, x, y = mlp_case()
    step = capture_train_step(mlp_step, model, optimizer, x, y)
    analysis = run_pipeline(step.gm, step.hints)
    needed = analysis.memory.peak_bytes - device_memory.resident_bytes(analysis)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a GPU")
    cuda = torch.device("cuda")
    monkeypatch.setattr(device_memory, "free_bytes", lambda device: needed)
    device_memory.check_step_fits(cuda, analysis)
    monkeypatch.setattr(device_memory, "free_bytes", lambda device: needed - 1)
    with pytest.raises(mutwo_backend.StepDoesNotFitError, match=r"does not fit on cuda \(a GPU\).*at the peak "
                       r"OPT_STATE [0-9.]+ KiB.*Nothing has run: use a smaller batch"):
        device_memory.check_step_fits(cuda, analysis)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="free device memory is a GPU's")
@pytest.mark.parametrize("entry", ["profile_train_step", "compile"])
def test_a_step_that_cannot_fit_is_refused_before_it_runs_on_cuda(entry):
    """A layer whose output alone is 64 GiB more than the GPU has: the
    simulated peak says so before anything runs, and nothing is trained."""
    device = torch.device("cuda")
    total = torch.cuda.get_device_properties(device).total_memory
    rows, width = 4096, (total + 64 * 1024 ** 3) // (4096 * 4)  # fp32 output bytes = total + 64 GiB
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, width, bias=False), nn.ReLU(), nn.Linear(width, 2, bias=False)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), fused=True)
    x, y = torch.randn(rows, 8, device=device), torch.randint(0, 2, (rows,), device=device)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(mutwo_backend.StepDoesNotFitError, match="does not fit.*Nothing has run") as error:
        if entry == "compile":
            compiled = torch.compile(model, backend="mutwo_profile", options={"optimizer": optimizer})
            nn.functional.cross_entropy(compiled(x), y).backward()
        else:
            profile_train_step(mlp_step, model, optimizer, x, y)
    needed = float(str(error.value).split("needs ")[1].split(" GiB")[0]) * 1024 ** 3
    assert needed >= total + 64 * 1024 ** 3 - 1024 ** 3
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    torch._dynamo.reset()
