"""The program AOTAutograd runs for one dynamo graph, as one fx graph for the
passes: the forward graph, then the backward graph reading the values the
forward saved.

The joint graph is not that program when default_partition recomputes
values in backward (activation checkpointing): analysed as it is, such a
value would stay alive from forward to backward, be listed as an activation,
and its recomputation would be missing from backward."""

from dataclasses import dataclass

from torch import fx


@dataclass(frozen=True)
class PartitionedProgram:
    """``graph``: forward nodes tagged ``is_forward``, then backward nodes
    tagged ``is_backward``; placeholders are the forward's primals, then the
    backward's tangents; the output is the forward's outputs then the
    gradients, as a joint graph's; it holds the constants both read.
    ``forward_names`` / ``backward_names``
    map each node name of the forward / backward graph to its node's name
    here (a recomputed value is renamed in backward)."""

    graph: fx.GraphModule
    forward_names: dict[str, str]
    backward_names: dict[str, str]


def stitch(forward: fx.GraphModule, backward: fx.GraphModule, num_fwd_outputs: int) -> PartitionedProgram:
    graph = fx.Graph()
    forward_nodes, backward_nodes = list(forward.graph.nodes), list(backward.graph.nodes)
    fw_env: dict[fx.Node, fx.Node] = {}
    bw_env: dict[fx.Node, fx.Node] = {}
    by_name = {node.name: node for node in forward_nodes}
    # a backward placeholder named after a forward value is that saved value
    saved = {node: by_name[node.name] for node in backward_nodes
             if node.op == "placeholder" and node.name in by_name}
    for node in forward_nodes:
        if node.op == "placeholder":
            fw_env[node] = graph.node_copy(node)
    for node in backward_nodes:
        if node.op == "placeholder" and node not in saved:
            bw_env[node] = graph.node_copy(node)
    constants: dict[str, object] = {}
    for node in forward_nodes:
        if node.op not in ("placeholder", "output"):
            fw_env[node] = _copy(graph, node, fw_env, forward, constants)
            fw_env[node].meta["partitioner_tag"] = "is_forward"
    for node, value in saved.items():
        bw_env[node] = fw_env[value]
    for node in backward_nodes:
        if node.op not in ("placeholder", "output"):
            bw_env[node] = _copy(graph, node, bw_env, backward, constants)
            bw_env[node].meta["partitioner_tag"] = "is_backward"

    def mapped(env, values):
        return [env[v] if isinstance(v, fx.Node) else v for v in values]

    forward_outputs = forward_nodes[-1].args[0][:num_fwd_outputs]
    gradients = backward_nodes[-1].args[0]
    graph.output(tuple(mapped(fw_env, forward_outputs) + mapped(bw_env, gradients)))
    module = fx.GraphModule(constants, graph)
    return PartitionedProgram(module,
                              {n.name: copy.name for n, copy in fw_env.items()},
                              {n.name: copy.name for n, copy in bw_env.items()})


def _copy(graph: fx.Graph, node: fx.Node, env: dict, owner: fx.GraphModule, constants: dict) -> fx.Node:
    """``node`` copied into the program; a constant it reads (get_attr) is
    held by the program too, renamed where the forward and the backward
    graph both name one so."""
    copy = graph.node_copy(node, env.__getitem__)
    if node.op == "get_attr":
        value = owner
        for part in node.target.split("."):
            value = getattr(value, part)
        name = node.target.replace(".", "_")
        while name in constants and constants[name] is not value:
            name = f"backward_{name}"
        constants[name] = value
        copy.target = name
    return copy
