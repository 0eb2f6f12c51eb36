"""torch.compile(model, backend="mutwo_profile") in ordinary training loops."""

import copy
import subprocess
import sys
import textwrap

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
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
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


@pytest.mark.parametrize("name", ["mlp", "resnet18"])
def test_report_activations_equal_default_partition_saved_values(name):
    """resnet18: batch norm's running statistics are updated by copy_ nodes at
    the end of the joint graph, after backward; they must not hide the cut."""
    spec = get_model(name)
    torch.manual_seed(0)
    model = spec.build()
    inputs, targets = spec.make_batch(4, 0, torch.device("cpu"))
    expected = saved_for_backward(copy.deepcopy(model), inputs)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="mutwo_profile", options={"warmup": 0, "iters": 1})
    train_loop(compiled, spec, inputs, targets, steps=1)
    acts = {a["name"] for a in mutwo_backend.get_report(compiled).to_dict()["activations"]}
    assert expected and acts == expected


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
        print(len(report.to_dict()["nodes"]) > 0)
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


def test_after_run_stops_instrumenting(interpreter_calls):
    calls = interpreter_calls
    spec = get_model("mlp")
    model = spec.build()
    inputs, targets = spec.make_batch(4, 0, torch.device("cpu"))
    compiled = torch.compile(model, backend="mutwo_profile", options={"warmup": 1, "iters": 2, "after": "run"})
    train_loop(compiled, spec, inputs, targets, steps=3)
    assert len(calls) == 2 * 3  # forward + backward of warm-up and measured iterations
    train_loop(compiled, spec, inputs, targets, steps=2)
    assert len(calls) == 6


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


def test_after_keep_profiles_every_iteration_with_bounded_records(interpreter_calls):
    calls = interpreter_calls
    spec = get_model("mlp")
    model = spec.build()
    inputs, targets = spec.make_batch(4, 0, torch.device("cpu"))
    compiled = torch.compile(model, backend="mutwo_profile", options={"warmup": 1, "iters": 2, "after": "keep"})
    train_loop(compiled, spec, inputs, targets, steps=6)
    assert len(calls) == 2 * 6  # forward and backward of every iteration
    assert mutwo_backend.get_report(compiled).to_dict()["meta"]["iters"] == 2
    session = backend_module._SESSIONS[next(model.parameters())]
    assert all(len(g.stats.records) <= 2 for g in session.graphs)  # no growth across iterations
