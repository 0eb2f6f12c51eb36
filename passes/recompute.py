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
from .kinds import FORWARD_REGIONS, NodeType, written_args
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
    writers = _forward_writers(nodes, regions, storages)
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
        reason = _written_later(act, activations[act], writers, storages, rank) or replay_reason(ordered, storages)
        infos[act] = RecomputeInfo(tuple(sorted(srcs, key=rank.__getitem__)), ordered, reason is None, reason)
    return MappingProxyType(infos)


def _forward_writers(nodes, regions, storages: StorageMap) -> dict[int, list[fx.Node]]:
    """Storage key -> the forward nodes that write it in place."""
    writers: dict[int, list[fx.Node]] = {}
    for node in nodes:
        if regions[node] in FORWARD_REGIONS and node.op == "call_function":
            for written in written_args(node):
                for key in storages.refs.get(written, ()):
                    writers.setdefault(key, []).append(node)
    return writers


def _written_later(act: fx.Node, info, writers, storages: StorageMap, rank) -> str | None:
    """Why ``act`` cannot be rebuilt by replaying what made it: an op writes
    its storage in place after it is made and before backward reads it
    (a view taken before a ``relu_``), and backward reads what was written."""
    for key in storages.refs.get(act, ()):
        for writer in writers.get(key, ()):
            if info.creation_rank < rank[writer] < info.first_bw_rank:
                return (f"{writer.name} writes its storage in place after it is made: a replay of what made it "
                        "would not see the write")
    return None


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
