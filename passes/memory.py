"""Memory simulation with no GPU: live bytes per node by kind.

Each storage is allocated by the node that creates it and freed after the
last node that refers to it or reads a value referring to it; graph inputs
stay resident for the whole iteration, graph outputs to its end; in-place
ops and views allocate nothing. Optionally sizes are rounded up to 512
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
    r runs (its inputs still held, its outputs allocated)."""

    kinds: tuple[NodeType, ...]
    timeline: np.ndarray
    live_bytes: np.ndarray
    peak_during_bytes: np.ndarray
    peak_bytes: int
    peak_rank: int
    breakdown_at_peak: Mapping[NodeType, int]
    allocator_rounding: bool

    def timeline_of(self, kind: NodeType) -> np.ndarray:
        return self.timeline[self.kinds.index(kind)]


def storage_kind(key: int, storages: StorageMap, kinds: Mapping[fx.Node, NodeType],
                 marked: Mapping[int, NodeType]) -> NodeType:
    """An input keeps its placeholder's kind; a storage an activation or a
    gradient refers to is ACT or GRAD (a multi-output op such as
    convolution_backward makes a gradient and an OTHER at once); else the
    kind of the node that made it."""
    creator = storages.creator[key]
    if creator.op == "placeholder":
        return kinds[creator]
    return marked.get(key, kinds[creator])


def simulate_memory(nodes, rank, kinds, storages: StorageMap, allocator_rounding: bool = False) -> MemorySimulation:
    count = len(nodes)
    last_use = {}
    for node in nodes:
        r = rank[node]
        for key in storages.refs.get(node, ()):
            last_use[key] = max(last_use.get(key, r), r)
        for source in node.all_input_nodes:
            for key in storages.refs.get(source, ()):
                last_use[key] = max(last_use[key], r)
    marked = {}
    for wanted in (NodeType.GRAD, NodeType.ACT):  # ACT wins over GRAD
        marked.update({key: wanted for node, kind in kinds.items() if kind is wanted
                       for key in storages.refs.get(node, ())})
    # +bytes at creation, -bytes after last use; inputs and outputs live throughout
    allocated = np.zeros((len(KIND_ORDER), count + 1), dtype=np.int64)
    freed = np.zeros((len(KIND_ORDER), count + 1), dtype=np.int64)
    kind_index = {kind: i for i, kind in enumerate(KIND_ORDER)}
    output = nodes[-1]
    for key, creator in storages.creator.items():
        k = kind_index[storage_kind(key, storages, kinds, marked)]
        nbytes = rounded(storages.nbytes[key], allocator_rounding)
        start = 0 if creator.op == "placeholder" else rank[creator]
        end = count if creator.op == "placeholder" or last_use[key] >= rank[output] else last_use[key]
        allocated[k, start] += nbytes
        freed[k, end] += nbytes
    during = np.cumsum(allocated, axis=1) - np.concatenate(
        [np.zeros((len(KIND_ORDER), 1), dtype=np.int64), np.cumsum(freed, axis=1)[:, :-1]], axis=1)
    timeline = (during - freed)[:, :count]
    during = during[:, :count]
    peak_during = during.sum(axis=0)
    peak_rank = int(np.argmax(peak_during))
    breakdown = {kind: int(during[i, peak_rank]) for i, kind in enumerate(KIND_ORDER)}
    return MemorySimulation(KIND_ORDER, timeline, timeline.sum(axis=0), peak_during,
                            int(peak_during[peak_rank]), peak_rank, MappingProxyType(breakdown),
                            allocator_rounding)
