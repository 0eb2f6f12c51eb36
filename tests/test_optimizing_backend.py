"""The backend "mutwo" on the CPU: each dynamo graph, once profiled, runs its
plan (recompute in backward, swaps through the copy streams), and training
equals eager's; options and budgets are checked."""

import copy

import pytest
import torch
from torch import nn

import mutwo_backend
from mutwo_backend import BudgetError, MutwoError, Plan
from mutwo_backend.models import get_model
from planner.problem import planning_problem
from planner_models import DeepMLP, with_eager_twin  # (tests/)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class BrokenMLP(nn.Module):
    """Two halves with a graph break between them: two dynamo graphs."""

    def __init__(self):
        super().__init__()
        self.first, self.second = DeepMLP(depth=3), DeepMLP(depth=3)
        self.second.blocks[0] = nn.Linear(10, 256)

    def forward(self, x):
        x = self.first(x)
        torch._dynamo.graph_break()
        return self.second(x)


class WithConstants(nn.Module):
    """Tensors made in forward: AOTAutograd's graphs read them as constants
    (get_attr), in forward and in backward."""

    def __init__(self):
        super().__init__()
        self.body = DeepMLP(depth=4)

    def forward(self, x):
        return self.body(x * torch.tensor([0.5, 1.5] * (x.shape[-1] // 2)))


class TanhHead(nn.Module):
    """Its output, a tanh, is returned and saved for backward: the caller
    holds it, so no plan may count it as dropped."""

    def __init__(self):
        super().__init__()
        self.body, self.head = DeepMLP(depth=4), nn.Linear(10, 10)

    def forward(self, x):
        return torch.tanh(self.head(self.body(x)))


def zoo(name, batch):
    spec = get_model(name)
    inputs, targets = spec.make_batch(batch, 16, torch.device("cpu"))
    return spec.build, lambda model, x: spec.forward(model, x), spec.loss, inputs, targets


def planner_case(build):
    return build, lambda model, x: model(x), nn.functional.cross_entropy, torch.randn(1024, 256), \
        torch.randint(0, 10, (1024,))


CASES = {
    "mlp": (lambda: zoo("mlp", 64), 0.95),
    "resnet18": (lambda: zoo("resnet18", 16), 0.97),
    "bert-tiny": (lambda: zoo("bert-tiny", 4), 1.0),
    "deep-mlp": (lambda: planner_case(DeepMLP), 0.6),
    "graph-break": (lambda: planner_case(BrokenMLP), 0.7),
    "constants": (lambda: planner_case(WithConstants), 0.7),
    "returned-activation": (lambda: planner_case(TanhHead), 0.7),
}


def train(model, optimizer, forward, loss_fn, x, y, steps):
    torch.manual_seed(1)
    for _ in range(steps):
        loss = loss_fn(forward(model, x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("name", list(CASES))
def test_training_through_mutwo_equals_eager(name):
    make, budget = CASES[name]
    build, forward, loss_fn, x, y = make()
    torch.manual_seed(0)
    model = build()
    eager = copy.deepcopy(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    eager_optimizer = torch.optim.Adam(eager.parameters(), lr=1e-3, fused=True)
    compiled = torch.compile(model, backend="mutwo", options={"memory_budget": budget, "optimizer": optimizer,
                                                              "warmup": 1, "iters": 1})
    train(compiled, optimizer, forward, loss_fn, x, y, 5)
    train(eager, eager_optimizer, forward, loss_fn, x, y, 5)
    for a, b in zip([*model.parameters(), *model.buffers()], [*eager.parameters(), *eager.buffers()], strict=True):
        assert (a.double() - b.double()).abs().max().item() <= 1e-6, name
    plans = mutwo_backend.get_plan(compiled)
    plans = plans if isinstance(plans, list) else [plans]
    assert all(isinstance(p, Plan) and p.predicted_peak_bytes <= p.budget_bytes for p in plans)
    if name == "graph-break":  # one plan per graph, as plan_memory makes it from the combined report
        assert len(plans) == 2
        report = mutwo_backend.get_report(compiled)
        with pytest.raises(MutwoError, match="graph=i"):
            mutwo_backend.plan_memory(report, budget)
        assert [mutwo_backend.plan_memory(report, budget, graph=i) for i in (0, 1)] == plans
    if name in ("deep-mlp", "graph-break", "constants"):
        assert all(p.count("recompute") > 0 for p in plans)
    if name == "returned-activation":  # the tanh the model returns stays (saved as a view), as its caller holds it
        data = mutwo_backend.get_report(compiled).to_dict()
        storage_of = {n["name"]: n["storages"] for n in data["nodes"]}
        returned = set(storage_of[next(n["name"] for n in data["nodes"] if n["target"].startswith("tanh."))])
        on_it = [d for d in plans[0].decisions if returned & set(storage_of[d.activation])]
        assert on_it and all(d.action == "keep" for d in on_it)
        assert not any(c.storage in returned for c in planning_problem(data).candidates)  # never a candidate


def saved_bytes(compiled, x, y) -> int:
    """Bytes of the storages autograd keeps for backward after a forward
    (saved_tensors_hooks see what the compiled graph saves)."""
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = nn.functional.cross_entropy(compiled(x), y)
    loss.backward()
    return sum(storages.values())


def test_the_forward_keeps_less_for_backward_by_what_the_plan_drops():
    """What autograd holds between forward and backward, under "mutwo"
    against "mutwo_profile": less by the bytes of the dropped storages."""
    x, y = torch.randn(1024, 256), torch.randint(0, 10, (1024,))
    kept = {}
    for backend in ("mutwo_profile", "mutwo"):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = DeepMLP()
        optimizer = torch.optim.Adam(model.parameters(), fused=True)
        options = {"optimizer": optimizer, "warmup": 1, "iters": 1}
        if backend == "mutwo":
            options["memory_budget"] = 0.6
        compiled = torch.compile(model, backend=backend, options=options)
        train(compiled, optimizer, lambda m, v: m(v), nn.functional.cross_entropy, x, y, 3)
        kept[backend] = saved_bytes(compiled, x, y)
    plan = mutwo_backend.get_plan(compiled)
    dropped = plan.saved_bytes("recompute") + plan.saved_bytes("swap")
    assert dropped > 0 and kept["mutwo_profile"] - kept["mutwo"] == dropped, (kept, dropped)


def test_swaps_in_the_compiled_graphs_train_as_eager():
    model, eager, optimizer, eager_optimizer = with_eager_twin(DeepMLP)
    x, y = torch.randn(1024, 256), torch.randint(0, 10, (1024,))
    compiled = torch.compile(model, backend="mutwo", options={"memory_budget": 0.6, "allow_swap": True,
                                                              "optimizer": optimizer, "warmup": 1, "iters": 1})
    train(compiled, optimizer, lambda m, v: m(v), nn.functional.cross_entropy, x, y, 4)
    train(eager, eager_optimizer, lambda m, v: m(v), nn.functional.cross_entropy, x, y, 4)
    assert mutwo_backend.get_plan(compiled).count("swap") > 0
    for a, b in zip(model.parameters(), eager.parameters()):
        assert torch.equal(a, b)


def test_options_and_budgets_are_checked():
    model = DeepMLP(depth=2)
    x = torch.randn(64, 256)
    with pytest.raises(Exception, match="needs a memory budget"):
        torch.compile(model, backend="mutwo")(x)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="unknown mutwo option.*'budget'.*valid options are .*memory_budget"):
        torch.compile(model, backend="mutwo", options={"budget": 0.5})(x)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="is not a size"):
        torch.compile(model, backend="mutwo", options={"memory_budget": "lots"})(x)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="mutwo", options={"memory_budget": 0.01, "warmup": 0, "iters": 1})
    with pytest.raises(BudgetError, match="lowest peak the planner reaches"):
        nn.functional.cross_entropy(compiled(x), torch.randint(0, 10, (64,))).backward()
    assert issubclass(BudgetError, MutwoError)
