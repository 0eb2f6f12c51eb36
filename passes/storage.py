"""Storage facts from the fake values tracing leaves in ``node.meta['val']``:
which storages each node refers to, and which node created each. Views and
in-place results share their input's storage, so bytes are counted once per
storage, by the node that allocated it."""

from dataclasses import dataclass
from types import MappingProxyType
from typing import Iterator, Mapping

import torch
from torch import fx

from .errors import AnalysisError

# Functional fused optimizers: output list i is copied back into input list i
# (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs), so their outputs are
# the inputs updated in place, as the eager optimizer does.
FUSED_ADAM_TARGETS = ("aten._fused_adam.default", "aten._fused_adamw.default",
                      "aten._fused_adam.tensor_lr", "aten._fused_adamw.tensor_lr")


@dataclass(frozen=True)
class StorageMap:
    """``refs``: node -> keys of the storages its value refers to;
    ``creator``: key -> the node that allocated it (a multi-output op, not its
    getitem); ``owner``: key -> the first node whose value is a single tensor
    on it (what a view is a view of); ``nbytes``: key -> size in bytes."""

    refs: Mapping[fx.Node, tuple[int, ...]]
    creator: Mapping[int, fx.Node]
    owner: Mapping[int, fx.Node]
    nbytes: Mapping[int, int]

    def created_by(self, node: fx.Node) -> tuple[int, ...]:
        return tuple(key for key in self.refs.get(node, ()) if self.creator[key] is node)

    def base_of(self, node: fx.Node) -> fx.Node | None:
        """The node whose storage ``node``'s value lives in, when another node
        (views, in-place results); None when the value owns its storage."""
        refs = self.refs.get(node, ())
        if not refs:
            return None
        owner = self.owner.get(refs[0], self.creator[refs[0]])
        return None if owner is node else owner


def _aliases(node: fx.Node) -> dict[int, int]:
    """Storage key of each output -> key of the input it updates in place."""
    if node.op != "call_function" or str(node.target) not in FUSED_ADAM_TARGETS:
        return {}
    aliases = {}
    for outputs, inputs in zip(node.meta["val"], node.args[:5]):
        for out, source in zip(outputs, inputs):
            aliases[_key(out)] = _key(source.meta["val"])
    return aliases


def _key(tensor: torch.Tensor) -> int:
    """Identity of a tensor's storage (the same StorageImpl for every view)."""
    return tensor.untyped_storage()._cdata


def tensors_in(value) -> Iterator[torch.Tensor]:
    """The tensors in a node's value (or an op's arguments): one, or nested
    in the tuples and lists of multi-output and foreach ops (a plain walk,
    faster than pytree)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from tensors_in(item)


def map_storages(nodes: tuple[fx.Node, ...]) -> StorageMap:
    # (an input nothing reads, such as a string argument, needs no value)
    missing = [n.name for n in nodes if n.op == "placeholder" and "val" not in n.meta and n.users]
    if missing:
        raise AnalysisError(
            f"placeholder(s) {', '.join(missing[:5])} carry no meta['val']: the passes read sizes "
            "and storages from fake values. Trace the graph with make_fx (tracing_mode='fake'), "
            "capture it with mutwo_backend.capture_train_step, or run "
            "torch.fx.passes.fake_tensor_prop.FakeTensorProp over it first.")
    refs, creator, owner, nbytes, aliases = {}, {}, {}, {}, {}
    for node in nodes:
        aliases.update(_aliases(node))
        value = node.meta.get("val")
        keys = []
        for tensor in tensors_in(value):
            storage = tensor.untyped_storage()
            key = aliases.get(storage._cdata, storage._cdata)
            if key not in creator:
                creator[key] = node
                nbytes[key] = _concrete_bytes(storage.nbytes(), node)
            if key not in keys:
                keys.append(key)
        if isinstance(value, torch.Tensor) and keys[0] not in owner:
            # a getitem of a multi-output op owns what its op allocated
            owner[keys[0]] = node
        if keys:
            refs[node] = tuple(keys)
    return StorageMap(MappingProxyType(refs), MappingProxyType(creator), MappingProxyType(owner),
                      MappingProxyType(nbytes))


def _concrete_bytes(size, node: fx.Node) -> int:
    """A storage's size in bytes. A graph compiled with dynamic shapes (dynamo
    recompiles so when a batch size changes) has symbolic sizes: take the
    size of the example it was compiled for."""
    if not isinstance(size, torch.SymInt):
        return size
    hint = size.node.hint
    if hint is None:
        try:
            hint = size.node.shape_env.size_hint(size.node.expr)
        except Exception as error:
            raise AnalysisError(f"node {node.name} allocates {size} bytes, a size that depends on "
                                "tensor values and has no example: the passes cannot size it.") from error
    return int(hint)
