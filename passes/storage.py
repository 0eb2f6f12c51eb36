"""Storage facts from the fake values tracing leaves in ``node.meta['val']``:
which storages each node refers to, and which node first created each.
Views share their base's storage, so bytes are counted once per storage."""

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

import torch
import torch.utils._pytree as pytree
from torch import fx


@dataclass(frozen=True)
class StorageMap:
    """``refs``: node -> storage keys its value refers to; ``creator``: storage
    key -> node that first referred to it (in graph order); ``nbytes``:
    storage key -> size in bytes."""

    refs: Mapping[fx.Node, tuple[int, ...]]
    creator: Mapping[int, fx.Node]
    nbytes: Mapping[int, int]

    def created_by(self, node: fx.Node) -> tuple[int, ...]:
        return tuple(key for key in self.refs.get(node, ()) if self.creator[key] is node)

    def base_of(self, node: fx.Node) -> fx.Node | None:
        """The node that created the storage of ``node``'s value, if another node."""
        refs = self.refs.get(node, ())
        if refs and self.creator[refs[0]] is not node:
            return self.creator[refs[0]]
        return None


# Functional fused Adam(W): output list i is copied back into input list i
# (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs), so its outputs are
# the inputs updated in place, as the eager optimizer does.
IN_PLACE_FUNCTIONAL = ("aten._fused_adam.default", "aten._fused_adamw.default",
                       "aten._fused_adam.tensor_lr", "aten._fused_adamw.tensor_lr")


def _aliases(node: fx.Node) -> dict[int, int]:
    """Storage key of each output -> key of the input it updates in place."""
    if node.op != "call_function" or str(node.target) not in IN_PLACE_FUNCTIONAL:
        return {}
    aliases = {}
    for outputs, inputs in zip(node.meta["val"], node.args[:5]):
        for out, source in zip(outputs, inputs):
            aliases[out.untyped_storage()._cdata] = source.meta["val"].untyped_storage()._cdata
    return aliases


def map_storages(nodes: tuple[fx.Node, ...]) -> StorageMap:
    refs, creator, nbytes, aliases = {}, {}, {}, {}
    for node in nodes:
        aliases.update(_aliases(node))
        keys = []
        for leaf in pytree.tree_leaves(node.meta.get("val")):
            if isinstance(leaf, torch.Tensor):
                storage = leaf.untyped_storage()
                key = aliases.get(storage._cdata, storage._cdata)
                if key not in creator:
                    creator[key] = node
                    nbytes[key] = storage.nbytes()
                if key not in keys:
                    keys.append(key)
        if keys:
            refs[node] = tuple(keys)
    return StorageMap(MappingProxyType(refs), MappingProxyType(creator), MappingProxyType(nbytes))
