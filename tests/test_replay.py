"""The replay rules in their CPU form: every activation a plan may
recompute, replayed from the values it is rebuilt from, gives the bits of
the original run and writes nothing it should not (batch norm's running
statistics are updated once)."""

import operator

import pytest
import torch
import torch.utils._pytree as pytree
from torch import fx, nn

import mutwo_backend
from passes import run_pipeline
from passes.replay import Replay, functional_form, replay_args, replay_op, replay_reason, replay_rule
from planner_models import NativeDropoutMLP  # (tests/)

aten = torch.ops.aten
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("inplace, functional", [
    (aten.relu_.default, aten.relu.default), (aten.add_.Tensor, aten.add.Tensor),
    (aten.mul_.Tensor, aten.mul.Tensor), (aten.hardtanh_.default, aten.hardtanh.default)])
def test_an_in_place_op_replays_as_its_functional_form_with_the_same_bits(inplace, functional, device):
    assert functional_form(inplace) is functional
    torch.manual_seed(0)
    x, other = torch.randn(64, 32, device=device), torch.randn(64, 32, device=device)
    args = (x, other) if len(inplace._schema.arguments) > 1 and inplace._schema.arguments[1].type.kind() \
        == "TensorType" else (x,)
    expected = inplace(x.clone(), *args[1:])
    replayed = functional(*args)
    assert torch.equal(replayed, expected) and replayed.data_ptr() != x.data_ptr()


def test_ops_that_may_not_be_replayed_say_why():
    graph = fx.Graph()
    x = graph.placeholder("x")
    for op in (aten.bernoulli_.float, aten.rand_like.default):
        rule, reason = replay_rule(graph.call_function(op, (x, 0.5) if "bernoulli" in str(op) else (x,)))
        assert rule is Replay.NEVER and reason.startswith("random op")
    rule, reason = replay_rule(graph.call_function(aten.native_dropout.default, (x, 0.5, True)))
    assert rule is Replay.NEVER and "whose mask nothing keeps" in reason  # no getitem of its mask
    rule, reason = replay_rule(graph.call_function(aten._native_batch_norm_legit.default, (x,) * 5 + (True, 0.1, 1e-5)))
    assert rule is Replay.NEVER and "mutation" in reason  # a write this module does not know how to undo
    sep = graph.call_function(torch.ops.separator.sep.default, (x,))
    assert replay_rule(sep) == (Replay.VIEW, None) and replay_op(sep) is aten.alias.default


@pytest.mark.parametrize("device", DEVICES)
def test_batch_norm_replays_without_running_statistics_and_the_same_bits(device):
    """Training batch norm normalises with the batch's statistics: without
    running statistics (None, as the rewriter replays it), a replay gives
    the original bits and leaves the real ones as the original run updated
    them, once. On a GPU the op is cuDNN's, as a GPU capture records it."""
    torch.manual_seed(0)
    x, weight, bias = (torch.randn(8, 4, 5, 5, device=device), torch.randn(4, device=device),
                       torch.randn(4, device=device))
    mean, var = torch.randn(4, device=device), torch.rand(4, device=device) + 0.5
    op = aten.cudnn_batch_norm.default if device == "cuda" else aten.native_batch_norm.default
    graph = fx.Graph()
    node = graph.call_function(op, tuple(graph.placeholder(n) for n in "xwbmv") + (True, 0.1, 1e-5))
    assert replay_rule(node) == (Replay.SCRATCH_STATISTICS, None)
    original = op(x, weight, bias, mean, var, True, 0.1, 1e-5)
    updated = mean.clone(), var.clone()
    replayed = replay_op(node)(*replay_args(node, (x, weight, bias, mean, var, True, 0.1, 1e-5)))
    assert all(torch.equal(a, b) for a, b in zip(replayed, original))
    assert torch.equal(mean, updated[0]) and torch.equal(var, updated[1])


class ResidualCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = self.stem(x)
        out = self.bn(self.conv(x))
        out += x  # a residual add_, then an in-place ReLU, as ResNet's blocks
        out = torch.relu_(out)
        return self.head(self.drop(out.mean((2, 3))))


def classify_step(model, optimizer, x, y):
    loss = nn.functional.cross_entropy(mutwo_backend.sep(model(x)), y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.detach()


class Snapshots(fx.Interpreter):
    """Runs the graph and keeps a copy of every node's value as it was made."""

    def __init__(self, gm):
        super().__init__(gm)
        self.values = {}

    def run_node(self, n):
        result = super().run_node(n)
        self.values[n] = pytree.tree_map_only(torch.Tensor, torch.clone, result)
        return result


@pytest.mark.parametrize("device", DEVICES)
def test_every_recomputable_activation_replays_to_the_bits_of_the_original_run(device):
    """The captured step's own values, replayed from their sources (on a
    GPU: cuDNN's batch norm, native_dropout rebuilt from its mask)."""
    torch.manual_seed(0)
    model = ResidualCNN().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(4, 3, 8, 8, device=device), torch.randint(0, 10, (4,), device=device)
    step = mutwo_backend.capture_train_step(classify_step, model, optimizer, x, y)
    analysis = run_pipeline(step.gm, step.hints)
    runner = Snapshots(step.gm)
    inputs = pytree.tree_map_only(torch.Tensor, torch.clone, pytree.tree_leaves(step.graph_inputs(x, y)))
    runner.run(*inputs)
    replayed_rules = set()
    recomputable = [a for a, info in analysis.recompute.items() if info.recomputable and info.nodes]
    blocked = {a.name: info.reason for a, info in analysis.recompute.items() if not info.recomputable}
    # the in-place ReLUs and the residual add_ no longer block; dropout's draw does
    by_name = {a.name: a for a in recomputable}
    if device == "cpu":  # (a GPU capture names its nodes after cuDNN's ops)
        assert {"relu_", "detach_1"} <= set(by_name)
        assert {"add__2", "relu__1"} <= {n.name for n in analysis.recompute[by_name["detach_1"]].nodes}
    assert blocked and all("random" in reason for reason in blocked.values())
    for activation in recomputable:
        info = analysis.recompute[activation]
        env = {src: runner.values[src] for src in info.srcs}
        sources_before = {src: pytree.tree_map_only(torch.Tensor, torch.clone, value) for src, value in env.items()}
        for node in info.nodes:
            rule, _ = replay_rule(node)
            replayed_rules.add(rule)
            args, kwargs = pytree.tree_map_only(fx.Node, lambda n: env[n], (node.args, node.kwargs))
            if node.target is operator.getitem:
                env[node] = operator.getitem(*args)
                continue
            args = replay_args(node, args)
            args = tuple(env[a] if isinstance(a, fx.Node) else a for a in args)  # (dropout's kept mask)
            env[node] = replay_op(node)(*args, **kwargs)
        got, expected = env[activation], runner.values[activation]
        assert torch.equal(got, expected), activation.name
        for src, value in sources_before.items():  # the replay wrote nothing it reads
            assert all(torch.equal(a, b) for a, b in zip(pytree.tree_leaves(env[src]), pytree.tree_leaves(value)))
    assert {Replay.SAME, Replay.OUT_OF_PLACE, Replay.SCRATCH_STATISTICS} <= replayed_rules


def test_an_in_place_write_to_a_kept_value_is_not_replayed():
    graph = fx.Graph()
    kept = graph.placeholder("kept")
    relu = graph.call_function(aten.relu_.default, (kept,))
    assert replay_rule(relu) == (Replay.OUT_OF_PLACE, None)
    assert "writes a value the replay does not rebuild" in replay_reason([relu])


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"))])
def test_dropout_replays_from_its_kept_mask_with_the_same_bits_and_no_draw(device):
    """native_dropout (the GPU's dropout; called directly here, so on any
    device) is rebuilt from its mask: the same bits, the generator not
    drawn. The mask itself is random: kept or swapped, never rebuilt."""
    torch.manual_seed(0)
    x = torch.randn(512, 256, device=device)
    out, mask = aten.native_dropout.default(x, 0.1, True)
    state = torch.cuda.get_rng_state() if device == "cuda" else torch.get_rng_state()
    graph = fx.Graph()
    node = graph.call_function(aten.native_dropout.default, (graph.placeholder("x"), 0.1, True))
    kept = graph.call_function(operator.getitem, (node, 1))
    assert replay_rule(node) == (Replay.FROM_MASK, None)
    value, replayed_mask = replay_op(node)(*[{kept: mask}.get(a, a) for a in replay_args(node, (x, 0.1, True))])
    assert torch.equal(value, out) and replayed_mask is mask
    assert torch.equal(state, torch.cuda.get_rng_state() if device == "cuda" else torch.get_rng_state())
    assert "is random: it can be kept or swapped" in replay_reason([node, kept])

    torch.manual_seed(0)
    model = NativeDropoutMLP(width=32, depth=2).to(device)
    step = mutwo_backend.capture_train_step(classify_step, model, torch.optim.SGD(model.parameters(), lr=0.1),
                                            torch.randn(8, 32, device=device), torch.randint(0, 10, (8,), device=device))
    recompute = run_pipeline(step.gm, step.hints).recompute
    outputs = [a for a in recompute if a.target is operator.getitem and a.args[1] == 0
               and str(a.args[0].target) == "aten.native_dropout.default"]
    assert outputs and all(recompute[a].recomputable and recompute[a].nodes[-2:] == (a.args[0], a) for a in outputs)
    assert all(any(s.target is operator.getitem and s.args[1] == 1 for s in recompute[a].srcs) for a in outputs)


class ViewThenInPlace(nn.Module):
    """A view taken before an in-place ReLU, read in backward: it holds the
    ReLU's output by then, which a replay of the view alone would not."""

    def __init__(self):
        super().__init__()
        self.lin, self.head = nn.Linear(16, 16), nn.Linear(16, 10)

    def forward(self, x):
        h = self.lin(x)
        flat = h.view(-1)
        torch.relu_(h)
        return self.head(h) + (flat * flat).sum()


def test_a_value_written_in_place_after_it_is_made_is_not_replayed():
    torch.manual_seed(0)
    model = ViewThenInPlace()
    step = mutwo_backend.capture_train_step(classify_step, model, torch.optim.SGD(model.parameters(), lr=0.1),
                                            torch.randn(8, 16), torch.randint(0, 10, (8,)))
    recompute = run_pipeline(step.gm, step.hints).recompute
    (flat,) = [a for a in recompute if a.target is aten.view.default and a.args[1] == [-1]]
    assert not recompute[flat].recomputable
    assert "writes its storage in place after it is made" in recompute[flat].reason
