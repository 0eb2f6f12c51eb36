"""Record a train step into an fx graph by running it once for real.

make_fx traces a step on fake tensors, and that costs a few milliseconds of
Python per op (fake-tensor dispatch and caching, proxies, metadata): about
3 s for ResNet-152 on an H200, longer than the step's own kernels. The
recorder instead runs the step on copies of the model's state, watches
every aten op the step issues (a TorchDispatchMode, as make_fx does), and
writes the graph make_fx would write: the same ops and names, the same
getitem nodes, graph constants and input structure, and in ``meta['val']``
tensors on the ``meta`` device with the sizes, strides and storage sharing
of the real values.

Anything the recorder cannot copy exactly (a data-dependent op such as
``.item()`` on a traced tensor, an in-place write to a tensor that is not an
input, a tensor subclass) raises ``NotRecordable``; the capture then traces
with make_fx, which gives the canonical error or handles the case.
"""

import operator

import torch
import torch.utils._pytree as pytree
from torch import fx, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakTensorKeyDictionary

from passes.storage import tensors_in

from .attribution import OpAttribution, annotate, attribution_of
from .lifetimes import LastReferences

aten = torch.ops.aten
# op arguments a graph holds as they are
_LITERALS = (bool, int, float, complex, str, torch.dtype, torch.device, torch.layout, torch.memory_format)
_DATA_DEPENDENT_TAGS = (torch.Tag.data_dependent_output, torch.Tag.dynamic_output_shape)


class NotRecordable(Exception):
    """The step did something a recording cannot turn into the graph make_fx would trace."""


class StepRecorder(TorchDispatchMode):
    """Enter around the step, after ``add_inputs``; then ``finish(outputs)``
    returns the graph, whose constants ``root`` holds, and
    ``freed_after(...)`` when eager dropped each value. ``decompositions``
    is the capture's make_fx decomposition table, applied the same way;
    ``attribution`` names each node's module and source line (a
    decomposed op's nodes take the op's)."""

    def __init__(self, decompositions: dict, attribution: OpAttribution):
        super().__init__()
        self.decompositions = decompositions
        self.attribution = attribution
        self._decomposed = None  # the attribution of the op being decomposed
        self.root = nn.Module()  # holds the graph's constants
        self.graph = fx.Graph()
        self._node_of = WeakTensorKeyDictionary()  # real tensor -> the node whose value it is
        # hash(ScriptObject) (its C++ value's id; its Python wrappers differ) -> (it, its node)
        self._opaque: dict[int, tuple[object, fx.Node]] = {}
        self._constants: dict[int, tuple[torch.Tensor, str, torch.Tensor]] = {}  # id -> (it, name, meta)
        self._constant_storages: dict[int, torch.UntypedStorage] = {}
        self._in_decomposition = 0
        self._names: dict = {}  # op -> the name make_fx gives its nodes
        self._in_spec = None
        self._arg_names: list[str] = []
        self._references = LastReferences()  # when eager drops each value, as EagerLifetimes notes it

    # graph inputs

    def add_inputs(self, names: list[str], values: tuple) -> None:
        """One placeholder per tensor leaf of each of ``values``, named as
        make_fx names them (``p_in_1``, ``p_in_2``, ...)."""
        self._arg_names = list(names)
        self._in_spec = pytree.tree_flatten(tuple(values))[1]
        seen_storages: dict[int, torch.UntypedStorage] = {}
        for name, value in zip(names, values):
            for index, leaf in enumerate(pytree.tree_leaves(value), start=1):
                node = self.graph.placeholder(f"{name}_{index}")
                if isinstance(leaf, torch.Tensor):
                    self._check_plain(leaf, "a graph input")
                    node.meta["val"] = _meta_like(leaf, seen_storages)
                    self._node_of[leaf] = node
                else:
                    node.meta["val"] = leaf

    # recording

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        where = self._decomposed if self._in_decomposition else self.attribution.current()
        decomposition = self.decompositions.get(func)
        if decomposition is not None:
            self._in_decomposition += 1
            outer, self._decomposed = self._decomposed, where
            try:
                with self:
                    out = decomposition(*args, **kwargs)
            finally:
                self._in_decomposition -= 1
                self._decomposed = outer
            if out is not NotImplemented:
                self._watch_outputs(out)
                return out
        flat_inputs = list(tensors_in((args, tuple(kwargs.values()))))
        traced_inputs = [x for x in flat_inputs if x in self._node_of]
        self._refuse_unrecordable(func, args, kwargs, flat_inputs, traced_inputs)
        if not traced_inputs and torch.Tag.data_dependent_output in func.tags:
            return func(*args, **kwargs)  # a value of constants: baked into the graph, as make_fx does
        if func is aten.lift_fresh.default:  # as make_fx: a constant must not be written through
            func = aten.lift_fresh_copy.default
        name = self._names.get(func)
        if name is None:  # (fx's name mangling is a regex: a fifth of the recording, uncached)
            name = self._names[func] = self.graph._target_to_str(func.overloadpacket.__name__)
        node = self.graph.create_node("call_function", func, self._to_nodes(args), self._to_nodes(kwargs),
                                      name=name)
        annotate(node, where)
        # (read before the op runs: set_ gives a tensor another storage)
        input_storages = {x.untyped_storage()._cdata: self._value_of(x).untyped_storage() for x in flat_inputs}
        out = func(*args, **kwargs)
        self._track(out, node, input_storages, {})
        self._watch_outputs(out)
        return out

    def _refuse_unrecordable(self, func, args, kwargs, flat_inputs, traced_inputs) -> None:
        for x in flat_inputs:
            self._check_plain(x, f"an argument of {func}")
        if traced_inputs and any(tag in func.tags for tag in _DATA_DEPENDENT_TAGS) and not _static_index(func, args):
            raise NotRecordable(f"{func} reads the values of a traced tensor (data-dependent code)")
        if any(t not in self._node_of for t in written_tensors(func, args, kwargs)):
            raise NotRecordable(f"{func} writes in place to a tensor that is not an input of the step")

    @staticmethod
    def _check_plain(tensor: torch.Tensor, what: str) -> None:
        if type(tensor) not in (torch.Tensor, nn.Parameter) or tensor.layout != torch.strided:
            raise NotRecordable(f"{what} is a {type(tensor).__name__} with layout {tensor.layout}")

    def _to_nodes(self, value):
        """Arguments as graph arguments: traced tensors become their nodes,
        other tensors graph constants (a new get_attr node per use, as make_fx)."""
        if isinstance(value, torch.Tensor):
            node = self._node_of.get(value)
            return node if node is not None else self._constant(value)
        if isinstance(value, (list, tuple)):
            return type(value)(self._to_nodes(v) for v in value)
        if isinstance(value, dict):
            return {k: self._to_nodes(v) for k, v in value.items()}
        if isinstance(value, torch.ScriptObject) and hash(value) in self._opaque:
            return self._opaque[hash(value)][1]
        if value is None or isinstance(value, _LITERALS):
            return value
        # a storage (cuDNN's RNN sets its weight buffer to the weights'), an
        # unknown script object: baked in, the graph would keep reading the copies
        raise NotRecordable(f"an op argument is a {type(value).__name__}, which a graph can only hold as it is")

    def _constant(self, tensor: torch.Tensor) -> fx.Node:
        known = self._constants.get(id(tensor))
        if known is None:
            prefix = "_param_constant" if isinstance(tensor, nn.Parameter) else "_tensor_constant"
            name = f"{prefix}{sum(n.startswith(prefix) for _, n, _ in self._constants.values())}"
            setattr(self.root, name, tensor)  # (which keeps it alive: its id and storage stay its own)
            known = self._constants[id(tensor)] = (tensor, name, _meta_like(tensor, self._constant_storages))
        node = self.graph.get_attr(known[1])
        node.meta["val"] = known[2]
        return node

    def _value_of(self, tensor: torch.Tensor) -> torch.Tensor:
        """The meta value of an op's tensor argument (a node's, or a constant's)."""
        node = self._node_of.get(tensor)
        return node.meta["val"] if node is not None else self._constants[id(tensor)][2]

    def _track(self, out, node: fx.Node, input_storages: dict, fresh: dict):
        """Give ``out`` (an op's result) ``node``, with getitem nodes for the
        items of tuples and lists, and meta values that share storage where
        the real values do: with an input (views, in-place results) or with
        another output of the same op. Returns the meta value."""
        if isinstance(out, torch.Tensor):
            real = out.untyped_storage()._cdata
            storage = input_storages.get(real)
            if storage is None:
                storage = fresh.setdefault(real, torch.UntypedStorage(out.untyped_storage().nbytes(),
                                                                       device="meta"))
            node.meta["val"] = _meta_on(storage, out)
            self._node_of[out] = node
        elif isinstance(out, (tuple, list)):
            values = [self._track(item, self._getitem(node, index), input_storages, fresh)
                      for index, item in enumerate(out)]
            node.meta["val"] = values if isinstance(out, list) else tuple(values)
        elif isinstance(out, torch.ScriptObject):  # a profiler range's handle
            self._opaque[hash(out)] = (out, node)
            node.meta["val"] = out
        elif out is not None and not isinstance(out, (int, float, bool)):
            raise NotRecordable(f"{node.target} returned a {type(out).__name__}")
        return node.meta.get("val")

    def _getitem(self, node: fx.Node, index: int) -> fx.Node:
        """A getitem node of ``node``'s result, attributed as ``node``."""
        item = self.graph.create_node("call_function", operator.getitem, (node, index), name="getitem")
        annotate(item, attribution_of(node))
        return item

    def _watch_outputs(self, out) -> None:
        """Note when Python drops each tensor the op returned (not inside a
        decomposition, whose inner ops eager never sees)."""
        if self._in_decomposition:
            return
        for value in tensors_in(out):
            node = self._node_of.get(value)
            if node is not None:
                self._references.watch(value, node)

    # result

    def finish(self, outputs) -> fx.Graph:
        """The graph returning ``outputs`` (the step's results), flattened as
        make_fx flattens them and called with the inputs' structure. Its
        constants are attributes of ``self.root``."""
        leaves, out_spec = pytree.tree_flatten(outputs)
        self.graph.output([self._to_nodes(leaf) for leaf in leaves])
        self.graph._codegen = fx.graph._PyTreeCodeGen(
            fx.graph._PyTreeInfo(self._arg_names, self._in_spec, out_spec))
        return self.graph

    def freed_after(self, last: fx.Node) -> dict[str, str]:
        """For each watched node, the node after which eager dropped its last
        reference (EagerLifetimes.freed_after): call it once the step's real
        values are dropped."""
        return self._references.freed_after(last)


def written_tensors(func, args, kwargs) -> list[torch.Tensor]:
    """The tensors ``func`` writes in place (its ``Tensor(a!)`` arguments,
    lists of them included)."""
    if not func._schema.is_mutable:
        return []
    written = []
    for index, argument in enumerate(func._schema.arguments):
        if argument.alias_info is not None and argument.alias_info.is_write:
            value = args[index] if index < len(args) else kwargs.get(argument.name)
            written += tensors_in(value)
    return written


def _static_index(func, args) -> bool:
    """Indexing by integer tensors (swin's relative position table): its
    shape is the indices', whatever their values; only masks make it data-dependent."""
    return func is aten.index.Tensor and all(
        index is None or index.dtype not in (torch.bool, torch.uint8) for index in args[1])


def _meta_on(storage: torch.UntypedStorage, like: torch.Tensor) -> torch.Tensor:
    """A meta tensor on ``storage`` with ``like``'s dtype, sizes, strides and offset."""
    return torch.empty(0, dtype=like.dtype, device="meta").set_(
        storage, like.storage_offset(), like.size(), like.stride())


def _meta_like(tensor: torch.Tensor, storages: dict[int, torch.UntypedStorage]) -> torch.Tensor:
    """A meta copy of ``tensor``; tensors on one real storage share one meta storage."""
    real = tensor.untyped_storage()
    storage = storages.setdefault(real._cdata, torch.UntypedStorage(real.nbytes(), device="meta"))
    return _meta_on(storage, tensor)
