"""Node-kind pass: what every node's value is (PARAM, BUFFER, INPUT, ACT,
GRAD, OPT_STATE, OTHER), and which storage each activation owns."""

import enum
import operator
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

from torch import fx

from .boundary import SEP_BACKWARD_TARGETS, Boundary, Region, target_name
from .errors import AnalysisError
from .hints import GraphHints
from .storage import StorageMap

FUSED_ADAM_TARGETS = ("aten._fused_adam.default", "aten._fused_adamw.default",
                      "aten._fused_adam.tensor_lr", "aten._fused_adamw.tensor_lr")
FORWARD_REGIONS = (Region.FORWARD, Region.LOSS)


class NodeType(enum.Enum):
    PARAM = "PARAM"
    BUFFER = "BUFFER"
    INPUT = "INPUT"
    ACT = "ACT"
    GRAD = "GRAD"
    OPT_STATE = "OPT_STATE"
    OTHER = "OTHER"


@dataclass(frozen=True)
class NodeKinds:
    """``kinds``: node -> NodeType; ``grads``: param node -> its gradient node
    (the node that computes the gradient's storage); ``frozen``: parameters
    without a gradient."""

    kinds: Mapping[fx.Node, NodeType]
    grads: Mapping[fx.Node, fx.Node]
    frozen: tuple[fx.Node, ...]


def classify(nodes: tuple[fx.Node, ...], boundary: Boundary, storages: StorageMap,
             hints: GraphHints | None) -> NodeKinds:
    regions = boundary.regions
    kinds = {}
    placeholders = [n for n in nodes if n.op == "placeholder"]
    by_name = {n.name: n for n in placeholders}
    if hints is None or not hints.params:
        hints = _hints_from_fused_adam(nodes, hints)
    for node in placeholders:
        if node.name in hints.params:
            kinds[node] = NodeType.PARAM
        elif node.name in hints.buffers:
            kinds[node] = NodeType.BUFFER
        elif node.name in hints.opt_states:
            kinds[node] = NodeType.OPT_STATE
        else:
            kinds[node] = NodeType.INPUT

    grads = _joint_grads(nodes, by_name, hints, storages) if boundary.joint else \
        _train_step_grads(nodes, regions, storages, by_name, hints)
    grad_nodes = set(grads.values())
    for node in nodes:
        if node in kinds:
            continue
        if node in grad_nodes:
            kinds[node] = NodeType.GRAD
        elif regions[node] in FORWARD_REGIONS and node.op != "output" and any(
                reads_in_backward(user, regions) for user in node.users):
            kinds[node] = NodeType.ACT
        else:
            kinds[node] = NodeType.OTHER
    trainable = [by_name[name] for name in sorted(hints.params - hints.frozen_params)
                 if name in by_name]
    frozen = tuple(by_name[name] for name in sorted(hints.frozen_params) if name in by_name)
    missing = [p.name for p in trainable if p not in grads]
    if missing and grads:
        raise AnalysisError(f"no gradient found for trainable parameter placeholder(s) "
                            f"{', '.join(missing[:5])}: the graph's backward does not reach them.")
    return NodeKinds(MappingProxyType(kinds), MappingProxyType(grads), frozen)


def reads_in_backward(user: fx.Node, regions) -> bool:
    """A backward node that needs the value. Not the graph output (a forward
    output is returned, not kept for backward) and not sep_backward, which
    reads the loss's gradient of the model output: a gradient flowing into
    backward, not an activation kept from forward."""
    return (regions[user] is Region.BACKWARD and user.op != "output"
            and target_name(user) not in SEP_BACKWARD_TARGETS)


def _hints_from_fused_adam(nodes, hints: GraphHints | None) -> GraphHints:
    """Without hints, read params and state from the fused Adam op's arguments
    (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps)."""
    params, states = set(), set()
    for node in nodes:
        if node.op == "call_function" and target_name(node) in FUSED_ADAM_TARGETS:
            params.update(_placeholder_behind(a).name for a in node.args[0])
            for group in node.args[2:6]:
                states.update(_placeholder_behind(a).name for a in group)
    base = hints or GraphHints()
    return GraphHints(params=frozenset(params), buffers=base.buffers, opt_states=frozenset(states),
                      frozen_params=base.frozen_params, num_fwd_outputs=base.num_fwd_outputs,
                      names=base.names)


def _placeholder_behind(node: fx.Node) -> fx.Node:
    while node.op != "placeholder" and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _train_step_grads(nodes, regions, storages, by_name, hints) -> dict:
    """A gradient is a storage made in BACKWARD and read by the optimizer's
    update of a parameter: the fused op's grads list, or an in-place op on a
    parameter (foreach Adam, SGD) whose arguments lead back to it."""
    grads = {}
    params = {by_name[n] for n in hints.params if n in by_name}
    for node in nodes:
        if regions[node] is not Region.OPTIMIZER or node.op != "call_function":
            continue
        if target_name(node) in FUSED_ADAM_TARGETS:
            for param, grad in zip(node.args[0], node.args[1]):
                grads[_placeholder_behind(param)] = grad_value(grad, storages)
    if grads or not params:
        return grads
    # foreach Adam / SGD: grads are BACKWARD storages the optimizer reads, matched
    # to parameters by position in the optimizer's first op over all parameters.
    made_in_backward = {}
    for node in nodes:
        if regions[node] is Region.OPTIMIZER and node.op == "call_function":
            for arg in node.all_input_nodes:
                if _backward_creator(arg, regions, storages) is not None:
                    made_in_backward.setdefault(grad_value(arg, storages), None)
    ordered_params = [n for n in nodes if n in params and n.name not in hints.frozen_params]
    ordered_grads = list(made_in_backward)
    if len(ordered_grads) == len(ordered_params):
        grads = dict(zip(ordered_params, ordered_grads))
    return grads


def grad_value(node: fx.Node, storages: StorageMap) -> fx.Node:
    """The node holding the gradient itself: back through detach, views and
    reshapes that share its storage, stopping at the op (or the getitem of a
    multi-output op such as convolution_backward) that produced it."""
    while (node.op == "call_function" and node.target is not operator.getitem and node.all_input_nodes
           and storages.refs.get(node) == storages.refs.get(node.all_input_nodes[0])):
        node = node.all_input_nodes[0]
    return node


def _backward_creator(node: fx.Node, regions, storages: StorageMap) -> fx.Node | None:
    refs = storages.refs.get(node, ())
    if not refs:
        return None
    creator = storages.creator[refs[0]]
    return creator if regions.get(creator) is Region.BACKWARD else None


def _joint_grads(nodes, by_name, hints, storages) -> dict:
    """Joint outputs after num_fwd_outputs are one gradient per primal, in order."""
    if hints.num_fwd_outputs is None:
        raise AnalysisError("a joint graph needs hints.num_fwd_outputs to find gradients among its "
                            "outputs: pass the partitioner's num_fwd_outputs in GraphHints.")
    output = nodes[-1]
    outputs = list(output.args[0])
    primals = [n for n in nodes if n.op == "placeholder" and n.name.startswith("primals")]
    grads = {}
    for primal, grad in zip(primals, outputs[hints.num_fwd_outputs:]):
        if primal.name in hints.params and isinstance(grad, fx.Node):
            grads[primal] = grad_value(grad, storages)
    return grads
