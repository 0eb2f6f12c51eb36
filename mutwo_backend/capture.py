"""Whole train-step capture: forward, loss, backward and optimizer step in ONE
fx graph.

The user's ``train_step(model, optimizer, *args)`` runs with the model's
parameters, buffers and the optimizer's state swapped for stand-ins
(``_reparametrize_module``), so the real tensors are never touched: copies
of them, on which the step runs for real while recording.py writes down its
ops, or fake tensors that make_fx traces where a step cannot be recorded
(then train_step's Python runs twice). The graph takes the real tensors as
inputs and updates them in place (copy_, in-place optimizer and batch-norm
ops), so running it is a real training iteration.
"""

import contextlib
import linecache
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable

import torch
import torch.optim.adam as adam_module
import torch.optim.optimizer as optimizer_module
import torch.utils._foreach_utils as foreach_utils
import torch.utils._pytree as pytree
from torch import fx, nn
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException, FakeTensor
from torch.fx._lazy_graph_module import _make_graph_module, _use_lazy_graph_module
from torch.fx.experimental.proxy_tensor import get_proxy_mode, make_fx
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode
from torch.nn.utils.stateless import _reparametrize_module
from torch.utils._python_dispatch import TorchDispatchMode

from passes.hints import GraphHints

from . import separator  # noqa: F401  (defines torch.ops.separator)
from .attribution import (MODULE_KEY, OpAttribution, annotate, annotate_last, attribution_of,
                          innermost_user_frame)
from .device_memory import free_bytes
from .errors import CaptureError
from .lifetimes import EagerLifetimes
from .optimizers import (CAPTURE_DECOMPOSITIONS, FUNCTIONAL_FUSED, EagerOptimizer, check_supported,
                         functionalize_fused_steps, hyperparameters, init_state, remove_state)
from .recording import StepRecorder, written_tensors

logger = logging.getLogger("mutwo")  # the package's logger, which the CLI shows
SEP = torch.ops.separator.sep.default
SEP_BACKWARD = torch.ops.separator.sep_backward.default
# what make_fx raises where the step reads tensor values
_DATA_DEPENDENT_ERRORS = (GuardOnDataDependentSymNode, DataDependentOutputException, DynamicOutputShapeException)
OPTIMIZER_UPDATE_OPS = frozenset({
    torch.ops.aten._fused_adam.default, torch.ops.aten._fused_adam.tensor_lr,
    torch.ops.aten._fused_adamw.default, torch.ops.aten._fused_adamw.tensor_lr,
})


@dataclass(frozen=True)
class InputRole:
    """What a placeholder of a train-step graph holds.

    kind is "param", "buffer", "opt_state" or "input"; name is the parameter or
    buffer's qualified name, ``<param>.<state key>`` for optimizer state, or
    ``args[i]...`` for the user's inputs."""

    kind: str
    name: str


class TrainStepGraph:
    """One captured training iteration.

    ``gm`` is the fx graph; calling the object runs one real iteration through
    it, updating the model's parameters and buffers and the optimizer's state
    in place, and returns what ``train_step`` returned."""

    def __init__(self, gm: fx.GraphModule, model: nn.Module, optimizer: torch.optim.Optimizer,
                 param_names: list[str], buffer_names: list[str],
                 state_keys: dict[str, list[str]], placeholder_roles: dict[str, InputRole],
                 freed_after: dict[str, str], traced_hyperparameters: dict[str, object],
                 traced_arguments: dict[str, object], capture_method: str):
        self.gm = gm
        self.model = model
        self.optimizer = optimizer
        self.param_names = param_names
        self.buffer_names = buffer_names
        self.state_keys = state_keys
        self.placeholder_roles = placeholder_roles
        # node name -> the node after which eager drops its last reference (lifetimes.py)
        self.freed_after = freed_after
        # the optimizer's settings and the non-tensor arguments the graph holds as constants
        self.traced_hyperparameters = traced_hyperparameters
        self.traced_arguments = traced_arguments
        # "recorded" (a real step on copies of the state) or "traced" (make_fx on fake tensors)
        self.capture_method = capture_method
        self.optimizer_params = _optimizer_params(optimizer)  # (ids: a step must not train others)

    @property
    def hints(self) -> GraphHints:
        """Roles of the placeholders, for passes.run_pipeline."""
        by_kind = lambda kind: frozenset(n for n, r in self.placeholder_roles.items() if r.kind == kind)  # noqa: E731
        frozen = {name for name, p in self.model.named_parameters() if not p.requires_grad}
        return GraphHints(
            params=by_kind("param"), buffers=by_kind("buffer"), opt_states=by_kind("opt_state"),
            frozen_params=frozenset(n for n, r in self.placeholder_roles.items()
                                    if r.kind == "param" and r.name in frozen),
            names=MappingProxyType({n: r.name for n, r in self.placeholder_roles.items()}),
            freed_after=MappingProxyType(self.freed_after))

    def graph_inputs(self, *args) -> tuple:
        """The real tensors the graph takes, in the structure it was traced with."""
        params = dict(self.model.named_parameters())
        buffers = dict(self.model.named_buffers())
        states = {name: {key: self.optimizer.state[params[name]][key] for key in keys}
                  for name, keys in self.state_keys.items()}
        return ({n: params[n] for n in self.param_names},
                {n: buffers[n] for n in self.buffer_names}, states, args)

    def __call__(self, *args):
        return self.run(*args)

    def run(self, *args, executor: Callable | None = None):
        """One real training iteration; ``executor`` (default: the graph's own
        code, fused Adam run in place) is called with the graph's inputs, e.g.
        an interpreter."""
        self._check_same_parameters()
        changed = _changed_hyperparameter(self.traced_hyperparameters, hyperparameters(self.optimizer))
        if changed:
            raise CaptureError(
                f"the optimizer's settings changed since the capture ({changed}), but the graph holds "
                "them as constants (a learning-rate scheduler, say): capture the step again after "
                "changing them, or train eagerly.")
        now = _non_tensor_arguments(args)
        changed = _first_change(self.traced_arguments, now, sorted(self.traced_arguments.keys() | now.keys()))
        if changed:
            path, old, new = changed
            raise CaptureError(
                f"train_step's argument {path} was {old!r} when captured and is {new!r} now, but the "
                "graph holds non-tensor arguments as constants: pass the value as a tensor, or "
                "capture the step again.")
        # Detached inputs, not no_grad: the graph's ops then build no autograd
        # graph and may update parameters in place, and kernels that behave
        # differently under no_grad (CPU LSTM keeps no workspace for its
        # backward) run as in training.
        inputs = pytree.tree_map_only(torch.Tensor, torch.Tensor.detach, self.graph_inputs(*args))
        with contextlib.nullcontext() if executor else EagerOptimizer():
            out, grads = (executor or self.gm)(*inputs)
        params = dict(self.model.named_parameters())
        for name, grad in zip(self.param_names, grads):
            params[name].grad = grad
        return out

    def _check_same_parameters(self) -> None:
        """The graph updates the parameters and buffers it was captured
        with: one added since would silently not train."""
        added = [name for name, _ in self.model.named_parameters() if name not in set(self.param_names)]
        added += [name for name, _ in self.model.named_buffers() if name not in set(self.buffer_names)]
        if added:
            raise CaptureError(
                f"the model has {', '.join(added[:3])}{' and more' if len(added) > 3 else ''} since the step "
                "was captured, which the graph would leave untrained: capture the step again.")
        if _optimizer_params(self.optimizer) != self.optimizer_params:
            raise CaptureError("the optimizer's parameters changed since the step was captured (a parameter "
                               "group added or removed), which the graph does not know: capture the step again.")

    def summary(self, top: int = 15) -> str:
        """Node count, the most frequent ops, and where the markers sit."""
        nodes = list(self.gm.graph.nodes)
        ops = Counter(str(n.target) for n in nodes if n.op == "call_function")
        rank = {n: i for i, n in enumerate(nodes)}
        lines = [f"nodes: {len(nodes)} ({len(self.placeholder_roles)} inputs, "
                 f"{len(self.param_names)} parameters, {len(self.buffer_names)} buffers)"]
        for label, wanted in (("sep", {SEP}), ("sep_backward", {SEP_BACKWARD}),
                              ("optimizer update", OPTIMIZER_UPDATE_OPS)):
            found = [f"{n.name} at rank {rank[n]}" for n in nodes if n.target in wanted]
            lines.append(f"{label}: {', '.join(found) if found else 'none (not a fused Adam/AdamW step)'}")
        lines.append(f"top {top} ops:")
        width = max((len(op) for op, _ in ops.most_common(top)), default=0)
        lines += [f"  {op:<{width}}  {count:>6}" for op, count in ops.most_common(top)]
        return "\n".join(lines)


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[int]:
    return [id(p) for group in optimizer.param_groups for p in group["params"]]


def capture_train_step(train_step: Callable, model: nn.Module,
                       optimizer: torch.optim.Optimizer, *example_args, record: bool = True) -> TrainStepGraph:
    """Trace ``train_step(model, optimizer, *example_args)`` into one fx graph.

    ``train_step`` must call ``mutwo_backend.sep`` on the model output before the
    loss, then ``loss.backward()``, ``optimizer.step()`` and (usually)
    ``optimizer.zero_grad()``. Missing optimizer state is created as the first
    step would; parameters are not changed.

    With ``record`` (the default) the step first runs for real on copies of
    the model's state and optimizer state, with the random number generators
    restored afterwards (recording.py: several times faster than make_fx);
    where it cannot be recorded, or the copies would not fit in the device's
    free memory, it is traced with make_fx on fake tensors, which gives the
    same graph."""
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    check_supported(optimizer, list(params.values()))
    _check_devices(params, buffers, example_args)

    created = init_state(optimizer)
    try:
        return _capture(train_step, model, optimizer, params, buffers, example_args, record)
    except BaseException:
        remove_state(optimizer, created)
        raise


def _capture(train_step, model, optimizer, params, buffers, example_args, record) -> TrainStepGraph:
    name_of = {id(p): n for n, p in params.items()}
    state_keys = {name_of[id(p)]: [k for k, v in s.items() if isinstance(v, torch.Tensor)]
                  for p, s in optimizer.state.items() if id(p) in name_of}
    states = {n: {k: optimizer.state[params[n]][k] for k in keys} for n, keys in state_keys.items()}
    inputs = (params, buffers, states, example_args)

    def step_on(watch, attribution, modes, p_in, b_in, s_in, args):
        """The user's step with the model and optimizer pointed at the given
        tensors, under ``modes`` (dispatch modes, entered in order), with
        ``attribution`` following the model's modules."""
        with _reparametrize_module(model, {**p_in, **b_in}, tie_weights=True), \
                _optimizer_on(optimizer, name_of, p_in, s_in), _fake_tensors_pass_foreach_checks(), \
                _grad_scaler_refused(), watch, attribution.tracking(), contextlib.ExitStack() as stack:
            for mode in modes:
                stack.enter_context(mode)
            out = train_step(model, optimizer, *args)
            grads = [p.grad for p in p_in.values()]
        return out, grads

    captured = _record(step_on, optimizer, model, inputs) if record else None
    method = "recorded" if captured is not None else "traced"
    if captured is None:
        captured = _trace(step_on, optimizer, model, inputs)
    gm, watch, freed_after = captured
    _check_graph(gm, watch)
    changed = _changed_hyperparameter(watch.hyperparameters, hyperparameters(optimizer))
    if changed:
        raise CaptureError(
            f"train_step changed the optimizer's settings after optimizer.step() ({changed}), but a "
            "graph holds them as constants: step learning-rate schedulers outside train_step, and "
            "capture again when they change the settings.")

    roles = _InputRoles(params, buffers, states, example_args)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return TrainStepGraph(gm, model, optimizer, list(params), list(buffers), state_keys,
                          {n.name: role for n, role in zip(placeholders, roles.flat)},
                          freed_after, watch.hyperparameters, _non_tensor_arguments(example_args), method)


def _trace(step_on, optimizer, model, inputs) -> tuple[fx.GraphModule, "_StepWatch", dict[str, str]]:
    """make_fx on fake tensors; the graph, its step watch and EagerLifetimes' answer."""
    watch = _StepWatch(optimizer)
    lifetimes = EagerLifetimes()
    attribution = OpAttribution(model)

    def traced_step(p_in, b_in, s_in, args):  # (make_fx names the graph's inputs after these)
        modes = (_TracedOps(lifetimes, attribution), _WritesToConstantsRefused())
        return step_on(watch, attribution, modes, p_in, b_in, s_in, args)

    try:
        # Tensors that are neither inputs nor made by the step (a plain tensor
        # attribute of the model, a loss's class weights) become graph constants.
        # (a lazy GraphModule: its code is generated once, after the rewrite below)
        with _use_lazy_graph_module(True):
            traced = make_fx(traced_step, tracing_mode="fake", _allow_non_fake_inputs=True,
                             decomposition_table=CAPTURE_DECOMPOSITIONS)(*inputs)
    except CaptureError:
        raise
    except Exception as error:
        read = _data_dependent_read(error)
        failed = f"tracing train_step failed: {type(error).__name__}: {error}"
        raise CaptureError(f"{read}\n{failed}" if read else f"{failed}\n{_why_tracing_failed(model)}") from error
    _functionalize_fused_steps(traced.graph)
    gm = _lazy_graph_module(traced, traced.graph)
    return gm, watch, lifetimes.freed_after(gm.graph.output_node())


def _record(step_on, optimizer, model, inputs) -> tuple[fx.GraphModule, "_StepWatch", dict[str, str]] | None:
    """The step recorded on copies of ``inputs`` (recording.py), or None
    where it cannot be: then the caller traces it."""
    device = next((t.device for t in pytree.tree_leaves(inputs) if isinstance(t, torch.Tensor)), None)
    copies_bytes = sum(s.nbytes() for s in _storages(inputs).values())
    if device is not None and device.type == "cuda" and copies_bytes > free_bytes(device) // 2:
        logger.info("capture: copies of the state (%s B) would not leave room for the step; tracing "
                    "with fake tensors", f"{copies_bytes:,}")
        return None
    watch = _StepWatch(optimizer)
    attribution = OpAttribution(model)
    recorder = StepRecorder(CAPTURE_DECOMPOSITIONS, attribution)
    try:
        copies = _copies(inputs)
        recorder.add_inputs(["p_in", "b_in", "s_in", "args"], copies)
        cuda_devices = [device] if device is not None and device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda_devices):
            graph = recorder.finish(step_on(watch, attribution, (recorder,), *copies))
        del copies
    except CaptureError:
        raise
    except Exception as error:  # whatever it was, make_fx handles it or names it
        logger.info("capture: could not record the step (%s: %s); tracing with fake tensors",
                    type(error).__name__, error)
        return None
    _functionalize_fused_steps(graph)
    gm = _lazy_graph_module(recorder.root, graph)
    return gm, watch, recorder.freed_after(graph.output_node())


def _functionalize_fused_steps(graph: fx.Graph) -> None:
    """optimizers.functionalize_fused_steps, whose new nodes take the
    attribution of the fused step they replace: the rewrite puts each
    step's nodes in its place, starting with the functional twin."""
    replaced = iter([attribution_of(n) for n in graph.nodes if n.target in FUNCTIONAL_FUSED])
    functionalize_fused_steps(graph)
    twins = set(FUNCTIONAL_FUSED.values())
    where = None
    for node in graph.nodes:
        if node.op == "call_function" and MODULE_KEY not in node.meta:
            if node.target in twins:
                where = next(replaced)
            annotate(node, where)


def _lazy_graph_module(root, graph: fx.Graph) -> fx.GraphModule:
    """A GraphModule whose Python code is generated when it is first called:
    the profiler interprets the graph, and after a recorded capture it may
    never call it (generating BERT-base's code: 0.26 s under cProfile on the H200's host)."""
    with _use_lazy_graph_module(True):
        return _make_graph_module(root, graph)


def _storages(tree) -> dict[int, torch.UntypedStorage]:
    """The distinct storages of the tensors in ``tree``."""
    return {t.untyped_storage()._cdata: t.untyped_storage()
            for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)}


def _copies(tree):
    """``tree`` with every tensor copied: same sizes, strides, offsets and
    requires_grad, and tensors that share a storage share the copy's."""
    owners = Counter(t.untyped_storage()._cdata for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor))
    shared = {}

    def copy(tensor):
        storage = tensor.untyped_storage()
        if owners[storage._cdata] == 1 and tensor.storage_offset() == 0 and tensor.is_contiguous() \
                and storage.nbytes() == tensor.numel() * tensor.element_size():
            twin = tensor.detach().clone()  # (set_ is 20 times slower)
        else:
            if storage._cdata not in shared:
                shared[storage._cdata] = torch.UntypedStorage(storage.nbytes(), device=storage.device).copy_(storage)
            twin = torch.empty(0, dtype=tensor.dtype, device=tensor.device).set_(
                shared[storage._cdata], tensor.storage_offset(), tensor.size(), tensor.stride())
        return twin.requires_grad_(tensor.requires_grad)

    return pytree.tree_map_only(torch.Tensor, copy, tree)


def _non_tensor_arguments(args) -> dict[str, object]:
    """``{"args[i]...": value}`` for every argument leaf that is not a tensor."""
    return {"args" + pytree.keystr(path): leaf for path, leaf in pytree.tree_flatten_with_path(tuple(args))[0]
            if not isinstance(leaf, torch.Tensor)}


def _first_change(traced: dict[str, object], now: dict[str, object], keys) -> tuple[str, object, object] | None:
    """``(key, traced value, value now)`` for the first of ``keys`` whose
    value differs (a missing key counts as None), or None."""
    for key in keys:
        old, new = traced.get(key), now.get(key)
        try:
            same = old is new or bool(old == new)
        except Exception:  # values whose == is not a truth value (arrays)
            same = False
        if not same:
            return key, old, new
    return None


def _changed_hyperparameter(traced: dict[str, object], now: dict[str, object]) -> str | None:
    """``"param_groups[i]['key']: traced -> now"`` for the first traced
    setting that differs. Keys added later (a scheduler's ``initial_lr``)
    are not read by the traced step."""
    changed = _first_change(traced, now, traced)
    if changed is None:
        return None
    key, old, new = changed
    return f"{key}: {old!r} -> {new!r}"


class _InputRoles:
    """The role of each graph input, flattened in the order make_fx flattens them."""

    def __init__(self, params, buffers, states, args):
        tree = ({n: InputRole("param", n) for n in params},
                {n: InputRole("buffer", n) for n in buffers},
                {n: {k: InputRole("opt_state", f"{n}.{k}") for k in s} for n, s in states.items()},
                pytree.tree_map_with_path(lambda path, _: InputRole("input", "args" + pytree.keystr(path)),
                                          tuple(args)))
        self.flat = pytree.tree_leaves(tree)


class _StepWatch:
    """Counts optimizer.step() calls while tracing and whether grads existed
    then, and puts each step on the optimizer's traceable path."""

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.steps = 0
        self.steps_with_grads = 0
        self.hyperparameters: dict[str, object] = {}
        self._in_step = contextlib.ExitStack()

    def _pre_hook(self, optimizer, args, kwargs):
        self.steps += 1
        self.hyperparameters = hyperparameters(optimizer)  # the values the graph takes
        if any(p.grad is not None for g in optimizer.param_groups for p in g["params"]):
            self.steps_with_grads += 1
        self._in_step.enter_context(_traceable_optimizer_step())

    def _post_hook(self, optimizer, args, kwargs):
        self._in_step.close()

    def __enter__(self):
        self._handles = [self.optimizer.register_step_pre_hook(self._pre_hook),
                         self.optimizer.register_step_post_hook(self._post_hook)]

    def __exit__(self, *exc):
        self._in_step.close()  # a step that raised never reached its post hook
        for handle in self._handles:
            handle.remove()


@contextlib.contextmanager
def _traceable_optimizer_step():
    """Let the optimizer keep step counts and bias corrections as tensors (its
    traceable path, as under torch.compile) instead of calling .item() on fake
    tensors. The step count is read as float64, so bias corrections are
    computed in double precision, as eager does with Python floats."""
    compiling, get_value = torch.compiler._is_compiling_flag, adam_module._get_value
    torch.compiler._is_compiling_flag = True
    adam_module._get_value = lambda x: x.to(torch.float64) if isinstance(x, torch.Tensor) else x
    try:
        yield
    finally:
        torch.compiler._is_compiling_flag, adam_module._get_value = compiling, get_value


class _TracedOps(TorchDispatchMode):
    """Inside make_fx, around the user's step, what the recorder does for
    each op of a recorded step: note its results' lifetimes and attribute
    its nodes to a module and a line. (One mode for both: each mode is a
    Python call per op.)"""

    def __init__(self, lifetimes: EagerLifetimes, attribution: OpAttribution):
        super().__init__()
        self.lifetimes = lifetimes
        self.attribution = attribution

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        where = self.attribution.current()
        mode = get_proxy_mode()
        if mode is None:  # (outside make_fx's tracing: no nodes)
            return func(*args, **(kwargs or {}))
        tracer = mode.tracer
        count = len(tracer.graph.nodes)
        out = func(*args, **(kwargs or {}))
        annotate_last(tracer.graph, len(tracer.graph.nodes) - count, where)
        self.lifetimes.watch_outputs(out, tracer)
        return out


class _WritesToConstantsRefused(TorchDispatchMode):
    """A tensor that is neither an input of the graph nor made by the step
    (a plain tensor attribute) is a constant of the graph, and make_fx runs
    ops on constants for real: an in-place update of one (a counter) would
    change the user's tensor while tracing. Refuse it before it runs."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for value in written_tensors(func, args, kwargs):
            if not isinstance(value, FakeTensor):
                raise CaptureError(
                    f"train_step updates in place ({func.overloadpacket.__name__}) a tensor of shape "
                    f"{tuple(value.shape)} that is not a parameter, buffer, optimizer state or "
                    "argument of the step: register it as a buffer (module.register_buffer) or "
                    "pass it as an argument, so that the graph takes it as an input.")
        return func(*args, **kwargs)


@contextlib.contextmanager
def _grad_scaler_refused():
    """An enabled GradScaler keeps its scale and growth tracker outside the
    model and optimizer, where a graph cannot take them as inputs: traced,
    the scale would be a constant of the graph and a fake tensor would be
    left in the user's scaler. Refuse it, naming the ways out."""
    scale = torch.amp.GradScaler.scale

    def refuse(scaler, outputs):
        if not scaler.is_enabled():
            return scale(scaler, outputs)
        raise CaptureError(
            "train_step uses torch.amp.GradScaler, whose scale lives outside the model and the "
            "optimizer, where a captured graph cannot follow it: profile the step through "
            "torch.compile(model, backend='mutwo_profile'), which leaves the scaler eager, or "
            "capture it without the scaler (bf16 autocast needs none).")

    torch.amp.GradScaler.scale = refuse
    try:
        yield
    finally:
        torch.amp.GradScaler.scale = scale


@contextlib.contextmanager
def _fake_tensors_pass_foreach_checks():
    """Let PyTorch choose foreach kernels for the traced tensors as it does
    for the real ones. Optimizers without ``foreach``/``fused`` set (foreach
    is their default on a GPU) and ``clip_grad_norm_`` take the foreach path
    only for tensors whose ``type()`` is Tensor or Parameter; fake tensors
    are neither, so the graph would otherwise hold per-tensor loops that
    eager training never runs, with other memory and time."""
    type_lists = (optimizer_module._foreach_supported_types, foreach_utils._foreach_supported_types)
    for types in type_lists:
        types.append(FakeTensor)
    try:
        yield
    finally:
        for types in type_lists:
            types.remove(FakeTensor)


@contextlib.contextmanager
def _optimizer_on(optimizer, name_of, traced_params, traced_states):
    """Point the optimizer's groups and state at the traced tensors; restore after."""
    saved_params = [group["params"] for group in optimizer.param_groups]
    saved_state = optimizer.state
    try:
        for group in optimizer.param_groups:
            group["params"] = [traced_params[name_of[id(p)]] for p in group["params"]]
        traced = defaultdict(dict)
        for name, state in traced_states.items():
            traced[traced_params[name]] = dict(state)
        optimizer.state = traced
        yield
    finally:
        for group, group_params in zip(optimizer.param_groups, saved_params):
            group["params"] = group_params
        optimizer.state = saved_state


def _data_dependent_read(error: BaseException) -> str | None:
    """Where an error of make_fx's is the step reading a tensor's value
    (.item(), .tolist(), bool(tensor), if on a tensor, a boolean mask): the
    user's line that does it, first, and what to do; else None."""
    chain, cause = [], error
    while cause is not None and cause not in chain:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    found = next((e for e in chain if isinstance(e, _DATA_DEPENDENT_ERRORS)
                  or "data-dependent" in str(e) or "data dependent" in str(e)), None)
    if found is None:
        return None
    frame = innermost_user_frame(found.__traceback__) or innermost_user_frame(error.__traceback__)
    read = "train_step reads a tensor's value"
    if frame is not None:
        filename, line = frame
        read = f"{filename}:{line} reads a tensor's value: `{linecache.getline(filename, line).strip()}`"
    return (f"{read}\nThe capture runs train_step on fake tensors, which hold no values, so train_step "
            "must not read tensor values (.item(), .tolist(), bool(tensor), if on a tensor, a boolean "
            "mask). Move the read out of train_step (onto what it returns), or compute it with tensor "
            "ops (torch.where instead of an if); or profile through torch.compile(model, "
            "backend='mutwo_profile'), which graph-breaks there.")


def _why_tracing_failed(model: nn.Module) -> str:
    rnns = [type(m).__name__ for m in model.modules() if isinstance(m, nn.RNNBase)]
    if rnns and any(p.is_cuda for p in model.parameters()):
        return (f"The model holds {rnns[0]} on a GPU: cuDNN's recurrent kernels cannot run on the "
                "fake tensors the capture traces with (a PyTorch limitation). Capture it on the CPU, "
                "where the step traces.")
    return ("The capture runs train_step once on fake tensors: it must not read tensor values "
            "(.item(), print of a tensor, if on a tensor).")


def _check_devices(params, buffers, args) -> None:
    devices = {str(t.device) for t in [*params.values(), *buffers.values()]}
    if len(devices) > 1:
        raise CaptureError(f"the model's parameters and buffers are on several devices "
                           f"({', '.join(sorted(devices))}): move the whole model to one device.")
    for path, leaf in pytree.tree_flatten_with_path(tuple(args))[0]:
        if isinstance(leaf, torch.Tensor) and devices and str(leaf.device) not in devices:
            raise CaptureError(
                f"input args{pytree.keystr(path)} is on {leaf.device} but the model is on "
                f"{devices.pop()}: move the inputs to the model's device (x.to(device)).")


def _check_graph(gm: fx.GraphModule, watch: _StepWatch) -> None:
    targets = Counter(n.target for n in gm.graph.nodes)
    if targets[SEP] == 0:
        raise CaptureError("train_step never called mutwo_backend.sep: call "
                           "`out = mutwo_backend.sep(model(x))` on the model output, then compute "
                           "the loss from `out`.")
    if targets[SEP] > 1:
        raise CaptureError(f"train_step called mutwo_backend.sep {targets[SEP]} times: call it "
                           "exactly once, on the model output, before the loss. With gradient "
                           "accumulation, capture a step of one micro-batch (forward, backward, "
                           "optimizer step), or profile through torch.compile(backend='mutwo_profile').")
    if watch.steps == 0:
        raise CaptureError("train_step never called optimizer.step(): call it after "
                           "loss.backward() so the graph holds the optimizer update.")
    if watch.steps_with_grads == 0:
        raise CaptureError("train_step never called loss.backward() before optimizer.step(): "
                           "no parameter had a gradient, so the graph holds no backward pass.")
    if targets[SEP_BACKWARD] == 0:
        raise CaptureError("the loss does not depend on the output of mutwo_backend.sep, so "
                           "backward never crosses the separator: compute the loss from the "
                           "tensor that sep returns.")
