"""run_pipeline: the passes chained over one fx graph into a GraphAnalysis,
the single source of truth the interpreter and reports read."""

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

from torch import fx

from .boundary import Boundary, Region, find_boundary
from .hints import GraphHints
from .kinds import NodeKinds, NodeType, classify
from .liveness import ActivationInfo, activation_liveness
from .memory import MemorySimulation, rounded, simulate_memory
from .recompute import RecomputeInfo, recompute_subgraphs
from .storage import StorageMap, map_storages


@dataclass(frozen=True)
class GraphAnalysis:
    """Everything the passes found out about one graph, keyed by fx node."""

    nodes: tuple[fx.Node, ...]
    rank: Mapping[fx.Node, int]
    boundary: Boundary
    regions: Mapping[fx.Node, Region]
    kinds: Mapping[fx.Node, NodeType]
    grads: Mapping[fx.Node, fx.Node]  # parameter placeholder -> its gradient node
    frozen_params: tuple[fx.Node, ...]
    storages: StorageMap
    output_bytes: Mapping[fx.Node, int]  # bytes of the storages a node creates
    activations: Mapping[fx.Node, ActivationInfo]
    recompute: Mapping[fx.Node, RecomputeInfo]
    memory: MemorySimulation

    @property
    def sep_rank(self) -> int:
        return self.boundary.sep_rank

    @property
    def sep_backward_rank(self) -> int:
        return self.boundary.sep_backward_rank


def run_pipeline(gm: fx.GraphModule, hints: GraphHints | None = None,
                 allocator_rounding: bool = False) -> GraphAnalysis:
    """Boundary -> node kinds -> liveness -> recompute -> memory simulation."""
    nodes = tuple(gm.graph.nodes)
    rank = MappingProxyType({n: i for i, n in enumerate(nodes)})
    boundary = find_boundary(nodes)
    storages = map_storages(nodes)
    node_kinds: NodeKinds = classify(nodes, boundary, storages, hints)
    size = lambda key: rounded(storages.nbytes[key], allocator_rounding)  # noqa: E731
    activations = activation_liveness(nodes, rank, boundary, node_kinds.kinds, storages, size)
    recompute = recompute_subgraphs(nodes, activations, node_kinds.kinds, boundary.regions, rank)
    memory = simulate_memory(nodes, rank, node_kinds.kinds, storages, allocator_rounding)
    output_bytes = MappingProxyType({n: sum(size(k) for k in storages.created_by(n)) for n in nodes})
    return GraphAnalysis(nodes, rank, boundary, boundary.regions, node_kinds.kinds, node_kinds.grads,
                         node_kinds.frozen, storages, output_bytes, activations, recompute, memory)
