"""A rewritten compile-path program split back into the forward and backward
graphs AOTAutograd runs (the backend "mutwo").

The program (partitioned.py) is a dynamo graph's forward then backward; the
rewriter tags every node it adds with the region of the node it was placed
by. AOTAutograd's calling convention stays: the forward returns its outputs
and then one value per saved slot, the backward takes the saved slots, then
the tangents. A saved value the backward no longer reads (recomputed there,
or swapped) is replaced in its slot by an empty tensor, so the forward
drops it at its last use. A forward value the backward now reads that was
saved in no slot (a recompute's source, a swap's copy in flight) travels
beside the slots: the forward returns it last, the runner keeps it, and the
backward takes it after the tangents."""

from dataclasses import dataclass

import torch
from torch import fx

TAG = "partitioner_tag"


@dataclass(frozen=True)
class SplitProgram:
    """``forward`` returns the original outputs, then ``extra_count``
    values for ``backward``, which takes the original inputs, then them."""

    forward: fx.GraphModule
    backward: fx.GraphModule
    extra_count: int
    dropped_slots: tuple[str, ...]  # saved values the forward no longer keeps


def split_program(program: fx.GraphModule, forward: fx.GraphModule, backward: fx.GraphModule,
                  forward_names: dict[str, str], backward_names: dict[str, str], num_fwd_outputs: int) -> SplitProgram:
    """``num_fwd_outputs``: the forward's outputs before its saved slots
    (what the model returns, and mutated inputs), kept as they are."""
    nodes = list(program.graph.nodes)
    by_name = {n.name: n for n in nodes}
    forward_inputs = [by_name[forward_names[p.name]] for p in forward.graph.nodes if p.op == "placeholder"]
    backward_inputs = [by_name[backward_names[p.name]] for p in backward.graph.nodes if p.op == "placeholder"]
    in_backward = {n for n in nodes if n.meta.get(TAG) == "is_backward"}
    in_backward.update(p for p in backward_inputs if p.op == "placeholder")  # tangents
    crossing = [n for n in nodes if n not in in_backward and n.op != "get_attr"
                and any(u in in_backward for u in n.users)]

    fw_graph, fw_env = fx.Graph(), {}
    for node in forward_inputs:
        fw_env[node] = fw_graph.node_copy(node)
    for node in nodes:
        if node.op not in ("placeholder", "output") and node not in in_backward:
            fw_env[node] = fw_graph.node_copy(node, fw_env.__getitem__)
    original_outputs = [forward_names.get(o.name) if isinstance(o, fx.Node) else o
                        for o in _output_args(forward)]
    saved = set(backward_inputs)
    outputs, dropped = [], []
    for index, name in enumerate(original_outputs):
        node = by_name.get(name) if isinstance(name, str) else None
        if node is None:
            outputs.append(name)
        elif index >= num_fwd_outputs and node in saved and not any(u in in_backward for u in node.users) \
                and _is_tensor(node):
            outputs.append(_empty_like_slot(fw_graph, node))
            dropped.append(node.name)
        else:
            outputs.append(fw_env[node])
    kept = {by_name[n] for n in original_outputs if isinstance(n, str) and n in by_name}
    extras = [n for n in crossing if n not in kept]
    fw_graph.output(tuple(outputs + [fw_env[n] for n in extras]))

    bw_graph, bw_env = fx.Graph(), {}
    for node, placeholder in zip(backward_inputs, (p for p in backward.graph.nodes if p.op == "placeholder")):
        bw_env[node] = bw_graph.node_copy(placeholder)
    for node in extras:
        bw_env[node] = bw_graph.placeholder(f"mutwo_{node.name}")
        bw_env[node].meta.update(node.meta)

    def mapped(node):
        if node not in bw_env and node.op == "get_attr":  # a forward constant or the copy streams, read again
            bw_env[node] = bw_graph.get_attr(node.target)
        return bw_env[node]

    for node in nodes:
        if node in in_backward and node.op not in ("placeholder", "output"):
            bw_env[node] = bw_graph.node_copy(node, mapped)
    gradients = _output_args(program)[len(_output_args(program)) - len(_output_args(backward)):]
    bw_graph.output(tuple(mapped(g) if isinstance(g, fx.Node) else g for g in gradients))
    return SplitProgram(_module(program, fw_graph), _module(program, bw_graph), len(extras), tuple(dropped))


def _output_args(gm: fx.GraphModule) -> list:
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    values = output.args[0]
    return list(values) if isinstance(values, (tuple, list)) else [values]


def _is_tensor(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), torch.Tensor)


def _empty_like_slot(graph: fx.Graph, node: fx.Node) -> fx.Node:
    """A tensor of no elements, of the dropped value's dtype and device."""
    value = node.meta["val"]
    device = value.device if value.device.type != "meta" else None
    return graph.call_function(torch.ops.aten.empty.memory_format, ([0],),
                               {"dtype": value.dtype, "device": device})


def _module(program: fx.GraphModule, graph: fx.Graph) -> fx.GraphModule:
    graph.lint()
    return fx.GraphModule(program, graph)  # (the program holds the constants and the copy streams)
