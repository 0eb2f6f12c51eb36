"""The captured train step against eager PyTorch: same losses, parameters,
optimizer state and buffers; the graph's structure; errors on bad input."""

import copy
import logging
from collections import Counter

import pytest
import torch
import torch.optim.optimizer as optimizer_module
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import mutwo_backend
from mutwo_backend import CaptureError, capture_train_step
from mutwo_backend.models import get_model, zoo_train_step
from passes import run_pipeline

OPTIMIZERS = {
    "adam-fused": lambda p: torch.optim.Adam(p, lr=1e-3, fused=True),
    "adamw-fused": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01, fused=True),
    "adam-foreach": lambda p: torch.optim.Adam(p, lr=1e-3, foreach=True),
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9),
}


class SmallCNN(nn.Module):
    """Conv + BatchNorm + dropout: buffers mutated in place and a random op.
    The conv has no bias, as before any BatchNorm: a bias there has a zero true
    gradient, and Adam would amplify rounding noise in it to the size of lr."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        x = self.dropout(torch.relu(self.bn(self.conv(x))))
        return self.head(x.flatten(1))


def small_cnn_case():
    spec = get_model("mlp")
    batch = (torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,)))
    return SmallCNN(), batch, spec


class LSTMClassifier(nn.Module):
    """A two-layer LSTM: on the CPU its kernel keeps a workspace for backward
    only with grad mode on, so the graph must not run under no_grad."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(20, 16)
        self.lstm = nn.LSTM(16, 16, num_layers=2, batch_first=True)
        self.head = nn.Linear(16, 10)

    def forward(self, ids):
        return self.head(self.lstm(self.embedding(ids))[0][:, -1])


def lstm_case():
    return LSTMClassifier(), (torch.randint(0, 20, (4, 6)), torch.randint(0, 10, (4,))), get_model("mlp")


class ConstantAndCheckpoint(nn.Module):
    """Plain tensor attributes (not buffers: constants of the graph), one
    read as a number, and activation checkpointing (its recomputation
    traced into backward)."""

    def __init__(self):
        super().__init__()
        self.up, self.down, self.head = nn.Linear(32, 64), nn.Linear(64, 32), nn.Linear(32, 10)
        self.scale = torch.linspace(0.5, 1.5, 32)
        self.order = torch.arange(31, -1, -1)  # indexes scale: an op on constants only, still a node
        self.gain = torch.tensor(0.5)

    def block(self, x):
        return self.down(torch.relu(self.up(x)))

    def forward(self, x):
        x = x * self.scale[self.order] * self.gain.item()
        return self.head(torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=False))


def constant_and_checkpoint_case():
    return ConstantAndCheckpoint(), (torch.randn(8, 32), torch.randint(0, 10, (8,))), get_model("mlp")


class RelativePositionBias(nn.Module):
    """A learned table read through an integer index buffer, as Swin's
    relative position bias: indexing whose shape does not depend on values."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(7, 16))
        self.register_buffer("index", torch.randint(0, 7, (16,)))
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(x + self.table[self.index].sum(0))


def relative_position_case():
    return RelativePositionBias(), (torch.randn(4, 16), torch.randint(0, 10, (4,))), get_model("mlp")


def zoo_case(name, batch_size, seq_len=16):
    spec = get_model(name)
    return spec.build(), spec.make_batch(batch_size, seq_len, torch.device("cpu")), spec


CASES = {
    "mlp": lambda: zoo_case("mlp", 8),
    "small-cnn": small_cnn_case,
    "lstm": lstm_case,
    "constant-and-checkpoint": constant_and_checkpoint_case,
    "relative-position": relative_position_case,
    "resnet18": lambda: zoo_case("resnet18", 2),
    "bert-tiny": lambda: zoo_case("bert-tiny", 2),
}


def max_abs_diff(a, b):
    return max(((x.double() - y.double()).abs().max().item() for x, y in zip(a, b)), default=0.0)


def optimizer_tensors(model, optimizer):
    return [v for p in model.parameters() for v in optimizer.state[p].values()
            if isinstance(v, torch.Tensor)]


@pytest.mark.parametrize("optimizer_name", OPTIMIZERS)
@pytest.mark.parametrize("case", CASES)
def test_captured_step_equals_eager(case, optimizer_name):
    torch.manual_seed(0)
    model, (inputs, targets), spec = CASES[case]()
    model.train()
    eager_model = copy.deepcopy(model)
    optimizer = OPTIMIZERS[optimizer_name](model.parameters())
    eager_optimizer = OPTIMIZERS[optimizer_name](eager_model.parameters())
    step_fn = zoo_train_step(spec)

    step = capture_train_step(step_fn, model, optimizer, inputs, targets)
    captured_losses, eager_losses = [], []
    for iteration in range(2):
        torch.manual_seed(100 + iteration)
        captured_losses.append(step(inputs, targets).detach())
        torch.manual_seed(100 + iteration)
        eager_losses.append(step_fn(eager_model, eager_optimizer, inputs, targets).detach())

    assert max_abs_diff(captured_losses, eager_losses) <= 1e-6
    assert max_abs_diff(model.parameters(), eager_model.parameters()) <= 1e-6
    assert max_abs_diff(model.buffers(), eager_model.buffers()) <= 1e-6
    states = optimizer_tensors(model, optimizer)
    eager_states = optimizer_tensors(eager_model, eager_optimizer)
    assert len(states) == len(eager_states) > 0
    assert max_abs_diff(states, eager_states) <= 1e-6
    # The parameters really moved: the comparison above is not vacuous.
    assert max_abs_diff(model.parameters(), copy.deepcopy(CASES[case]()[0]).parameters()) > 0


def node_facts(step):
    """Per node: what it is, what it reads, its value's geometry and its
    module and source line (attribution.py); and per storage the node that
    created it, so that sharing is compared too."""
    storage_creator = {}
    facts = []
    for node in step.gm.graph.nodes:
        value = node.meta.get("val")
        tensors = [value] if isinstance(value, torch.Tensor) else \
            [v for v in value if isinstance(v, torch.Tensor)] if isinstance(value, (tuple, list)) else []
        geometry = [(tuple(t.shape), t.stride(), t.storage_offset(), t.dtype, t.untyped_storage().nbytes(),
                     storage_creator.setdefault(t.untyped_storage()._cdata, node.name)) for t in tensors]
        facts.append((node.op, node.name, str(node.target), str(node.args), str(node.kwargs), geometry,
                      node.meta.get("mutwo_module"), node.meta.get("mutwo_source")))
    return facts


def both_captures(case, optimizer_name):
    """The step of ``case`` traced by make_fx and recorded, each checked to
    leave the model, the optimizer state and the random generator as they were."""
    torch.manual_seed(0)
    model, (inputs, targets), spec = CASES[case]()
    optimizer = OPTIMIZERS[optimizer_name](model.parameters())
    captured = {}
    for record in (False, True):
        before = copy.deepcopy(model.state_dict()), torch.get_rng_state()
        captured[record] = capture_train_step(zoo_train_step(spec), model, optimizer, inputs, targets,
                                              record=record)
        assert all(torch.equal(before[0][k], v) for k, v in model.state_dict().items())
        assert torch.equal(before[1], torch.get_rng_state())
    # the steady state the graph was recorded in is the one it trains from
    assert all(not v.any() for v in optimizer_tensors(model, optimizer) if v.dim() > 0)
    assert [captured[False].capture_method, captured[True].capture_method] == ["traced", "recorded"]
    return captured[False], captured[True]


@pytest.mark.parametrize("optimizer_name", OPTIMIZERS)
@pytest.mark.parametrize("case", [name for name in CASES if name != "lstm"])
def test_recorded_step_is_the_graph_make_fx_traces(case, optimizer_name):
    """The recording (a real step on copies) against make_fx on fake tensors:
    the same nodes, values and simulated memory."""
    traced, recorded = both_captures(case, optimizer_name)
    assert node_facts(recorded) == node_facts(traced)
    memory = [run_pipeline(step.gm, step.hints).memory for step in (traced, recorded)]
    assert [m.peak_bytes for m in memory] == [memory[0].peak_bytes] * 2
    for kind in memory[0].kinds:
        assert list(memory[1].timeline_of(kind)) == list(memory[0].timeline_of(kind))


def test_the_fallback_to_make_fx_is_logged_where_the_cli_shows_it(caplog):
    """The CLI shows the "mutwo" logger; the capture says there why it traces."""
    model, (inputs, targets), spec = zoo_case("mlp", 4)
    optimizer = torch.optim.Adam(model.parameters(), fused=True)

    def reads_a_value(model, optimizer, inputs, targets):
        out = mutwo_backend.sep(model(inputs))
        loss = nn.functional.cross_entropy(out, targets) * targets.max().item()
        loss.backward()
        optimizer.step()
        return loss.detach()

    with caplog.at_level(logging.INFO, logger="mutwo"):
        try:  # make_fx traces the read with a symbolic value, or refuses it (torch versions differ)
            assert capture_train_step(reads_a_value, model, optimizer, inputs, targets).capture_method == "traced"
        except CaptureError:
            pass
    assert any(r.name == "mutwo" and "could not record the step" in r.getMessage() for r in caplog.records)


def test_a_boolean_mask_is_traced_not_recorded():
    """Indexing by a mask has a shape that depends on the values: the
    recording refuses it and leaves it to make_fx, which refuses it too
    (torch 2.11) or traces it with a symbolic size that the passes say they
    cannot size (torch 2.14)."""
    model, (inputs, targets), spec = zoo_case("mlp", 4)
    optimizer = torch.optim.Adam(model.parameters(), fused=True)
    before = snapshot(model, optimizer)

    def masked_step(model, optimizer, inputs, targets):
        out = mutwo_backend.sep(model(inputs))
        loss = nn.functional.cross_entropy(out[targets >= 0], targets[targets >= 0])
        loss.backward()
        optimizer.step()
        return loss.detach()

    try:
        step = capture_train_step(masked_step, model, optimizer, inputs, targets)
    except CaptureError as error:
        assert "tracing train_step failed" in str(error)
    else:
        assert step.capture_method == "traced"
        with pytest.raises(mutwo_backend.MutwoError, match="depends on tensor values"):
            run_pipeline(step.gm, step.hints)
    assert all(torch.equal(before[0][k], v) for k, v in model.state_dict().items())


def test_recording_sees_the_lstm_workspace_fake_tensors_miss():
    """The CPU LSTM kernel returns a workspace for its backward whose size
    its fake-tensor kernel does not know (0 bytes); the recording has the
    real one, so the LSTM is the one case whose graphs differ."""
    traced, recorded = both_captures("lstm", "adam-fused")
    workspaces = {name: [n.meta["val"][3].untyped_storage().nbytes() for n in step.gm.graph.nodes
                         if n.target is torch.ops.aten.mkldnn_rnn_layer.default]
                  for name, step in (("traced", traced), ("recorded", recorded))}
    assert len(workspaces["recorded"]) == 2  # one per layer
    assert workspaces["traced"] == [0, 0]
    assert all(size > 0 for size in workspaces["recorded"])


@pytest.fixture(scope="module")
def fused_bert_step():
    torch.manual_seed(0)
    model, (inputs, targets), spec = zoo_case("bert-tiny", 2)
    optimizer = torch.optim.Adam(model.parameters(), fused=True)
    return capture_train_step(zoo_train_step(spec), model, optimizer, inputs, targets)


def test_graph_has_one_separator_pair_before_one_fused_adam(fused_bert_step):
    nodes = list(fused_bert_step.gm.graph.nodes)
    rank = {n: i for i, n in enumerate(nodes)}
    seps = [n for n in nodes if n.target == torch.ops.separator.sep.default]
    sep_backwards = [n for n in nodes if n.target == torch.ops.separator.sep_backward.default]
    adams = [n for n in nodes if n.target == torch.ops.aten._fused_adam.default]
    assert len(seps) == len(sep_backwards) == len(adams) == 1
    assert rank[seps[0]] < rank[sep_backwards[0]] < rank[adams[0]]
    assert not any(n.target == torch.ops.aten._fused_adam_.default for n in nodes)


def test_fused_adam_params_map_one_to_one_onto_model_parameters(fused_bert_step):
    adam = next(n for n in fused_bert_step.gm.graph.nodes
                if n.target == torch.ops.aten._fused_adam.default)
    roles = fused_bert_step.placeholder_roles
    adam_params = [roles[p.name].name for p in adam.args[0]]
    model_params = [name for name, _ in fused_bert_step.model.named_parameters()]
    assert adam_params == model_params
    assert len(set(adam_params)) == len(adam_params)


def test_tied_weights_are_one_parameter(fused_bert_step):
    model = fused_bert_step.model
    decoder = model.cls.predictions.decoder.weight
    assert decoder is model.bert.embeddings.word_embeddings.weight
    param_placeholders = [r for r in fused_bert_step.placeholder_roles.values() if r.kind == "param"]
    assert len(param_placeholders) == len(list(model.parameters()))
    assert "cls.predictions.decoder.weight" not in {r.name for r in param_placeholders}


def test_missing_optimizer_state_is_created_without_changing_parameters():
    model, (inputs, targets), spec = zoo_case("mlp", 4)
    before = copy.deepcopy(model.state_dict())
    optimizer = torch.optim.Adam(model.parameters(), fused=True)
    capture_train_step(zoo_train_step(spec), model, optimizer, inputs, targets)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    for p in model.parameters():
        state = optimizer.state[p]
        assert state["step"].item() == 0
        assert not state["exp_avg"].any() and not state["exp_avg_sq"].any()


def test_step_returns_what_train_step_returns_and_keeps_grads_it_leaves():
    """A step that zeroes grads before backward leaves them set, as eager does."""
    torch.manual_seed(0)
    model, (inputs, targets), spec = zoo_case("mlp", 4)
    model.eval()  # no dropout: the two runs need no shared RNG
    eager_model = copy.deepcopy(model)

    def grads_kept(model, optimizer, x, y):
        optimizer.zero_grad()
        loss = spec.loss(mutwo_backend.sep(model(x)), y)
        loss.backward()
        optimizer.step()
        return {"loss": loss}

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    step = capture_train_step(grads_kept, model, optimizer, inputs, targets)
    out = step(inputs, targets)
    eager_out = grads_kept(eager_model, torch.optim.SGD(eager_model.parameters(), lr=0.1), inputs, targets)
    assert torch.allclose(out["loss"], eager_out["loss"], atol=1e-6)
    assert max_abs_diff([p.grad for p in model.parameters()],
                        [p.grad for p in eager_model.parameters()]) <= 1e-6


class OpsDispatched(TorchDispatchMode):
    """Counts the aten ops an eager step dispatches, by name."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


# mutwo's ops that run an aten op as eager runs it (optimizers.py)
STAND_INS = {"foreach_addcdiv_": "_foreach_addcdiv_", "foreach_div_scalars_": "_foreach_div_"}


def foreach_ops(names):
    return {name for name in names if name.startswith("_foreach")}


def clipped_step(model, optimizer, x, y):
    loss = nn.functional.cross_entropy(mutwo_backend.sep(model(x)), y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
    optimizer.step()
    optimizer.zero_grad()
    return loss


# (optimizer, train step, whether the optimizer's devices include the CPU, as a GPU is)
DEFAULT_FOREACH_CASES = {
    "adam-default-cpu": (lambda p: torch.optim.Adam(p), None, False),
    "adam-default-gpu-like": (lambda p: torch.optim.Adam(p), None, True),
    "adamw-default-gpu-like": (lambda p: torch.optim.AdamW(p, weight_decay=0.01), None, True),
    "sgd-default-gpu-like": (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), None, True),
    "clip-grad-norm": (lambda p: torch.optim.Adam(p, fused=True), clipped_step, False),
}


@pytest.mark.parametrize("case", DEFAULT_FOREACH_CASES)
def test_graph_takes_the_foreach_path_eager_takes(case, monkeypatch):
    """Optimizers without foreach/fused set (foreach is their default on a
    GPU) and clip_grad_norm_ choose foreach kernels by the tensors' type();
    the graph must follow the choice eager makes for the real tensors, not
    the one it would make for fake ones. Patching the optimizers' foreach
    devices to the CPU makes eager choose as it does on a GPU."""
    make_optimizer, step_fn, gpu_like = DEFAULT_FOREACH_CASES[case]
    if gpu_like:
        monkeypatch.setattr(optimizer_module, "_get_foreach_kernels_supported_devices", lambda: ["cpu"])
    eager_ops = check_foreach_path_and_bits(make_optimizer, step_fn, torch.device("cpu"))
    if gpu_like or step_fn is clipped_step:
        assert eager_ops  # the case tests what it says


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the optimizers' own GPU default needs a CUDA GPU")
@pytest.mark.parametrize("case", [c for c in DEFAULT_FOREACH_CASES if not c.endswith("-cpu")])
def test_graph_takes_the_foreach_path_eager_takes_on_a_gpu(case):
    make_optimizer, step_fn, _ = DEFAULT_FOREACH_CASES[case]
    assert check_foreach_path_and_bits(make_optimizer, step_fn, torch.device("cuda"))


def check_foreach_path_and_bits(make_optimizer, step_fn, device) -> set[str]:
    """Captures an MLP's step; checks that the graph holds every foreach op
    an eager step dispatches and that two steps of each give the same
    parameters to the bit. Returns eager's foreach ops."""
    torch.manual_seed(0)
    model, (inputs, targets), spec = zoo_case("mlp", 4)
    model, inputs, targets = model.to(device), inputs.to(device), targets.to(device)
    model.eval()  # no dropout: the two runs need no shared RNG
    eager_model = copy.deepcopy(model)
    step_fn = step_fn or zoo_train_step(spec)
    step = capture_train_step(step_fn, model, make_optimizer(model.parameters()), inputs, targets)
    graph_ops = {STAND_INS.get(n.target.overloadpacket.__name__, n.target.overloadpacket.__name__)
                 for n in step.gm.graph.nodes if isinstance(n.target, torch._ops.OpOverload)}
    eager_optimizer = make_optimizer(eager_model.parameters())
    step_fn(eager_model, eager_optimizer, inputs, targets)  # creates the state, as the capture did
    with OpsDispatched() as eager:
        step_fn(eager_model, eager_optimizer, inputs, targets)

    assert foreach_ops(eager.ops) <= foreach_ops(graph_ops)
    assert bool(foreach_ops(eager.ops)) == bool(foreach_ops(graph_ops) - {"_foreach_copy_"})
    for _ in range(2):  # as many steps as eager took
        step(inputs, targets)
    # the same kernels in the same order: the same bits
    differences = [(p - q).abs().max().item() for p, q in zip(model.parameters(), eager_model.parameters())]
    assert max(differences) == 0.0, differences
    return foreach_ops(eager.ops)


# --- bad input -------------------------------------------------------------

def no_sep(model, optimizer, x, y):
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def no_backward(model, optimizer, x, y):
    nn.functional.cross_entropy(mutwo_backend.sep(model(x)), y)
    optimizer.step()


def no_optimizer_step(model, optimizer, x, y):
    nn.functional.cross_entropy(mutwo_backend.sep(model(x)), y).backward()
    optimizer.zero_grad()


def loss_ignores_sep(model, optimizer, x, y):
    out = model(x)
    mutwo_backend.sep(out)
    nn.functional.cross_entropy(out, y).backward()
    optimizer.step()


def reads_a_value(model, optimizer, x, y):
    loss = nn.functional.cross_entropy(mutwo_backend.sep(model(x)), y)
    if loss.item() > 0:
        loss.backward()
    optimizer.step()


def sep_on_a_dict(model, optimizer, x, y):
    out = mutwo_backend.sep({"logits": model(x)})  # as with a model that returns a dict
    nn.functional.cross_entropy(out["logits"], y).backward()
    optimizer.step()


def decays_lr_inside(model, optimizer, x, y):
    nn.functional.cross_entropy(mutwo_backend.sep(model(x)), y).backward()
    optimizer.step()
    for group in optimizer.param_groups:  # what a scheduler's step() does
        group["lr"] *= 0.5


def accumulates_two_micro_batches(model, optimizer, x, y):
    for half in (slice(0, 2), slice(2, 4)):
        nn.functional.cross_entropy(mutwo_backend.sep(model(x[half])), y[half]).backward()
    optimizer.step()


def snapshot(model, optimizer):
    return (copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()),
            [list(g["params"]) for g in optimizer.param_groups], dict(optimizer.state))


def assert_unchanged(before, model, optimizer):
    state, opt_state, groups, opt_state_map = before
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert optimizer.state_dict()["state"].keys() == opt_state["state"].keys()
    assert [list(g["params"]) for g in optimizer.param_groups] == groups
    assert dict(optimizer.state) == opt_state_map


@pytest.mark.parametrize("bad_step, message", [
    (no_sep, "never called mutwo_backend.sep"),
    (no_backward, "never called loss.backward()"),
    (no_optimizer_step, "never called optimizer.step()"),
    (loss_ignores_sep, "does not depend on the output of mutwo_backend.sep"),
    (reads_a_value, "must not read tensor values"),
    (sep_on_a_dict, "not a dict: pass the tensor the loss is computed from, e.g. sep(out.logits)"),
    (decays_lr_inside, "step learning-rate schedulers outside train_step"),
    (accumulates_two_micro_batches, "sep 2 times.*With gradient accumulation, capture a step of one micro-batch"),
])
def test_bad_train_step_raises_and_leaves_model_unchanged(bad_step, message):
    model, (inputs, targets), _ = zoo_case("mlp", 4)
    optimizer = torch.optim.Adam(model.parameters(), fused=True)
    before = snapshot(model, optimizer)
    with pytest.raises(CaptureError, match=message.replace("(", r"\(").replace(")", r"\)")):
        capture_train_step(bad_step, model, optimizer, inputs, targets)
    assert_unchanged(before, model, optimizer)


@pytest.mark.parametrize("make_optimizer, message", [
    (lambda m: torch.optim.RMSprop(m.parameters()), "unsupported optimizer RMSprop"),
    (lambda m: torch.optim.Adam([nn.Parameter(torch.zeros(3))]), "not a parameter of the model"),
    (lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, dampening=0.5),
     "Run one eager training step"),
])
def test_unsupported_optimizer_or_groups_raise(make_optimizer, message):
    model, (inputs, targets), spec = zoo_case("mlp", 4)
    optimizer = make_optimizer(model)
    before = snapshot(model, optimizer)
    with pytest.raises(CaptureError, match=message):
        capture_train_step(zoo_train_step(spec), model, optimizer, inputs, targets)
    assert_unchanged(before, model, optimizer)


def test_a_changed_learning_rate_stops_the_graph_before_it_trains():
    """The graph holds the optimizer's settings as constants: run after a
    scheduler changed lr, it would train with the old one."""
    model, (inputs, targets), spec = zoo_case("mlp", 4)
    model.eval()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    step = capture_train_step(zoo_train_step(spec), model, optimizer, inputs, targets)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)  # adds initial_lr, keeps lr
    step(inputs, targets)
    scheduler.step()  # lr 0.1 -> 0.01
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(CaptureError, match=r"param_groups\[0\]\['lr'\]: 0.1 -> 0.01"):
        step(inputs, targets)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    step = capture_train_step(zoo_train_step(spec), model, optimizer, inputs, targets)
    step(inputs, targets)  # captured again, it runs


@pytest.mark.parametrize("enabled", [True, False])
def test_an_enabled_grad_scaler_is_refused_and_left_untouched(enabled):
    """With fused Adam the step used to trace, keeping the scale as a graph
    constant and leaving a fake tensor in the user's scaler."""
    model, (inputs, targets), _ = zoo_case("mlp", 4)
    optimizer = torch.optim.Adam(model.parameters(), fused=True)
    scaler = torch.amp.GradScaler("cpu", enabled=enabled)

    def scaled_step(model, optimizer, x, y):
        loss = nn.functional.cross_entropy(mutwo_backend.sep(model(x)), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        return loss

    if enabled:
        before = snapshot(model, optimizer)
        with pytest.raises(CaptureError, match="GradScaler.*backend='mutwo_profile'"):
            capture_train_step(scaled_step, model, optimizer, inputs, targets)
        assert_unchanged(before, model, optimizer)
        assert scaler._scale is None
    else:
        capture_train_step(scaled_step, model, optimizer, inputs, targets)(inputs, targets)
    assert torch.amp.GradScaler.scale.__name__ == "scale"


def test_non_tensor_arguments_are_constants_the_graph_checks():
    """A float, a string and a dict of tensors as arguments: the graph holds
    the non-tensor ones as constants, so another value must not run
    silently with the old one (a string argument used to fail the passes)."""
    model, (inputs, targets), spec = zoo_case("mlp", 4)
    model.eval()
    eager_model = copy.deepcopy(model)

    def weighted_step(model, optimizer, batch, weight, note):
        loss = weight * nn.functional.cross_entropy(mutwo_backend.sep(model(batch["x"])), batch["y"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss

    batch = {"x": inputs, "y": targets}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    report = mutwo_backend.profile_train_step(weighted_step, model, optimizer, batch, 0.5, "a note",
                                              warmup=0, iters=1)
    weighted_step(eager_model, torch.optim.SGD(eager_model.parameters(), lr=0.1), batch, 0.5, "a note")
    assert report.to_dict()["memory"]["peak_bytes"] > 0
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), eager_model.parameters()))
    step = capture_train_step(weighted_step, model, optimizer, batch, 0.5, "a note")
    with pytest.raises(CaptureError, match=r"args\[1\] was 0.5 when captured and is 0.25 now"):
        step(batch, 0.25, "a note")


class CountsCalls(nn.Module):
    """A counter in a plain tensor attribute, updated in place: a constant of
    the graph, which make_fx would update for real while tracing."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(32, 10)
        self.calls = torch.zeros(())

    def forward(self, x):
        self.calls.add_(1)
        return self.linear(x)


def test_an_in_place_update_of_a_constant_is_refused_before_it_runs():
    model = CountsCalls()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    inputs, targets = torch.randn(4, 32), torch.randint(0, 10, (4,))
    with pytest.raises(CaptureError, match=r"updates in place \(add_\).*register_buffer"):
        capture_train_step(zoo_train_step(get_model("mlp")), model, optimizer, inputs, targets)
    assert model.calls.item() == 0


def test_inputs_on_another_device_raise():
    model, (inputs, targets), spec = zoo_case("mlp", 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(CaptureError, match="input args\\[0\\] is on meta but the model is on cpu"):
        capture_train_step(zoo_train_step(spec), model, optimizer, inputs.to("meta"), targets)


def test_errors_are_mutwo_errors():
    assert issubclass(CaptureError, mutwo_backend.MutwoError)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuDNN's recurrent kernels need a CUDA GPU")
def test_cudnn_rnn_capture_error_names_the_limitation():
    model, (ids, targets), spec = lstm_case()
    model = model.cuda()
    optimizer = torch.optim.Adam(model.parameters(), fused=True)
    with pytest.raises(CaptureError, match="LSTM on a GPU: cuDNN's recurrent kernels cannot run on the fake"):
        capture_train_step(zoo_train_step(spec), model, optimizer, ids.cuda(), targets.cuda())
