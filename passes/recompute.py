"""Recompute subgraphs: for each activation, the forward nodes that would
recompute it from the nearest values kept anyway (parameters, buffers,
inputs, other activations), and whether recomputing is safe."""

from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Mapping

import networkx as nx
from torch import fx

from .boundary import target_name
from .kinds import FORWARD_REGIONS, NodeType

RETAINED = (NodeType.PARAM, NodeType.BUFFER, NodeType.INPUT, NodeType.ACT, NodeType.OPT_STATE)
RANDOM_MARKERS = ("bernoulli", "dropout", "rand", "normal", "multinomial", "poisson", "exponential")
COLLECTIVE_MARKERS = ("c10d", "_functional_collectives", "all_reduce", "all_gather", "reduce_scatter")


@dataclass(frozen=True)
class RecomputeInfo:
    """``nodes`` run in order from ``srcs`` recompute the activation (it is the
    last of them). ``recompute_count``: how many recomputations of other
    activations also run it, after update_after_recompute."""

    srcs: tuple[fx.Node, ...]
    nodes: tuple[fx.Node, ...]
    recomputable: bool
    reason: str | None
    recompute_count: int = 0


def forward_dependency_graph(nodes, regions) -> nx.DiGraph:
    """Edges input -> user among forward and loss nodes."""
    graph = nx.DiGraph()
    for node in nodes:
        if regions[node] in FORWARD_REGIONS and node.op != "output":
            graph.add_node(node)
            graph.add_edges_from((source, node) for source in node.all_input_nodes)
    return graph


def recompute_subgraphs(nodes, activations, kinds, regions, rank) -> Mapping[fx.Node, RecomputeInfo]:
    graph = forward_dependency_graph(nodes, regions)
    infos = {}
    for act in activations:
        srcs, inside, stack = set(), {act}, [act]
        while stack:
            for source in graph.predecessors(stack.pop()):
                if source in inside or source in srcs:
                    continue
                if kinds[source] in RETAINED or source.op == "placeholder":
                    srcs.add(source)
                else:
                    inside.add(source)
                    stack.append(source)
        ordered = tuple(sorted(inside, key=rank.__getitem__))
        reason = _unsafe_reason(ordered)
        infos[act] = RecomputeInfo(tuple(sorted(srcs, key=rank.__getitem__)), ordered, reason is None, reason)
    return MappingProxyType(infos)


def _unsafe_reason(nodes) -> str | None:
    for node in nodes:
        name = target_name(node)
        lowered = name.lower()
        if any(marker in lowered for marker in RANDOM_MARKERS):
            return f"random op {name} ({node.name}): recomputing draws different numbers"
        if any(marker in lowered for marker in COLLECTIVE_MARKERS):
            return f"collective {name} ({node.name})"
        if _mutates(node):
            return f"mutation {name} ({node.name}): recomputing would apply it twice"
    return None


def _mutates(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    if schema is not None and schema.is_mutable:
        return True
    # native_batch_norm updates running_mean / running_var (args 3, 4) in
    # training although its schema does not say so.
    return (target_name(node).startswith("aten.native_batch_norm.") and len(node.args) > 5
            and bool(node.args[5]) and node.args[3] is not None)


def update_after_recompute(recompute: Mapping[fx.Node, RecomputeInfo], chosen: fx.Node,
                           rank: Mapping[fx.Node, int]) -> dict[fx.Node, RecomputeInfo]:
    """μ-TWO's update once ``chosen`` is to be recomputed: every activation
    that used it as a source recomputes from chosen's sources instead, running
    chosen's nodes too; chosen's recompute_count grows by their number."""
    picked = recompute[chosen]
    updated = dict(recompute)
    absorbed = 0
    for act, info in recompute.items():
        if act is chosen or chosen not in info.srcs:
            continue
        srcs = (set(info.srcs) - {chosen}) | set(picked.srcs)
        nodes = set(info.nodes) | set(picked.nodes)
        reason = info.reason or picked.reason
        updated[act] = replace(info, srcs=tuple(sorted(srcs, key=rank.__getitem__)),
                               nodes=tuple(sorted(nodes, key=rank.__getitem__)),
                               recomputable=reason is None, reason=reason)
        absorbed += 1
    updated[chosen] = replace(picked, recompute_count=picked.recompute_count + absorbed)
    return updated


