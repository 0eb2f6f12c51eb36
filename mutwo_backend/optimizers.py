"""What the capture knows about optimizers: which are supported, how their
state is created before tracing, and how fused Adam becomes a functional op.

Supported: Adam and AdamW (fused, foreach or single-tensor) and SGD (with or
without momentum). Their state is created up front because a graph that
creates state in its first iteration is not the graph of a steady training
step.
"""

import contextlib
import operator

import torch
from torch import fx
from torch.optim import SGD, Adam, AdamW, Optimizer
from torch.utils._python_dispatch import TorchDispatchMode

from .errors import CaptureError

SUPPORTED_OPTIMIZERS = (Adam, AdamW, SGD)
aten = torch.ops.aten


def check_supported(optimizer: Optimizer, model_params: list[torch.Tensor]) -> None:
    """Raise CaptureError for an optimizer or parameter group the capture cannot handle."""
    if type(optimizer) not in SUPPORTED_OPTIMIZERS:
        names = ", ".join(cls.__name__ for cls in SUPPORTED_OPTIMIZERS)
        raise CaptureError(
            f"unsupported optimizer {type(optimizer).__name__}: the capture supports {names}. "
            "Use one of those, or profile the model through torch.compile(backend='mutwo_profile'), "
            "which leaves the optimizer outside the graph."
        )
    known = {id(p) for p in model_params}
    for index, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            if id(p) not in known:
                raise CaptureError(
                    f"optimizer parameter group {index} holds a tensor of shape {tuple(p.shape)} "
                    "that is not a parameter of the model: build the optimizer from "
                    "model.parameters() (or a subset of them)."
                )
        if group.get("differentiable", False):
            raise CaptureError(
                f"optimizer parameter group {index} has differentiable=True: the capture traces "
                "the optimizer under no_grad; create the optimizer with differentiable=False."
            )
        if isinstance(optimizer, (Adam, AdamW)) and isinstance(group["lr"], torch.Tensor):
            if not group["fused"] and not group["capturable"]:
                raise CaptureError(
                    f"optimizer parameter group {index} has a Tensor lr without fused=True or "
                    "capturable=True, which Adam itself rejects: pass lr as a float."
                )
        if isinstance(optimizer, SGD) and group["momentum"] != 0 and group["dampening"] != 0:
            missing = [p for p in group["params"] if "momentum_buffer" not in optimizer.state.get(p, {})]
            if missing:
                raise CaptureError(
                    f"optimizer parameter group {index} is SGD with dampening="
                    f"{group['dampening']} and no momentum buffer yet: its first step differs "
                    "from the steady one. Run one eager training step before capturing."
                )


def hyperparameters(optimizer: Optimizer) -> dict[str, object]:
    """``{"param_groups[i]['lr']": value, ...}``: each group's settings
    without its parameters and tensors, which a captured graph holds as
    constants."""
    return {f"param_groups[{index}][{key!r}]": value
            for index, group in enumerate(optimizer.param_groups)
            for key, value in group.items() if key != "params" and not isinstance(value, torch.Tensor)}


def init_state(optimizer: Optimizer) -> list[tuple[torch.Tensor, str]]:
    """Create missing optimizer state exactly as the optimizer's first step would
    before updating, without touching parameters. Returns what was created, so a
    failed capture can remove it again."""
    created = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not p.requires_grad:
                continue
            state = optimizer.state[p]
            for key, value in _initial_state(optimizer, group, p).items():
                if key not in state:
                    state[key] = value
                    created.append((p, key))
            if not state:
                del optimizer.state[p]
    return created


def remove_state(optimizer: Optimizer, created: list[tuple[torch.Tensor, str]]) -> None:
    """Undo init_state."""
    for p, key in created:
        state = optimizer.state[p]
        state.pop(key, None)
        if not state:
            del optimizer.state[p]


@contextlib.contextmanager
def new_state_removed_on_error(optimizer: Optimizer):
    """If the block raises, remove the optimizer state it created (the
    capture creates it before a first step): a failed call leaves the
    optimizer as it was. Only for blocks that run no real training step."""
    before = {id(p): set(state) for p, state in optimizer.state.items()}
    try:
        yield
    except BaseException:
        remove_state(optimizer, [(p, key) for p, state in list(optimizer.state.items())
                                 for key in state if key not in before.get(id(p), ())])
        for p in [p for p, state in optimizer.state.items() if not state and id(p) not in before]:
            del optimizer.state[p]  # (an empty entry made by looking a parameter up)
        raise


def _initial_state(optimizer: Optimizer, group: dict, p: torch.Tensor) -> dict:
    zeros = lambda: torch.zeros_like(p, memory_format=torch.preserve_format)  # noqa: E731
    if isinstance(optimizer, (Adam, AdamW)):
        # Same placement as Adam._init_group: on the parameter's device when
        # fused or capturable, else a float32 scalar on the CPU.
        on_device = group["fused"] or group["capturable"]
        state = {
            "step": torch.zeros((), dtype=torch.float32, device=p.device if on_device else "cpu"),
            "exp_avg": zeros(),
            "exp_avg_sq": zeros(),
        }
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = zeros()
        return state
    if group["momentum"] != 0:
        # SGD's first step sets buf = grad; with dampening 0 a zero buffer gives
        # buf = momentum * 0 + grad, the same bits.
        return {"momentum_buffer": zeros()}
    return {}


# In-place fused Adam(W) ops -> their functional twins (the graph's optimizer node).
FUNCTIONAL_FUSED = {
    aten._fused_adam_.default: aten._fused_adam.default,
    aten._fused_adam_.tensor_lr: aten._fused_adam.tensor_lr,
    aten._fused_adamw_.default: aten._fused_adamw.default,
    aten._fused_adamw_.tensor_lr: aten._fused_adamw.tensor_lr,
}


def functionalize_fused_steps(graph: fx.Graph) -> None:
    """Rewrite each traced in-place fused Adam(W) node as its functional twin
    plus one foreach copy back into parameters and state per list (and
    grads, when unscaled): one copy node per list instead of one copy_ per
    tensor, which for ResNet-152's 467 parameters spares 1,400 nodes.

    Done on the graph after tracing, not as a decomposition while tracing:
    make_fx would wrap every output of the functional op (2,335 for
    ResNet-152) in a fake tensor and a proxy, a fifth of the capture's time.
    Here the outputs' values are the inputs' own fake tensors, which is what
    they are when the graph runs (the op runs in place, EAGER_EQUIVALENTS)."""
    for node in [n for n in graph.nodes if n.op == "call_function" and n.target in FUNCTIONAL_FUSED]:
        lists = node.args[:5]
        with graph.inserting_after(node):
            functional = _op_node(graph, FUNCTIONAL_FUSED[node.target], node.args, node.kwargs)
        functional.meta["val"] = tuple([arg.meta["val"] for arg in inputs] for inputs in lists)
        outputs, last = [], functional
        for index, inputs in enumerate(lists):
            with graph.inserting_after(last):
                new_list = last = graph.call_function(operator.getitem, (functional, index))
            new_list.meta["val"] = functional.meta["val"][index]
            items = []
            for position, source in enumerate(inputs):
                with graph.inserting_after(last):
                    item = last = graph.call_function(operator.getitem, (new_list, position))
                item.meta["val"] = source.meta["val"]
                items.append(item)
            outputs.append(items)
        # params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs; grads too when unscaled
        copied = [0, 2, 3, 4] + ([1] if node.kwargs.get("grad_scale") is not None else [])
        for index in copied:
            if lists[index]:
                with graph.inserting_after(last):
                    last = _op_node(graph, aten._foreach_copy_.default, (lists[index], outputs[index]))
                last.meta["val"] = None
        graph.erase_node(node)


def _op_node(graph: fx.Graph, op, args, kwargs=None) -> fx.Node:
    """A call of ``op`` named as make_fx names it (``_fused_adam``, ``_foreach_copy_``)."""
    return graph.create_node("call_function", op, args, kwargs, name=op.overloadpacket.__name__)


@torch.library.custom_op("mutwo::foreach_addcdiv_", mutates_args=("tensors",))
def foreach_addcdiv_(tensors: list[torch.Tensor], tensor1: list[torch.Tensor], tensor2: list[torch.Tensor],
                     scalars: torch.Tensor) -> None:
    """``aten._foreach_addcdiv_.Tensor``, which foreach Adam issues on its
    traceable path with its step sizes in a CPU tensor. Fake tensors cannot
    run that op (its meta kernel reads the scalars' values), so the capture
    traces this op instead; running, it calls the aten op, which reads the
    values and runs the same kernel eager Adam runs with Python floats, so
    the update is the same to the bit."""
    aten._foreach_addcdiv_.Tensor(tensors, tensor1, tensor2, scalars)


@foreach_addcdiv_.register_fake
def _(tensors, tensor1, tensor2, scalars) -> None:
    return None


@torch.library.custom_op("mutwo::foreach_div_scalars_", mutates_args=("tensors",))
def foreach_div_scalars_(tensors: list[torch.Tensor], scalars: list[torch.Tensor]) -> None:
    """``aten._foreach_div_`` by one CPU scalar tensor per tensor, as foreach
    Adam divides by its bias corrections on its traceable path. aten runs
    that as a loop of divisions, which on a GPU multiply by the scalar's
    reciprocal, one kernel per tensor; eager Adam divides by Python floats in
    one foreach kernel. This runs eager's kernel with the scalars' values
    (read on the CPU: no synchronization)."""
    aten._foreach_div_.ScalarList(tensors, [s.item() for s in scalars])


@foreach_div_scalars_.register_fake
def _(tensors, scalars) -> None:
    return None


def _foreach_div_by_cpu_scalars(self, other):
    if all(t.dim() == 0 and t.device.type == "cpu" for t in other):
        return torch.ops.mutwo.foreach_div_scalars_.default(self, other)
    return NotImplemented  # tensors by tensors: trace aten's op as it is


# make_fx decomposition table of the capture.
CAPTURE_DECOMPOSITIONS = {
    aten._foreach_addcdiv_.Tensor: torch.ops.mutwo.foreach_addcdiv_.default,
    aten._foreach_div_.List: _foreach_div_by_cpu_scalars,
}


def _in_place_twin(in_place_op):
    def run_in_place(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, **kwargs):
        in_place_op(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, **kwargs)
        return params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs

    run_in_place.__name__ = f"{in_place_op.__name__.replace('.', '_')}_in_place"
    return run_in_place


def _foreach_copy_unless_same(self, src, non_blocking=False):
    """``_foreach_copy_`` without the pairs that copy a tensor into itself,
    which the foreach kernel would read and write in full."""
    pairs = [(dst, value) for dst, value in zip(self, src) if dst is not value]
    if pairs:
        aten._foreach_copy_.default([d for d, _ in pairs], [v for _, v in pairs], non_blocking=non_blocking)


# Running a captured graph: the functional fused Adam(W) runs as its in-place
# twin and the copies back into parameters and state that follow it then
# copy tensors into themselves, which are skipped. Values are the same, while
# memory and time are the eager optimizer's, not those of a second copy of
# the parameters and state.
EAGER_EQUIVALENTS = {
    aten._fused_adam.default: _in_place_twin(aten._fused_adam_.default),
    aten._fused_adam.tensor_lr: _in_place_twin(aten._fused_adam_.tensor_lr),
    aten._fused_adamw.default: _in_place_twin(aten._fused_adamw_.default),
    aten._fused_adamw.tensor_lr: _in_place_twin(aten._fused_adamw_.tensor_lr),
    aten._foreach_copy_.default: _foreach_copy_unless_same,
}


class EagerOptimizer(TorchDispatchMode):
    """Runs a captured graph's own code with EAGER_EQUIVALENTS, at the cost
    of one Python call per op: cheaper than copying and recompiling a graph
    of ten thousand nodes."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return EAGER_EQUIVALENTS.get(func, func)(*args, **(kwargs or {}))
