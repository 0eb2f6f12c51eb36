"""Activation liveness: when each activation is created, last read in the
forward pass (forward or loss region), and first and last read in backward."""

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

from torch import fx

from .boundary import Boundary
from .kinds import FORWARD_REGIONS, NodeType, reads_in_backward
from .storage import StorageMap


@dataclass(frozen=True)
class ActivationInfo:
    """One activation. ``memory_bytes`` is its storage's size, counted for the
    first activation on a storage only (0 for later views of it, and for views
    of parameters or inputs, whose bytes belong to those); ``base`` is the
    node that created that storage when it is another node."""

    node: fx.Node
    creation_rank: int
    last_fw_rank: int
    first_bw_rank: int
    last_bw_rank: int
    memory_bytes: int
    base: fx.Node | None


def activation_liveness(nodes, rank: Mapping[fx.Node, int], boundary: Boundary,
                        kinds: Mapping[fx.Node, NodeType], storages: StorageMap,
                        storage_bytes) -> Mapping[fx.Node, ActivationInfo]:
    regions = boundary.regions
    # A joint graph's buffer mutations (batch norm's running statistics) rank
    # after its backward nodes but run at the end of the forward graph.
    forward_end = boundary.sep_rank - 1 if boundary.joint else len(nodes)
    owned = set()
    infos = {}
    for node in nodes:
        if kinds[node] is not NodeType.ACT:
            continue
        creation = rank[node]
        fw_reads = [min(rank[u], forward_end) for u in node.users
                    if regions[u] in FORWARD_REGIONS and not boundary.runs_backward(u)]
        bw_reads = [rank[u] for u in node.users if reads_in_backward(u, boundary)]
        memory = 0
        for key in storages.refs.get(node, ()):
            creator = storages.creator[key]
            if key not in owned and creator.op != "placeholder":
                owned.add(key)
                memory += storage_bytes(key)
        infos[node] = ActivationInfo(node, creation, max(fw_reads, default=creation), min(bw_reads),
                                     max(bw_reads), memory, storages.base_of(node))
    return MappingProxyType(infos)
