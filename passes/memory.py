"""Memory simulation with no GPU: live bytes per node by kind.

Each storage is allocated by the node that creates it and freed after the
last node that refers to it or reads a value referring to it, or later where
eager holds a reference longer (``freed_after``: a train step's local
``out = model(x)``, a gradient in .grad until zero_grad); graph inputs stay
resident for the whole iteration, graph outputs to its end; in-place ops and
views allocate nothing. Optionally sizes are rounded up to 512
bytes, as the CUDA caching allocator does."""

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

import numpy as np
from torch import fx

from .kinds import NodeType
from .storage import StorageMap

ALLOCATOR_ROUNDING_BYTES = 512
KIND_ORDER = tuple(NodeType)


def rounded(nbytes: int, allocator_rounding: bool) -> int:
    if not allocator_rounding or nbytes == 0:
        return nbytes
    return -(-nbytes // ALLOCATOR_ROUNDING_BYTES) * ALLOCATOR_ROUNDING_BYTES


@dataclass(frozen=True)
class MemorySimulation:
    """``timeline[k, r]``: bytes of kind ``kinds[k]`` live after node r;
    ``live_bytes[r]``: all of them; ``peak_during_bytes[r]``: live while node
    r runs (its inputs still held, its outputs allocated).

    Per storage key (StorageMap's): ``storage_kind``; ``allocated_rank``
    (0 for a graph input, resident before the step); ``freed_rank``, the rank
    after which the simulation frees it (None: it lives to the end, as
    inputs and outputs do), where eager drops its last reference when that
    comes after its last use; ``last_use_rank``, its last use in the graph
    alone. A storage is live after rank r when allocated_rank <= r <
    freed_rank, and while r runs when allocated_rank <= r <= freed_rank."""

    kinds: tuple[NodeType, ...]
    timeline: np.ndarray
    live_bytes: np.ndarray
    peak_during_bytes: np.ndarray
    peak_bytes: int
    peak_rank: int
    breakdown_at_peak: Mapping[NodeType, int]
    allocator_rounding: bool
    storage_kind: Mapping[int, NodeType]
    allocated_rank: Mapping[int, int]
    freed_rank: Mapping[int, int | None]
    last_use_rank: Mapping[int, int]

    def timeline_of(self, kind: NodeType) -> np.ndarray:
        return self.timeline[self.kinds.index(kind)]


def storage_kinds(storages: StorageMap, kinds: Mapping[fx.Node, NodeType]) -> dict[int, NodeType]:
    """A placeholder's storage keeps its placeholder's kind. Any other storage
    is ACT if an activation refers to it, else GRAD if a gradient does (an
    activation may be a view or an in-place result of a node of another kind,
    and a multi-output op such as convolution_backward makes a gradient and
    an OTHER at once), else the kind of the node that created it."""
    marked = {}
    for wanted in (NodeType.GRAD, NodeType.ACT):  # ACT wins over GRAD
        marked.update({key: wanted for node, kind in kinds.items() if kind is wanted
                       for key in storages.refs.get(node, ())})
    return {key: kinds[creator] if creator.op == "placeholder" else marked.get(key, kinds[creator])
            for key, creator in storages.creator.items()}


def last_uses(nodes, rank, storages: StorageMap, freed_after: Mapping[fx.Node, fx.Node]) -> dict[int, int]:
    """Rank after which each storage is free: the last reader of any node
    that refers to it (a container such as a multi-output op's tuple holds
    its storages until its last getitem), or where eager drops the node's
    last reference if that comes later."""
    last_use = {}
    for node in nodes:
        until = max([rank[user] for user in node.users] + [rank[node]] +
                    ([rank[freed_after[node]]] if node in freed_after else []))
        for key in storages.refs.get(node, ()):
            if last_use.get(key, -1) < until:
                last_use[key] = until
    return last_use


def simulate_memory(nodes, rank, kinds, storages: StorageMap, allocator_rounding: bool = False,
                    freed_after: Mapping[fx.Node, fx.Node] = MappingProxyType({})) -> MemorySimulation:
    count = len(nodes)
    last_use = last_uses(nodes, rank, storages, freed_after)
    kind_of = storage_kinds(storages, kinds)
    kind_index = {kind: i for i, kind in enumerate(KIND_ORDER)}
    output_rank = rank[nodes[-1]]
    # +bytes at creation, -bytes after last use; inputs and outputs live throughout
    allocated = np.zeros((len(KIND_ORDER), count + 1), dtype=np.int64)
    freed = np.zeros((len(KIND_ORDER), count + 1), dtype=np.int64)
    allocated_rank, freed_rank = {}, {}
    for key, creator in storages.creator.items():
        k = kind_index[kind_of[key]]
        nbytes = rounded(storages.nbytes[key], allocator_rounding)
        resident = creator.op == "placeholder"
        allocated_rank[key] = 0 if resident else rank[creator]
        freed_rank[key] = None if resident or last_use[key] >= output_rank else last_use[key]
        allocated[k, allocated_rank[key]] += nbytes
        freed[k, count if freed_rank[key] is None else freed_rank[key]] += nbytes
    held = np.cumsum(allocated, axis=1)[:, :count]
    freed_through = np.cumsum(freed, axis=1)[:, :count]
    during = held - freed_through + freed[:, :count]  # frees at rank r happen after node r
    timeline = held - freed_through
    peak_during = during.sum(axis=0)
    peak_rank = int(np.argmax(peak_during))
    breakdown = {kind: int(during[i, peak_rank]) for i, kind in enumerate(KIND_ORDER)}
    graph_last_use = last_uses(nodes, rank, storages, {}) if freed_after else last_use
    return MemorySimulation(KIND_ORDER, timeline, timeline.sum(axis=0), peak_during,
                            int(peak_during[peak_rank]), peak_rank, MappingProxyType(breakdown),
                            allocator_rounding, MappingProxyType(kind_of), MappingProxyType(allocated_rank),
                            MappingProxyType(freed_rank), MappingProxyType(graph_last_use))
