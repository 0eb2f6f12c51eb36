"""The analysis passes against independent oracles: AOTAutograd's own
partitioner for the activation set, MemTracker for the memory peak, and
values worked out by hand for a three-layer MLP."""

import copy

import pytest
import torch
from torch import nn
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func
from torch._functorch.partitioners import default_partition
from torch.distributed._tools.mem_tracker import MemTracker

import mutwo_backend
from mutwo_backend.models import get_model, zoo_train_step
from passes import (AnalysisError, GraphHints, NodeType, Region, run_pipeline,
                    update_after_recompute)

MODELS = [("bert-tiny", 2), ("resnet18", 2), ("mlp", 8)]


def joint_graph_and_saved(model, inputs):
    """The joint graph AOTAutograd partitions, hints from dynamo's inputs, and
    the names of the non-placeholder values default_partition saves."""
    recorded = {}

    def partition(joint, joint_inputs, *, num_fwd_outputs, **kwargs):
        forward, backward = default_partition(joint, joint_inputs, num_fwd_outputs=num_fwd_outputs, **kwargs)
        outputs = list(forward.graph.nodes)[-1].args[0]
        recorded.update(joint=joint, num_fwd_outputs=num_fwd_outputs,
                        static=set(kwargs.get("static_lifetime_input_indices") or []),
                        saved={n.name for n in outputs[num_fwd_outputs:] if n.op != "placeholder"})
        return forward, backward

    def backend(gm, example_inputs):
        recorded["inputs"] = list(example_inputs)
        boxed = lambda g, _: make_boxed_func(g.forward)  # noqa: E731
        return aot_autograd(fw_compiler=boxed, bw_compiler=boxed, partition_fn=partition)(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    out = compiled(inputs)
    (out.logits if hasattr(out, "logits") else out).float().sum().backward()
    joint = recorded["joint"]
    primals = [n for n in joint.graph.nodes if n.op == "placeholder" and n.name.startswith("primals")]
    params = {p.name for p, v in zip(primals, recorded["inputs"]) if isinstance(v, nn.Parameter)}
    buffers = {p.name for i, (p, v) in enumerate(zip(primals, recorded["inputs"]))
               if i in recorded["static"] and p.name not in params}
    hints = GraphHints(params=frozenset(params), buffers=frozenset(buffers),
                       num_fwd_outputs=recorded["num_fwd_outputs"])
    return joint, hints, recorded["saved"]


def build(name, batch):
    spec = get_model(name)
    torch.manual_seed(0)
    model = spec.build()
    inputs, targets = spec.make_batch(batch, 16, torch.device("cpu"))
    return spec, model, inputs, targets


@pytest.fixture(scope="module", params=MODELS, ids=[m for m, _ in MODELS])
def case(request):
    name, batch = request.param
    spec, model, inputs, targets = build(name, batch)
    joint, hints, saved = joint_graph_and_saved(copy.deepcopy(model), inputs)
    optimizer = torch.optim.Adam(model.parameters(), fused=True)
    step = mutwo_backend.capture_train_step(zoo_train_step(spec), model, optimizer, inputs, targets)
    return {"name": name, "model": model, "joint": run_pipeline(joint, hints), "saved": saved,
            "step": step, "train": run_pipeline(step.gm, step.hints)}


def test_joint_graph_activations_equal_what_the_partitioner_saves(case):
    acts = {n.name for n in case["joint"].activations}
    assert case["saved"] and acts == case["saved"]


def dropout_mask_bytes(analysis) -> int:
    """Bytes of saved dropout masks: the train-step graph traces eager CPU
    dropout (bernoulli_ then div_: a float mask), the joint graph AOTAutograd's
    native_dropout (a bool mask, getitem 1)."""
    total = 0
    for node, info in analysis.activations.items():
        source = node.args[0] if node.args else None
        if isinstance(source, torch.fx.Node) and "bernoulli" in str(source.target) \
                or (node.target.__name__ == "getitem" and "native_dropout" in str(node.args[0].target)
                    and node.args[1] == 1):
            total += info.memory_bytes
    return total


def test_train_step_activation_bytes_match_the_joint_graph(case):
    """The same storages are kept for backward, whatever node holds them (the
    train-step graph runs ReLU in place and keeps views such as t and detach
    that functionalized joint graphs do not, so node counts differ). The one
    real difference: dropout masks are float in eager CPU dropout and bool in
    AOTAutograd's native_dropout, 4x the bytes."""
    joint, train = case["joint"], case["train"]
    joint_masks, train_masks = dropout_mask_bytes(joint), dropout_mask_bytes(train)
    assert train_masks == 4 * joint_masks
    joint_bytes = sum(a.memory_bytes for a in joint.activations.values()) - joint_masks
    train_bytes = sum(a.memory_bytes for a in train.activations.values()) - train_masks
    assert train_bytes == pytest.approx(joint_bytes, rel=0.02)


def test_liveness_invariant_holds_for_every_activation(case):
    for analysis in (case["joint"], case["train"]):
        for node, a in analysis.activations.items():
            assert a.creation_rank <= a.last_fw_rank < analysis.sep_backward_rank <= a.first_bw_rank <= a.last_bw_rank
            assert analysis.regions[node] in (Region.FORWARD, Region.LOSS)
            if analysis.regions[node] is Region.FORWARD:
                assert a.creation_rank < analysis.sep_rank


def test_kinds_params_grads_and_adam_state(case):
    params = [p for p in case["model"].parameters() if p.requires_grad]
    for analysis in (case["joint"], case["train"]):
        kinds = list(analysis.kinds.values())
        assert kinds.count(NodeType.PARAM) == len(params)
        assert len(analysis.grads) == len(params)
        assert set(analysis.kinds) == set(analysis.nodes) == set(analysis.regions)
    train = case["train"]
    # Adam: exp_avg, exp_avg_sq and step per parameter
    assert list(train.kinds.values()).count(NodeType.OPT_STATE) == 3 * len(params)
    grad_bytes = sum(train.output_bytes[g] if g.op != "call_function" or train.output_bytes[g] else
                     g.meta["val"].untyped_storage().nbytes() for g in train.grads.values())
    assert grad_bytes == sum(p.numel() * p.element_size() for p in params)


@pytest.mark.parametrize("name, batch", [("bert-tiny", 2), ("resnet18", 4)])
def test_simulated_peak_matches_memtracker_on_the_eager_step(name, batch):
    spec, model, inputs, targets = build(name, batch)
    optimizer = torch.optim.Adam(model.parameters(), fused=True)
    step_fn = zoo_train_step(spec)
    step_fn(model, optimizer, inputs, targets)  # optimizer state exists, as in the captured step
    tracker = MemTracker()
    tracker.track_external(model, optimizer, inputs, targets)
    with tracker:
        step_fn(model, optimizer, inputs, targets)
    measured = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    step = mutwo_backend.capture_train_step(step_fn, model, optimizer, inputs, targets)
    simulated = run_pipeline(step.gm, step.hints).memory.peak_bytes
    assert simulated == pytest.approx(measured, rel=0.02)


# --- a three-layer MLP worked out by hand -------------------------------------

class ThreeLayerMLP(nn.Module):
    def __init__(self, dropout=0.0):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 4)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(self.dropout(torch.relu(self.fc1(x))))))


def mlp_step(model, optimizer, x, y):
    loss = nn.functional.cross_entropy(mutwo_backend.sep(model(x)), y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss


def mlp_analysis(dropout=0.0):
    torch.manual_seed(0)
    model = ThreeLayerMLP(dropout)
    optimizer = torch.optim.Adam(model.parameters(), fused=True)
    step = mutwo_backend.capture_train_step(mlp_step, model, optimizer, torch.randn(8, 16),
                                            torch.randint(0, 4, (8,)))
    return step, run_pipeline(step.gm, step.hints)


def test_mlp_liveness_and_recompute_by_hand():
    """Graph order: 26 placeholders (6 parameters, 18 Adam states, x, y), then
    t (26), addmm (27), relu (28), ... relu is last read in forward by addmm_1
    (31) and in backward only by mm_3 (62), fc1's weight gradient; relu_1 by
    addmm_2 (35) and mm_1 (50)."""
    step, analysis = mlp_analysis()
    by_name = {n.name: n for n in analysis.nodes}
    acts = {n.name: a for n, a in analysis.activations.items()}
    assert set(acts) == {"relu", "detach", "t_1", "relu_1", "detach_1", "t_2"}
    relu, relu_1 = acts["relu"], acts["relu_1"]
    assert (relu.creation_rank, relu.last_fw_rank, relu.first_bw_rank, relu.last_bw_rank) == (28, 31, 62, 62)
    assert (relu_1.creation_rank, relu_1.last_fw_rank, relu_1.first_bw_rank, relu_1.last_bw_rank) == (32, 35, 50, 50)
    assert relu.memory_bytes == relu_1.memory_bytes == 8 * 32 * 4
    assert acts["detach"].memory_bytes == 0 and acts["detach"].base is by_name["relu"]
    assert acts["t_1"].memory_bytes == 0  # a view of fc2's weight: PARAM bytes
    names = step.hints.names
    recompute = analysis.recompute
    assert [names[n.name] for n in recompute[by_name["relu"]].srcs] == ["fc1.weight", "fc1.bias", "args[0]"]
    assert [n.name for n in recompute[by_name["relu"]].nodes] == ["t", "addmm", "relu"]
    assert [n.name for n in recompute[by_name["relu_1"]].srcs] == ["p_in_4", "relu", "t_1"]
    assert [n.name for n in recompute[by_name["relu_1"]].nodes] == ["addmm_1", "relu_1"]
    assert all(info.recomputable for info in recompute.values())

    # Choosing relu for recomputation: relu_1 now recomputes from relu's sources.
    updated = update_after_recompute(recompute, by_name["relu"], analysis.rank)
    # relu's sources (fc1.weight, fc1.bias, x) replace relu; fc2.bias and t_1 (fc2.weight's view) stay
    assert [n.name for n in updated[by_name["relu_1"]].srcs] == ["p_in_1", "p_in_2", "p_in_4", "args_1", "t_1"]
    assert [n.name for n in updated[by_name["relu_1"]].nodes] == ["t", "addmm", "relu", "addmm_1", "relu_1"]
    assert updated[by_name["relu"]].recompute_count == recompute[by_name["relu"]].recompute_count + 2
    assert recompute[by_name["relu_1"]].srcs != updated[by_name["relu_1"]].srcs  # the input is not mutated


def test_activation_behind_dropout_is_not_recomputable():
    step, analysis = mlp_analysis(dropout=0.5)
    unsafe = {n.name: info.reason for n, info in analysis.recompute.items() if not info.recomputable}
    assert unsafe and all("random op" in reason for reason in unsafe.values())


def test_graph_without_boundary_is_a_clear_error():
    gm = torch.fx.symbolic_trace(nn.Linear(2, 2))
    with pytest.raises(AnalysisError, match="no torch.ops.separator.sep node"):
        run_pipeline(gm)
