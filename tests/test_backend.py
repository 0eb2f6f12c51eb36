"""torch.compile(model, backend="mutwo_profile") in ordinary training loops."""

import copy
import gc
import subprocess
import sys
import textwrap
import weakref

import numpy as np
import pytest
import torch
from torch import nn
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func
from torch._functorch.partitioners import default_partition

import mutwo_backend
from mutwo_backend import backend as backend_module
from mutwo_backend.models import get_model


def train_loop(model, spec, inputs, targets, steps, seed=0):
    return train_loop_with(model, torch.optim.Adam(model.parameters(), lr=1e-3), spec, inputs, targets, steps, seed)


def train_loop_with(model, optimizer, spec, inputs, targets, steps, seed=0):
    losses = []
    torch.manual_seed(seed)
    for _ in range(steps):
        loss = spec.loss(spec.forward(model, inputs), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    return losses


CASES = [("bert-tiny", 2), ("resnet18", 2), ("mlp", 8)]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name, batch", CASES)
def test_compiled_training_equals_eager(name, batch):
    spec = get_model(name)
    torch.manual_seed(0)
    model = spec.build()
    eager_model = copy.deepcopy(model)
    inputs, targets = spec.make_batch(batch, 16, torch.device("cpu"))
    compiled = torch.compile(model, backend="mutwo_profile", options={"warmup": 1, "iters": 2})
    losses = train_loop(compiled, spec, inputs, targets, steps=5)
    eager_losses = train_loop(eager_model, spec, inputs, targets, steps=5)
    assert max((a - b).abs().item() for a, b in zip(losses, eager_losses)) <= 1e-6
    for p, q in zip(model.parameters(), eager_model.parameters()):
        assert (p - q).abs().max().item() <= 1e-6
    report = mutwo_backend.get_report(compiled)
    assert report is not None and report.to_dict()["meta"]["iters"] == 2


def saved_for_backward(model, inputs):
    """Names of the non-placeholder values AOTAutograd's default partition saves."""
    saved = []

    def partition(joint, joint_inputs, *, num_fwd_outputs, **kwargs):
        forward, backward = default_partition(joint, joint_inputs, num_fwd_outputs=num_fwd_outputs, **kwargs)
        outputs = list(forward.graph.nodes)[-1].args[0]
        saved.extend(n.name for n in outputs[num_fwd_outputs:] if n.op != "placeholder")
        return forward, backward

    identity = lambda gm, _: make_boxed_func(gm.forward)  # noqa: E731
    compiled = torch.compile(model, backend=aot_autograd(fw_compiler=identity, bw_compiler=identity,
                                                         partition_fn=partition))
    compiled(inputs).sum().backward()
    return set(saved)


class Checkpointed(nn.Module):
    """Activation checkpointing: default_partition saves the block's input
    and recomputes the block in backward."""

    def __init__(self):
        super().__init__()
        self.up, self.down, self.head = nn.Linear(32, 64), nn.Linear(64, 32), nn.Linear(32, 10)

    def block(self, x):
        return self.down(torch.relu(self.up(x)))

    def forward(self, x):
        return self.head(torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=False))


@pytest.mark.parametrize("name", ["mlp", "resnet18", "checkpointed"])
def test_report_activations_equal_default_partition_saved_values(name):
    """resnet18: batch norm's running statistics are updated by copy_ nodes at
    the end of the joint graph, after backward; they must not hide the cut.
    checkpointed: the values recomputed in backward are no activations, and
    their recomputation is in the report's backward region."""
    spec = get_model("mlp" if name == "checkpointed" else name)
    torch.manual_seed(0)
    model = Checkpointed() if name == "checkpointed" else spec.build()
    inputs, targets = spec.make_batch(4, 0, torch.device("cpu"))
    expected = saved_for_backward(copy.deepcopy(model), inputs)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="mutwo_profile", options={"warmup": 0, "iters": 1})
    train_loop(compiled, spec, inputs, targets, steps=1)
    report = mutwo_backend.get_report(compiled).to_dict()
    acts = {a["name"] for a in report["activations"]}
    assert expected and acts == expected
    relus = [n["region"] for n in report["nodes"] if n["target"] == "relu.default"]
    if name == "checkpointed":
        assert relus == ["forward", "backward"]


def mutwo_entry_point_installed() -> bool:
    from importlib.metadata import entry_points
    return any(ep.name == "mutwo_profile" for ep in entry_points(group="torch_dynamo_backends"))


@pytest.mark.skipif(not mutwo_entry_point_installed(),
                    reason="mutwo is not pip-installed here (make setup installs it): no entry point")
def test_fresh_process_without_import_finds_the_backend():
    script = textwrap.dedent("""
        import sys, torch
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        compiled = torch.compile(model, backend="mutwo_profile", options={"warmup": 0, "iters": 1})
        compiled(torch.randn(3, 4)).sum().backward()
        assert "mutwo_backend" in sys.modules  # loaded through the entry point only
        import mutwo_backend
        report = mutwo_backend.get_report(compiled)
        optimized = torch.compile(torch.nn.Linear(4, 2), backend="mutwo", options={"memory_budget": 1.0, "warmup": 0,
                                                                                   "iters": 1})
        optimized(torch.randn(3, 4)).sum().backward()
        print(len(report.to_dict()["nodes"]) > 0 and mutwo_backend.get_plan(optimized) is not None)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("True")


class WithGraphBreak(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        x = torch.relu(self.a(x))
        torch._dynamo.graph_break()  # as a print or .item() would on some versions
        return self.b(x)


def test_graph_break_gives_two_graphs_in_execution_order():
    model = WithGraphBreak()
    compiled = torch.compile(model, backend="mutwo_profile", options={"warmup": 0, "iters": 1})
    compiled(torch.randn(3, 4)).sum().backward()
    report = mutwo_backend.get_report(compiled).to_dict()
    assert report["meta"]["graphs"] == 2 and report["meta"]["graph_breaks"] == 1
    first, second = report["graphs"]
    assert any(n["target"] == "relu.default" for n in first["nodes"])
    assert not any(n["target"] == "relu.default" for n in second["nodes"])
    assert any("graph break" in note for note in report["meta"]["notes"])


def test_a_changing_batch_size_is_profiled_with_the_recompiled_dynamic_graph():
    """A second batch size makes dynamo recompile with symbolic shapes (the
    default automatic_dynamic_shapes), as a smaller last batch of an epoch
    does; its storage sizes are symbolic. The report sizes them for the batch
    the graph was compiled for: the same as a graph compiled for that batch
    alone. (It used to crash the user's training.)"""
    spec = get_model("mlp")

    def profile(batches):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = spec.build().eval()
        compiled = torch.compile(model, backend="mutwo_profile", options={"warmup": 1, "iters": 2})
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for batch in batches:
            inputs, targets = spec.make_batch(batch, 0, torch.device("cpu"))
            train_loop_with(compiled, optimizer, spec, inputs, targets, steps=1)
        return model, mutwo_backend.get_report(compiled).to_dict()

    model, dynamic = profile([4, 8, 8, 8])
    _, static = profile([8, 8, 8])
    assert dynamic["memory"]["peak_bytes"] == static["memory"]["peak_bytes"]
    assert [a["memory_bytes"] for a in dynamic["activations"]] == [a["memory_bytes"] for a in static["activations"]]
    torch.manual_seed(0)
    eager = spec.build().eval()
    optimizer = torch.optim.SGD(eager.parameters(), lr=0.1)
    for batch in [4, 8, 8, 8]:
        inputs, targets = spec.make_batch(batch, 0, torch.device("cpu"))
        train_loop_with(eager, optimizer, spec, inputs, targets, steps=1)
    assert max((p - q).abs().max().item() for p, q in zip(model.parameters(), eager.parameters())) <= 1e-6


class ParameterFreeAfterBreak(nn.Module):
    """The graph after the break has no parameter, as HF GPT-2's loss with
    labels= or code after a print."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 8)

    def forward(self, x):
        x = self.a(x)
        torch._dynamo.graph_break()
        return torch.tanh(x * 2.0)  # tanh saves its output for backward


@pytest.mark.parametrize("options", [None, {"warmup": 1, "iters": 3}])
def test_graph_without_parameters_is_profiled_and_training_equals_eager(options):
    torch.manual_seed(0)
    model = ParameterFreeAfterBreak()
    eager = copy.deepcopy(model)
    x = torch.randn(3, 4)
    compiled = torch.compile(model, backend="mutwo_profile", options=options)
    for module in (compiled, eager):
        optimizer = torch.optim.Adam(module.parameters())
        for _ in range(4):  # the default warm-up and measured iterations
            module(x).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
    for p, q in zip(model.parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    first, second = mutwo_backend.get_report(compiled).to_dict()["graphs"]
    assert any(n["kind"] == "PARAM" for n in first["nodes"])
    assert not any(n["kind"] in ("PARAM", "GRAD") for n in second["nodes"])
    assert [a["memory_bytes"] for a in second["activations"]] == [3 * 8 * 4]  # tanh's output


def test_get_report_of_a_compiled_function_names_the_fix():
    compiled_function = torch.compile(lambda x: x * 2, backend="mutwo_profile")
    with pytest.raises(mutwo_backend.MutwoError, match=r"pass the model it calls, get_report\(model\)"):
        mutwo_backend.get_report(compiled_function)


class ReadsAValue(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        h = torch.relu(self.a(x))
        scale = h.mean().item()  # a graph break; the value is a constant of the next graph
        return self.b(h) * (1.0 + 0.0 * scale)


def test_a_graph_recompiled_every_step_is_named_in_a_note():
    model = ReadsAValue()
    compiled = torch.compile(model, backend="mutwo_profile", options={"warmup": 1, "iters": 2})
    for _ in range(4):  # another value each step: the graph after the break is compiled anew
        compiled(torch.randn(3, 4)).sum().backward()
    report = mutwo_backend.get_report(compiled).to_dict()
    assert report["meta"]["graphs"] == 1
    assert any("1 more graph(s) of this model ran but are not in the report" in note
               and "times: dynamo recompiles" in note and "capture_scalar_outputs" in note
               for note in report["meta"]["notes"]), report["meta"]["notes"]


def test_a_model_dynamo_does_not_compile_gets_a_hint(caplog):
    class LSTMModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm, self.head = nn.LSTM(4, 8, batch_first=True), nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.lstm(x)[0][:, -1])

    model = LSTMModel()
    compiled = torch.compile(model, backend="mutwo_profile")
    for _ in range(4):
        compiled(torch.randn(3, 5, 4)).sum().backward()
    assert mutwo_backend.get_report(compiled) is None
    assert "dynamo does not compile LSTM unless torch._dynamo.config.allow_rnn = True" in caplog.text


def test_get_report_before_a_measurement_says_why_there_is_none(caplog):
    spec = get_model("mlp")
    compiled = torch.compile(spec.build(), backend="mutwo_profile", options={"warmup": 1, "iters": 3})
    inputs, targets = spec.make_batch(4, 0, torch.device("cpu"))
    with torch.no_grad():
        compiled(inputs)
    assert mutwo_backend.get_report(compiled) is None
    assert "only run without gradients" in caplog.text
    spec.loss(compiled(inputs), targets).backward()
    assert mutwo_backend.get_report(compiled) is None
    assert "measured after 4 training steps (warmup 1 + iters 3), and this model's has run 1" in caplog.text


def test_get_report_warns_once_per_reason(caplog):
    spec = get_model("mlp")
    compiled = torch.compile(spec.build(), backend="mutwo_profile", options={"warmup": 1, "iters": 3})
    inputs, targets = spec.make_batch(4, 0, torch.device("cpu"))
    spec.loss(compiled(inputs), targets).backward()
    for _ in range(3):
        assert mutwo_backend.get_report(compiled) is None
    assert caplog.text.count("no report yet") == 1


def test_an_optimizer_that_is_not_an_optimizer_object_is_named():
    compiled = torch.compile(nn.Linear(2, 2), backend="mutwo_profile", options={"optimizer": "adam"})
    with pytest.raises(Exception, match="option optimizer='adam' is a str: it takes the optimizer object"):
        compiled(torch.randn(1, 2))


def test_an_unwritable_report_dir_fails_before_anything_runs(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    model = nn.Linear(2, 2)
    before = copy.deepcopy(model.state_dict())
    compiled = torch.compile(model, backend="mutwo_profile", options={"report_dir": str(tmp_path / "file" / "r")})
    with pytest.raises(Exception, match="cannot write a report to .*file/r"):
        compiled(torch.randn(1, 2))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_failed_save_leaves_training_going_and_the_report_reachable(tmp_path, monkeypatch, caplog):
    """Saving runs inside the user's backward: a full disk must not raise there."""
    from mutwo_backend import report as report_module

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(report_module, "write_csv", disk_full)
    spec = get_model("mlp")
    model = spec.build()
    compiled = torch.compile(model, backend="mutwo_profile",
                             options={"warmup": 1, "iters": 1, "report_dir": str(tmp_path)})
    inputs, targets = spec.make_batch(4, 0, torch.device("cpu"))
    train_loop(compiled, spec, inputs, targets, steps=3)
    assert "No space left on device" in caplog.text
    report = mutwo_backend.get_report(compiled)
    assert report is not None and report.to_dict()["meta"]["model"] == type(model).__name__


def test_compile_report_names_modules_and_parameters():
    """The compile capture gives nodes the module of the forward op (for a
    backward node, the op it differentiates) and parameters their names."""
    spec = get_model("mlp")
    model = spec.build()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    compiled = torch.compile(model, backend="mutwo_profile", options={"warmup": 1, "iters": 1,
                                                                      "optimizer": optimizer})
    inputs, targets = spec.make_batch(4, 0, torch.device("cpu"))
    train_loop_with(compiled, optimizer, spec, inputs, targets, steps=2)
    data = mutwo_backend.get_report(compiled).to_dict()
    assert data["meta"]["model"] == type(model).__name__
    params = {n["param"] for n in data["nodes"] if n["kind"] == "PARAM"}
    assert params == {name for name, _ in model.named_parameters()}
    linears = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    for node in data["nodes"]:
        if node["target"] == "addmm.default":  # a Linear's forward
            assert node["module"] in linears and node["region"] == "forward"
        if node["kind"] == "GRAD":  # a parameter's gradient comes from its module's backward
            assert node["module"] == node["param"].rpartition(".")[0], node
    assert any(n["module"] in linears and n["region"] == "backward" for n in data["nodes"])


def test_unknown_option_lists_valid_ones():
    compiled = torch.compile(nn.Linear(2, 2), backend="mutwo_profile", options={"warmpu": 1})
    with pytest.raises(Exception, match="unknown mutwo_profile option.*'warmpu'.*valid options are warmup, iters"):
        compiled(torch.randn(1, 2))


@pytest.fixture
def interpreter_calls(monkeypatch):
    """A list that grows by one each time a graph runs through the profiling interpreter."""
    calls = []
    run_iteration = backend_module.ProfilingInterpreter.run_iteration

    def counting(self, *args, **kwargs):
        calls.append(1)
        return run_iteration(self, *args, **kwargs)

    monkeypatch.setattr(backend_module.ProfilingInterpreter, "run_iteration", counting)
    return calls


def compiled_mlp(after: str):
    """The zoo MLP compiled with 1 warm-up and 2 measured iterations."""
    spec = get_model("mlp")
    model = spec.build()
    inputs, targets = spec.make_batch(4, 0, torch.device("cpu"))
    compiled = torch.compile(model, backend="mutwo_profile", options={"warmup": 1, "iters": 2, "after": after})
    return spec, model, compiled, inputs, targets


def test_after_run_stops_instrumenting(interpreter_calls):
    calls = interpreter_calls
    spec, model, compiled, inputs, targets = compiled_mlp("run")
    train_loop(compiled, spec, inputs, targets, steps=3)
    assert len(calls) == 2 * 2  # forward + backward of the measured iterations; warm-up runs plain
    assert mutwo_backend.get_report(compiled).to_dict()["meta"]["iters"] == 2
    train_loop(compiled, spec, inputs, targets, steps=2)
    assert len(calls) == 4


def test_swap_calibration_is_queued_with_real_tensors_before_the_first_measured_run(monkeypatch):
    """AOTAutograd partitions under fake tensors: calibration copies queued
    there would be fake and time nothing. They are queued at the graph's
    first run, outside any fake mode, and waited for before measuring."""
    from torch._guards import detect_fake_mode
    events = []
    start_calibration = backend_module.start_calibration
    swap_model = backend_module.swap_model

    def recording_start(device, step_peak_bytes=0):
        events.append(("start", detect_fake_mode() is None, step_peak_bytes))
        return start_calibration(device, step_peak_bytes)

    def recording_wait(device):
        events.append(("wait",))
        return swap_model(device)

    monkeypatch.setattr(backend_module, "start_calibration", recording_start)
    monkeypatch.setattr(backend_module, "swap_model", recording_wait)
    run_iteration = backend_module.ProfilingInterpreter.run_iteration

    def measured(self, *args, **kwargs):
        events.append(("measure",))
        return run_iteration(self, *args, **kwargs)

    monkeypatch.setattr(backend_module.ProfilingInterpreter, "run_iteration", measured)
    spec, model, compiled, inputs, targets = compiled_mlp("run")
    train_loop(compiled, spec, inputs, targets, steps=3)
    starts = [e for e in events if e[0] == "start"]
    assert len(starts) == 1 and starts[0][1], events  # once, with real tensors
    assert starts[0][2] > 0  # beside a step of the analysed peak
    assert events.index(starts[0]) < events.index(("wait",)) < events.index(("measure",))


def test_inference_passes_through_and_optimizer_state_is_counted():
    spec = get_model("mlp")
    model = spec.build()
    inputs, targets = spec.make_batch(4, 0, torch.device("cpu"))
    optimizer = torch.optim.Adam(model.parameters())
    compiled = torch.compile(model, backend="mutwo_profile",
                             options={"warmup": 1, "iters": 1, "optimizer": optimizer})
    model.eval()
    with torch.no_grad():
        eval_out = compiled(inputs)
    assert torch.allclose(eval_out, model(inputs))
    assert mutwo_backend.get_report(compiled) is None
    model.train()
    for _ in range(2):
        spec.loss(compiled(inputs), targets).backward()
        optimizer.step()
        optimizer.zero_grad()
    report = mutwo_backend.get_report(compiled).to_dict()
    state_bytes = sum(v.nbytes for s in optimizer.state.values() for v in s.values())
    assert state_bytes > 0
    assert report["memory"]["breakdown_at_peak"]["OPT_STATE"] == state_bytes
    assert not any("optimizer state was not seen" in n for n in report["meta"]["notes"])


def test_without_optimizer_the_report_says_state_was_not_seen():
    spec = get_model("mlp")
    compiled = torch.compile(spec.build(), backend="mutwo_profile", options={"warmup": 0, "iters": 1})
    inputs, targets = spec.make_batch(4, 0, torch.device("cpu"))
    spec.loss(compiled(inputs), targets).backward()
    notes = mutwo_backend.get_report(compiled).to_dict()["meta"]["notes"]
    assert any("optimizer state was not seen" in n for n in notes)


@pytest.mark.parametrize("backend", ["aot_eager_default_partitioner", "mutwo_profile"])
def test_a_profiled_model_and_its_optimizer_are_freed_like_an_aot_eager_one(backend):
    """The backend's per-model state is kept by the model's parameters; it
    used to hold the optimizer (and the parameters through it), so a GPU
    kept a profiled model's parameters and optimizer state forever. torch
    keeps the options of a torch.compile until torch._dynamo.reset()."""
    spec = get_model("mlp")
    model = spec.build()
    optimizer = torch.optim.Adam(model.parameters())
    options = {"options": {"warmup": 1, "iters": 1, "optimizer": optimizer}} if backend == "mutwo_profile" else {}
    compiled = torch.compile(model, backend=backend, **options)
    inputs, targets = spec.make_batch(4, 0, torch.device("cpu"))
    train_loop_with(compiled, optimizer, spec, inputs, targets, steps=3)
    if backend == "mutwo_profile":
        assert mutwo_backend.get_report(compiled) is not None
    alive = [weakref.ref(model), weakref.ref(optimizer), weakref.ref(next(model.parameters()))]
    del model, optimizer, compiled, options
    torch._dynamo.reset()
    gc.collect()
    assert [ref() is None for ref in alive] == [True, True, True]


def test_after_keep_profiles_every_iteration_with_bounded_records(interpreter_calls):
    calls = interpreter_calls
    spec, model, compiled, inputs, targets = compiled_mlp("keep")
    train_loop(compiled, spec, inputs, targets, steps=6)
    assert len(calls) == 2 * 5  # forward and backward of every iteration after the warm-up
    assert mutwo_backend.get_report(compiled).to_dict()["meta"]["iters"] == 2
    session = backend_module._SESSIONS[next(model.parameters())]
    assert all(len(g.stats.records) <= 2 for g in session.graphs)  # no growth across iterations


def test_peaks_outside_the_graphs_are_carried_to_the_statistics_and_noted():
    """The eager code between the compiled graphs (the loss) can hold the
    step's peak: each joint record keeps the allocator's peak before the
    forward and before the backward graph, the statistics take their median
    and the report's note names where the step peaked."""
    from mutwo_backend.interpreter import IterationRecord
    from mutwo_backend.assemble import outside_peak_notes
    from mutwo_backend.statistics import Statistics

    def graph_record(peak_before, peaks):
        peaks = np.array(peaks, dtype=np.int64)
        return IterationRecord(np.ones(len(peaks)), 1.0, allocated_after_bytes=peaks, peak_bytes=peaks,
                               peak_before_bytes=peak_before)

    stats = Statistics()
    for loss_peak in (900, 1000, 1100):
        forward = (graph_record(300, [100, 200]), np.array([0, 1]))
        backward = (graph_record(loss_peak, [400, 500]), np.array([2, 3]))
        stats.add(backend_module._joint_record(4, [forward, backward]))
    aggregate = stats.aggregate()
    assert aggregate.outside_peak_bytes == {"before_forward": 300, "before_backward": 1000}
    assert list(aggregate.peak_bytes) == [100, 200, 400, 500]
    (note,) = outside_peak_notes(int(aggregate.peak_bytes.max()), {"before_backward": 1000, "before_forward": 300})
    assert "1,000 B" in note and "between the forward and backward graphs" in note and "500 B" in note
    assert outside_peak_notes(1000, {"before_backward": 1000}) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the allocator's peak needs a CUDA GPU")
@pytest.mark.parametrize("warmup", [1, 0])
def test_compiled_step_peak_counts_the_eager_loss_between_the_graphs(warmup, monkeypatch):
    """A classifier with many classes: the eager cross entropy between the
    forward and backward graphs peaks above both graphs. The report's measured
    peak must match PyTorch's own run of the same AOT graphs
    (aot_eager_default_partitioner), loss included, within 1%: neither the
    swap calibration's 1 GiB buffer nor memory freed before profiling began
    (with no warm-up, no warm-up run resets the allocator's peak) counts."""
    device = torch.device("cuda")
    from mutwo_backend import swap
    for state in ("_MODELS", "_QUEUED", "_TOUCHED"):  # calibrate again, beside this step
        monkeypatch.setattr(swap, state, {})

    def step_peak(backend, options=None):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 50_000)).to(device)
        optimizer = torch.optim.Adam(model.parameters(), fused=True)
        compiled = torch.compile(model, backend=backend,
                                 options=options and {**options, "optimizer": optimizer})
        inputs = torch.randn(512, 256, device=device)
        targets = torch.randint(0, 50_000, (512,), device=device)
        for _ in range(3):
            torch.cuda.synchronize()
            if options is None:  # mutwo reads the counter itself: leave it alone then
                torch.cuda.reset_peak_memory_stats()
            nn.functional.cross_entropy(compiled(inputs), targets).backward()
            optimizer.step()
            optimizer.zero_grad()
            torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(), mutwo_backend.get_report(compiled) if options else None

    reference, _ = step_peak("aot_eager_default_partitioner")
    torch.empty(2 * 1024 ** 3, dtype=torch.uint8, device=device)  # freed at once: a peak before profiling
    _, report = step_peak("mutwo_profile", {"warmup": warmup, "iters": 2})
    memory = report.to_dict()["memory"]
    assert memory["outside_graphs_peak_bytes"]["before_backward"] > memory["measured_graph_peak_bytes"]
    assert abs(memory["measured_peak_bytes"] - reference) <= 0.01 * reference
    assert any("outside the compiled graphs" in n for n in report.to_dict()["meta"]["notes"])


def test_out_of_memory_while_profiling_a_compiled_model_is_explained(monkeypatch):
    """An out-of-memory error in a profiled run of a compiled graph comes out
    of the user's call as a StepDoesNotFitError naming the graph."""
    from mutwo_backend.interpreter import ProfilingInterpreter
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.Adam(model.parameters())
    compiled = torch.compile(model, backend="mutwo_profile", options={"warmup": 0, "iters": 1, "optimizer": optimizer})

    def out_of_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(ProfilingInterpreter, "run_iteration", out_of_memory)
    with pytest.raises(mutwo_backend.StepDoesNotFitError, match="during the forward graph.*smaller batch") as error:
        compiled(torch.randn(4, 8)).sum().backward()
    assert isinstance(error.value.__cause__, torch.OutOfMemoryError)
    torch._dynamo.reset()
