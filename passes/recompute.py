"""Recompute subgraphs: for each activation, the forward nodes that would
recompute it from the nearest values kept anyway (parameters, buffers,
inputs, other activations), and whether they may be replayed (replay.py's
rules: same bits, state changed once)."""

from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Mapping

import networkx as nx
from torch import fx

from .boundary import SEP_TARGETS, target_name
from .kinds import FORWARD_REGIONS, NodeType
from .replay import replay_reason, replay_sources
from .storage import StorageMap

RETAINED = (NodeType.PARAM, NodeType.BUFFER, NodeType.INPUT, NodeType.ACT, NodeType.OPT_STATE)


@dataclass(frozen=True)
class RecomputeInfo:
    """Running ``nodes`` in order from ``srcs`` recomputes the activation (the
    last node). ``recompute_count``: how many recompute subgraphs run these
    nodes: the activation's own, plus one per activation that absorbed it in
    update_after_recompute (μ-TWO's recomp_cnt)."""

    srcs: tuple[fx.Node, ...]
    nodes: tuple[fx.Node, ...]
    recomputable: bool
    reason: str | None
    recompute_count: int = 1

    @property
    def replays_sep(self) -> bool:
        """Whether ``nodes`` run ``separator.sep``: a replay of it is a plain
        view of its input, not a second separator."""
        return any(target_name(n) in SEP_TARGETS for n in self.nodes)


def forward_dependency_graph(nodes, regions) -> nx.DiGraph:
    """Edges input -> user among forward and loss nodes, built once for all
    activations."""
    graph = nx.DiGraph()
    for node in nodes:
        if regions[node] in FORWARD_REGIONS and node.op != "output":
            graph.add_node(node)
            graph.add_edges_from((source, node) for source in node.all_input_nodes)
    return graph


def recompute_subgraphs(nodes, activations, kinds, regions, rank,
                        storages: StorageMap) -> Mapping[fx.Node, RecomputeInfo]:
    graph = forward_dependency_graph(nodes, regions)
    infos = {}
    for act in activations:
        srcs, inside, stack = set(), {act}, [act]
        while stack:
            for source in graph.predecessors(stack.pop()):
                if source in inside or source in srcs:
                    continue
                if kinds[source] in RETAINED or source.op == "get_attr":  # (a constant is always there)
                    srcs.add(source)
                else:
                    inside.add(source)
                    stack.append(source)
        srcs.update(extra for node in inside for extra in replay_sources(node) if extra not in inside)
        ordered = tuple(sorted(inside, key=rank.__getitem__))
        reason = replay_reason(ordered, storages)
        infos[act] = RecomputeInfo(tuple(sorted(srcs, key=rank.__getitem__)), ordered, reason is None, reason)
    return MappingProxyType(infos)


def update_after_recompute(recompute: Mapping[fx.Node, RecomputeInfo], chosen: fx.Node,
                           rank: Mapping[fx.Node, int] | None = None) -> dict[fx.Node, RecomputeInfo]:
    """μ-TWO's update once ``chosen`` is to be recomputed (so no longer kept):
    every activation that used it as a source recomputes from chosen's sources
    instead, running chosen's nodes first; chosen's recompute_count grows by
    the number of such activations. Returns a new mapping.

    Merged ``nodes`` are in a topological order without ``rank``: chosen's
    nodes depend only on chosen's sources, and none of the absorbing
    activation's other nodes feeds them (it would be in chosen's subgraph
    too). With ``rank`` (GraphAnalysis.rank) srcs and nodes are in graph order."""
    picked = recompute[chosen]
    updated = dict(recompute)
    absorbed = 0
    for act, info in recompute.items():
        if act is chosen or chosen not in info.srcs:
            continue
        srcs = tuple(dict.fromkeys(s for s in (*info.srcs, *picked.srcs) if s is not chosen))
        nodes = tuple(dict.fromkeys((*picked.nodes, *info.nodes)))
        if rank is not None:
            srcs, nodes = tuple(sorted(srcs, key=rank.__getitem__)), tuple(sorted(nodes, key=rank.__getitem__))
        reason = info.reason or picked.reason
        updated[act] = replace(info, srcs=srcs, nodes=nodes, recomputable=reason is None, reason=reason)
        absorbed += 1
    updated[chosen] = replace(picked, recompute_count=picked.recompute_count + absorbed)
    return updated
