"""The analysis passes on a hand-written train step, whose every node is
written below, so each expected rank, source and byte count can be checked
by reading the code; plus kinds across optimizers and the error messages."""

import pytest
import torch
from torch import fx, nn
from torch.fx.experimental.proxy_tensor import make_fx

import mutwo_backend.separator  # noqa: F401  (defines torch.ops.separator)
from mutwo_backend import capture_train_step
from mutwo_backend.models import get_model, train_step
from passes import (AnalysisError, GraphHints, NodeType, Region, run_pipeline,
                    update_after_recompute)

aten = torch.ops.aten
SEP, SEP_BACKWARD = torch.ops.separator.sep.default, torch.ops.separator.sep_backward.default
SHAPES = {"w1": (16, 8), "b1": (16,), "w2": (16, 16), "b2": (16,), "w3": (4, 16), "b3": (4,),
          "x": (2, 8), "y": (2, 4)}


def mlp_train_step(w1, b1, w2, b2, w3, b3, x, y):
    """Three linear layers, squared-error loss, backward written out, SGD.
    One aten call per graph node; ranks in comments."""
    t1 = aten.t.default(w1)                                              # 8  t
    a1 = aten.relu.default(aten.addmm.default(b1, x, t1))                # 9  addmm, 10 relu
    t2 = aten.t.default(w2)                                              # 11 t_1
    a2 = aten.relu.default(aten.addmm.default(b2, a1, t2))               # 12 addmm_1, 13 relu_1
    t3 = aten.t.default(w3)                                              # 14 t_2
    out = SEP(aten.addmm.default(b3, a2, t3))                            # 15 addmm_2, 16 sep
    diff = aten.sub.Tensor(out, y)                                       # 17 sub
    loss = aten.sum.default(aten.mul.Tensor(diff, diff))                 # 18 mul, 19 sum_1
    g = SEP_BACKWARD(aten.mul.Tensor(diff, 2.0))                         # 20 mul_1, 21 sep_backward
    gw3 = aten.mm.default(aten.t.default(g), a2)                         # 22 t_3, 23 mm
    gb3 = aten.sum.dim_IntList(g, [0])                                   # 24 sum_2
    gh2 = aten.threshold_backward.default(aten.mm.default(g, w3), a2, 0)  # 25 mm_1, 26 threshold_backward
    gw2 = aten.mm.default(aten.t.default(gh2), a1)                       # 27 t_4, 28 mm_2
    gb2 = aten.sum.dim_IntList(gh2, [0])                                 # 29 sum_3
    ga1 = aten.mm.default(gh2, aten.t.default(t2))                       # 30 t_5, 31 mm_3
    gh1 = aten.threshold_backward.default(ga1, a1, 0)                    # 32 threshold_backward_1
    gw1 = aten.mm.default(aten.t.default(gh1), x)                        # 33 t_6, 34 mm_4
    gb1 = aten.sum.dim_IntList(gh1, [0])                                 # 35 sum_4
    with torch.autograd.profiler.record_function("Optimizer.step#SGD.step"):  # 36 enter
        for p, grad in zip((w1, b1, w2, b2, w3, b3), (gw1, gb1, gw2, gb2, gw3, gb3)):
            aten.add_.Tensor(p, grad, alpha=-0.1)                        # 37-42 add_ .. add__5
    return loss                                                          # 43 exit, 44 output


@pytest.fixture(scope="module")
def hand():
    gm = make_fx(mlp_train_step, tracing_mode="fake")(*[torch.randn(s) for s in SHAPES.values()])
    params = frozenset(f"{name}_1" for name in SHAPES if name[0] in "wb")
    analysis = run_pipeline(gm, GraphHints(params=params))
    return gm, analysis, {n.name: n for n in analysis.nodes}


def test_hand_graph_is_what_the_comments_say(hand):
    _, analysis, _ = hand
    assert [n.name for n in analysis.nodes][8:17] == ["t", "addmm", "relu", "t_1", "addmm_1", "relu_1",
                                                      "t_2", "addmm_2", "sep"]
    assert analysis.nodes[21].name == "sep_backward" and analysis.nodes[36].name == "_record_function_enter_new"
    assert len(analysis.nodes) == 45


def test_regions_and_boundary(hand):
    _, analysis, _ = hand
    assert (analysis.sep_rank, analysis.sep_backward_rank, analysis.boundary.optimizer_rank) == (16, 21, 36)
    expected = [Region.FORWARD] * 16 + [Region.LOSS] * 5 + [Region.BACKWARD] * 15 + [Region.OPTIMIZER] * 9
    assert [analysis.regions[n] for n in analysis.nodes] == expected


def test_kinds(hand):
    _, analysis, _ = hand
    kinds = {n.name: k for n, k in analysis.kinds.items() if k is not NodeType.OTHER}
    assert kinds == {"w1_1": NodeType.PARAM, "b1_1": NodeType.PARAM, "w2_1": NodeType.PARAM,
                     "b2_1": NodeType.PARAM, "w3_1": NodeType.PARAM, "b3_1": NodeType.PARAM,
                     "x_1": NodeType.INPUT, "y_1": NodeType.INPUT,
                     "relu": NodeType.ACT, "t_1": NodeType.ACT, "relu_1": NodeType.ACT,
                     "mm_4": NodeType.GRAD, "sum_4": NodeType.GRAD, "mm_2": NodeType.GRAD,
                     "sum_3": NodeType.GRAD, "mm": NodeType.GRAD, "sum_2": NodeType.GRAD}
    assert {p.name: g.name for p, g in analysis.grads.items()} == {
        "w1_1": "mm_4", "b1_1": "sum_4", "w2_1": "mm_2", "b2_1": "sum_3", "w3_1": "mm", "b3_1": "sum_2"}
    # without hints the roles are read from the graph: read in forward and
    # written by the optimizer = parameter
    assert run_pipeline(hand[0]).kinds == analysis.kinds


def test_liveness_ranks_written_out(hand):
    """creation, last forward read, first and last backward read; t_1 is a
    view of w2 (t), so it holds no bytes of its own."""
    _, analysis, _ = hand
    got = {n.name: (i.creation_rank, i.last_fw_rank, i.first_bw_rank, i.last_bw_rank, i.memory_bytes,
                    i.base.name if i.base is not None else None) for n, i in analysis.activations.items()}
    assert got == {"relu": (10, 12, 28, 32, 2 * 16 * 4, None),
                   "t_1": (11, 12, 30, 30, 0, "w2_1"),
                   "relu_1": (13, 15, 23, 26, 2 * 16 * 4, None)}


def test_recompute_subgraphs(hand):
    _, analysis, _ = hand
    got = {n.name: ([s.name for s in r.srcs], [m.name for m in r.nodes], r.recomputable, r.recompute_count)
           for n, r in analysis.recompute.items()}
    assert got == {"relu": (["w1_1", "b1_1", "x_1"], ["t", "addmm", "relu"], True, 1),
                   "t_1": (["w2_1"], ["t_1"], True, 1),
                   "relu_1": (["b2_1", "relu", "t_1"], ["addmm_1", "relu_1"], True, 1)}


def test_update_after_recompute(hand):
    """Choosing relu: relu_1 now recomputes relu first, from relu's sources;
    then choosing t_1 as well folds t_1's subgraph in too. recompute_count
    counts the subgraphs that run an activation's nodes (μ-TWO's recomp_cnt)."""
    _, analysis, by_name = hand
    once = update_after_recompute(analysis.recompute, by_name["relu"])
    assert once is not analysis.recompute and analysis.recompute[by_name["relu_1"]].srcs[1] is by_name["relu"]
    relu_1 = once[by_name["relu_1"]]
    assert [s.name for s in relu_1.srcs] == ["b2_1", "t_1", "w1_1", "b1_1", "x_1"]
    assert [n.name for n in relu_1.nodes] == ["t", "addmm", "relu", "addmm_1", "relu_1"]
    assert once[by_name["relu"]].recompute_count == 2
    assert once[by_name["t_1"]] == analysis.recompute[by_name["t_1"]]
    twice = update_after_recompute(once, by_name["t_1"])
    relu_1 = twice[by_name["relu_1"]]
    assert set(s.name for s in relu_1.srcs) == {"b2_1", "w2_1", "w1_1", "b1_1", "x_1"}
    assert [n.name for n in relu_1.nodes] == ["t_1", "t", "addmm", "relu", "addmm_1", "relu_1"]
    assert twice[by_name["t_1"]].recompute_count == 2 and twice[by_name["relu"]].recompute_count == 2
    # with the ranks, merged sources and nodes come back in graph order
    in_order = update_after_recompute(update_after_recompute(analysis.recompute, by_name["relu"], analysis.rank),
                                      by_name["t_1"], analysis.rank)[by_name["relu_1"]]
    assert [s.name for s in in_order.srcs] == ["w1_1", "b1_1", "w2_1", "b2_1", "x_1"]
    assert [n.name for n in in_order.nodes] == ["t", "addmm", "relu", "t_1", "addmm_1", "relu_1"]


def test_memory_by_hand(hand):
    """Bytes worked out from the code above (float32, batch 2):
    parameters 484 floats = 1936 B and inputs x, y = 96 B stay resident.
    After addmm_2 (rank 15): relu and relu_1 (128 B each, kept for backward)
    and addmm_2 (32 B) are live; addmm and addmm_1 died at their relu; the t
    nodes are views. The peak is sum_4 (rank 35): every gradient (1936 B),
    the loss (4 B, a graph output) and threshold_backward_1 (128 B)."""
    _, analysis, _ = hand
    memory = analysis.memory
    assert memory.live_bytes[15] == 1936 + 96 + 128 + 128 + 32
    assert memory.timeline_of(NodeType.ACT)[15] == 256
    assert (memory.peak_bytes, memory.peak_rank) == (1936 + 96 + 1936 + 4 + 128, 35)
    assert dict(memory.breakdown_at_peak) == {
        NodeType.PARAM: 1936, NodeType.BUFFER: 0, NodeType.INPUT: 96, NodeType.ACT: 0,
        NodeType.GRAD: 1936, NodeType.OPT_STATE: 0, NodeType.OTHER: 132}
    # the in-place SGD updates allocate nothing; what is left at the end is
    # the resident inputs and the loss: with no hints of where eager frees
    # values (GraphHints.freed_after), a gradient dies at its last read
    assert memory.live_bytes[-1] == 1936 + 96 + 4
    assert all(analysis.output_bytes[n] == 0 for n in analysis.nodes[36:])
    assert memory.timeline.sum(axis=0).tolist() == memory.live_bytes.tolist()
    assert (memory.peak_during_bytes >= memory.live_bytes).all()


def test_allocator_rounding(hand):
    """Every storage rounded up to 512 B. At sum_4: 6 parameters (w2 is
    1024 B), x and y, 6 gradients (mm_2 is 1024 B), the loss and one temporary."""
    gm, analysis, _ = hand
    rounded = run_pipeline(gm, GraphHints(params=frozenset(p.name for p in analysis.grads)),
                           allocator_rounding=True)
    assert rounded.memory.peak_bytes == 512 * (7 + 2 + 7 + 1 + 1)
    assert all(b % 512 == 0 for b in rounded.output_bytes.values())
    assert rounded.activations[next(iter(rounded.activations))].memory_bytes == 512


class SmallMLP(nn.Module):
    """Two biases of the same shape, so a wrong parameter/gradient pairing
    shows in values, not only in shapes."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


OPTIMIZERS = {  # name -> (factory, optimizer state tensors per parameter)
    "adam-fused": (lambda p: torch.optim.Adam(p, fused=True), 3),
    "adamw-fused-amsgrad": (lambda p: torch.optim.AdamW(p, fused=True, amsgrad=True), 4),
    "adam-foreach": (lambda p: torch.optim.Adam(p, foreach=True), 3),
    "adam-single": (lambda p: torch.optim.Adam(p, foreach=False, weight_decay=0.1), 3),
    "sgd-momentum": (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), 1),
    "sgd-foreach": (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, foreach=True), 1),
    "sgd-plain": (lambda p: torch.optim.SGD(p, lr=0.1), 0),
}


class ValueRecorder(fx.Interpreter):
    def __init__(self, gm, wanted):
        super().__init__(gm)
        self.wanted, self.values = wanted, {}

    def run_node(self, node):
        result = super().run_node(node)
        if node in self.wanted:
            self.values[node] = result.detach().clone()
        return result


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_kinds_per_optimizer_and_gradient_values(name):
    """PARAM == GRAD == parameters; OPT_STATE = state tensors per parameter.
    Parameter groups are given in reverse order, so pairing by placeholder
    order would be wrong. Oracle for the pairing: the GRAD node's value when
    the graph runs equals eager autograd's .grad of that parameter."""
    factory, states_per_param = OPTIMIZERS[name]
    spec = get_model("mlp")
    torch.manual_seed(0)
    model, x, y = SmallMLP(), torch.randn(4, 8), torch.randint(0, 4, (4,))
    optimizer = factory([{"params": [p]} for p in reversed(list(model.parameters()))])
    step = capture_train_step(lambda m, o, a, b: train_step(m, o, spec, a, b), model, optimizer, x, y)
    analysis = run_pipeline(step.gm, step.hints)
    count = {kind: sum(1 for k in analysis.kinds.values() if k is kind) for kind in NodeType}
    assert count[NodeType.PARAM] == count[NodeType.GRAD] == 6
    assert count[NodeType.OPT_STATE] == 6 * states_per_param
    assert len(analysis.kinds) == len(analysis.regions) == len(analysis.nodes)
    assert run_pipeline(step.gm).kinds == analysis.kinds  # read from the graph, no hints

    eager = SmallMLP()
    eager.load_state_dict(model.state_dict())
    spec.loss(eager(x), y).backward()
    recorder = ValueRecorder(step.gm, set(analysis.grads.values()))
    step.run(x, y, executor=recorder.run)
    for param, grad in analysis.grads.items():
        expected = dict(eager.named_parameters())[step.hints.names[param.name]].grad
        torch.testing.assert_close(recorder.values[grad].reshape(expected.shape), expected)


def test_frozen_parameters_have_no_gradient():
    spec = get_model("mlp")
    model = SmallMLP()
    model.fc1.requires_grad_(False)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], fused=True)
    step = capture_train_step(lambda m, o, a, b: train_step(m, o, spec, a, b), model, optimizer,
                              torch.randn(4, 8), torch.randint(0, 4, (4,)))
    analysis = run_pipeline(step.gm, step.hints)
    kinds = list(analysis.kinds.values())
    assert kinds.count(NodeType.PARAM) == 6 and kinds.count(NodeType.GRAD) == 4
    assert {step.hints.names[p.name] for p in analysis.frozen_params} == {"fc1.weight", "fc1.bias"}


def test_graph_without_boundary_is_refused():
    gm = fx.symbolic_trace(SmallMLP())
    with pytest.raises(AnalysisError, match="no torch.ops.separator.sep node"):
        run_pipeline(gm)


def test_train_step_without_optimizer_is_refused():
    def no_optimizer(w1, b1, w2, b2, w3, b3, x, y):
        return mlp_train_step(w1, b1, w2, b2, w3, b3, x, y)

    gm = make_fx(no_optimizer, tracing_mode="fake")(*[torch.randn(s) for s in SHAPES.values()])
    gm.graph.erase_node(next(n for n in gm.graph.nodes if n.name == "_record_function_exit"))
    for node in [n for n in gm.graph.nodes if n.name.startswith("add_")] + \
            [next(n for n in gm.graph.nodes if n.name == "_record_function_enter_new")]:
        gm.graph.erase_node(node)
    with pytest.raises(AnalysisError, match="no optimizer step"):
        run_pipeline(gm, GraphHints(params=frozenset({"w1_1"})))


def test_graph_without_fake_values_is_refused():
    gm = make_fx(mlp_train_step, tracing_mode="fake")(*[torch.randn(s) for s in SHAPES.values()])
    for node in gm.graph.nodes:
        node.meta.pop("val", None)
    with pytest.raises(AnalysisError, match="meta\\['val'\\]"):
        run_pipeline(gm)


@pytest.mark.parametrize("op", [torch.ops.aten.native_batch_norm.default, torch.ops.aten.cudnn_batch_norm.default,
                                torch.ops.aten.miopen_batch_norm.default])
def test_batch_norm_in_training_writes_its_running_statistics_on_every_backend(op):
    """cuDNN's and MIOpen's batch norm update running_mean and running_var
    as native_batch_norm does, though no schema says so: the buffers are
    found as written, and a replay must point them at scratch statistics
    (replay.py), so that they are updated once; in evaluation
    (training=False) it writes nothing and replays as it is."""
    from passes.kinds import batch_norm_statistics
    from passes.replay import Replay, replay_rule

    graph = fx.Graph()
    x, weight, bias, mean, var = (graph.placeholder(name) for name in ("x", "weight", "bias", "mean", "var"))
    training = graph.call_function(op, (x, weight, bias, mean, var, True, 0.1, 1e-5))
    evaluation = graph.call_function(op, (x, weight, bias, mean, var, False, 0.1, 1e-5))
    assert not op._schema.is_mutable  # the schema says nothing of the update
    assert batch_norm_statistics(training) == (mean, var)
    assert replay_rule(training) == (Replay.SCRATCH_STATISTICS, None)
    assert batch_norm_statistics(evaluation) == () and replay_rule(evaluation) == (Replay.SAME, None)
