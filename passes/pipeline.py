"""run_pipeline: the passes chained over one fx graph into a GraphAnalysis,
the single source of truth the interpreter and reports read."""

import time
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from torch import fx

from .boundary import Boundary, Region, find_boundary
from .hints import GraphHints
from .kinds import NodeType, classify
from .liveness import ActivationInfo, activation_liveness
from .memory import MemorySimulation, rounded, simulate_memory
from .recompute import RecomputeInfo, recompute_subgraphs
from .storage import StorageMap, map_storages


@dataclass(frozen=True)
class GraphAnalysis:
    """Everything the passes found out about one graph, keyed by fx node.

    ``output_bytes``: bytes of the storages a node allocates (0 for views and
    in-place ops; a multi-output op holds its getitems' bytes). ``storages``
    says which storage each node's value lives in, so nothing is counted
    twice. ``pass_seconds``: wall time of each pass, for benchmarks."""

    nodes: tuple[fx.Node, ...]
    rank: Mapping[fx.Node, int]
    boundary: Boundary
    regions: Mapping[fx.Node, Region]
    kinds: Mapping[fx.Node, NodeType]
    grads: Mapping[fx.Node, fx.Node]  # parameter placeholder -> node allocating its gradient
    frozen_params: tuple[fx.Node, ...]  # parameters without a gradient
    storages: StorageMap
    output_bytes: Mapping[fx.Node, int]
    activations: Mapping[fx.Node, ActivationInfo]
    recompute: Mapping[fx.Node, RecomputeInfo]
    memory: MemorySimulation
    pass_seconds: Mapping[str, float] = field(default_factory=dict, compare=False)

    @property
    def sep_rank(self) -> int:
        return self.boundary.sep_rank

    @property
    def sep_backward_rank(self) -> int:
        return self.boundary.sep_backward_rank


def run_pipeline(gm: fx.GraphModule, hints: GraphHints | None = None,
                 allocator_rounding: bool = False) -> GraphAnalysis:
    """Boundary -> storages -> node kinds -> liveness -> recompute -> memory.

    ``hints`` name the placeholders' roles (required for joint graphs; for
    train-step graphs they are read from the optimizer when absent).
    ``allocator_rounding`` rounds every storage up to 512 bytes, as the CUDA
    caching allocator does."""
    seconds = {}

    def timed(name, run, *args):
        start = time.perf_counter()
        result = run(*args)
        seconds[name] = time.perf_counter() - start
        return result

    nodes = tuple(gm.graph.nodes)
    rank = MappingProxyType({n: i for i, n in enumerate(nodes)})
    boundary = timed("boundary", find_boundary, nodes)
    storages = timed("storages", map_storages, nodes)
    kinds = timed("kinds", classify, nodes, boundary, storages, hints)
    size = lambda key: rounded(storages.nbytes[key], allocator_rounding)  # noqa: E731
    activations = timed("liveness", activation_liveness, nodes, rank, boundary, kinds.kinds, storages, size)
    recompute = timed("recompute", recompute_subgraphs, nodes, activations, kinds.kinds, boundary.regions, rank,
                      storages)
    by_name = {n.name: n for n in nodes}
    freed_after = {by_name[n]: by_name[a] for n, a in (hints.freed_after if hints else {}).items()
                   if n in by_name and a in by_name}
    memory = timed("memory", simulate_memory, nodes, rank, kinds.kinds, storages, allocator_rounding,
                   freed_after)
    output_bytes = MappingProxyType({n: sum(size(k) for k in storages.created_by(n)) for n in nodes})
    return GraphAnalysis(nodes, rank, boundary, boundary.regions, kinds.kinds, kinds.grads, kinds.frozen,
                         storages, output_bytes, activations, recompute, memory, MappingProxyType(seconds))
