"""Node-kind pass: what every node's value is (PARAM, BUFFER, INPUT, ACT,
GRAD, OPT_STATE, OTHER), and which gradient belongs to which parameter."""

import operator
from dataclasses import dataclass
from types import MappingProxyType
from typing import Iterator, Mapping

import torch.utils._pytree as pytree
from torch import fx

from .boundary import SEED_TARGET, SEP_BACKWARD_TARGETS, Boundary, target_name
from .enums import NodeType, Region
from .errors import AnalysisError
from .hints import GraphHints
from .storage import FUSED_ADAM_TARGETS, StorageMap

FORWARD_REGIONS = (Region.FORWARD, Region.LOSS)
# Batch-norm ops that update running_mean / running_var (args 3, 4) when
# training (arg 5) although their schemas do not say so: native_batch_norm
# on the CPU, cuDNN's and MIOpen's on a GPU.
BATCH_NORM_TARGETS = ("aten.native_batch_norm.default", "aten.cudnn_batch_norm.default",
                      "aten.miopen_batch_norm.default")


@dataclass(frozen=True)
class NodeKinds:
    """``kinds``: node -> NodeType; ``grads``: parameter placeholder -> the
    node that allocated its gradient; ``frozen``: parameters without a
    gradient (requires_grad=False, or not updated by the optimizer)."""

    kinds: Mapping[fx.Node, NodeType]
    grads: Mapping[fx.Node, fx.Node]
    frozen: tuple[fx.Node, ...]


def classify(nodes: tuple[fx.Node, ...], boundary: Boundary, storages: StorageMap,
             hints: GraphHints | None) -> NodeKinds:
    regions = boundary.regions
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if boundary.joint and (hints is None or hints.num_fwd_outputs is None):
        raise AnalysisError(
            "a joint graph needs GraphHints naming its parameter placeholders (params=...) "
            "and num_fwd_outputs: profile through torch.compile(backend='mutwo_profile'), "
            "which passes them, or build them from the dynamo graph's inputs.")
    if not boundary.joint and (hints is None or not hints.params):
        hints = infer_hints(nodes, regions, hints)
    role = {**dict.fromkeys(hints.opt_states, NodeType.OPT_STATE),
            **dict.fromkeys(hints.buffers, NodeType.BUFFER), **dict.fromkeys(hints.params, NodeType.PARAM)}
    kinds = {node: role.get(node.name, NodeType.INPUT) for node in placeholders}
    params = [n for n in placeholders if kinds[n] is NodeType.PARAM]

    grads = _joint_grads(nodes, params, hints, storages) if boundary.joint else \
        _train_step_grads(nodes, boundary, storages, params)
    grad_nodes = set(grads.values())
    for node in nodes:
        if node in kinds:
            continue
        if node in grad_nodes:
            kinds[node] = NodeType.GRAD
        elif regions[node] in FORWARD_REGIONS and node.op != "output" \
                and node not in boundary.loss_backward and any(
                reads_in_backward(user, boundary) for user in node.users):
            kinds[node] = NodeType.ACT
        else:
            kinds[node] = NodeType.OTHER
    frozen = tuple(p for p in params if p not in grads)
    unexpected = [p.name for p in frozen if p.name not in hints.frozen_params]
    if boundary.joint and unexpected:
        raise AnalysisError(f"no gradient among the joint outputs for parameter placeholder(s) "
                            f"{', '.join(unexpected[:5])}: check hints.num_fwd_outputs and that "
                            "hints.frozen_params names the parameters with requires_grad=False.")
    return NodeKinds(MappingProxyType(kinds), MappingProxyType(grads), frozen)


def reads_in_backward(user: fx.Node, boundary: Boundary) -> bool:
    """A backward node that needs the value: in BACKWARD or the loss's own
    backward (which keeps, e.g., log_softmax's output, as autograd does). Not
    the graph output (a forward output is returned, not kept for backward)
    and not sep_backward, which reads the loss's gradient of the model
    output: a gradient flowing into backward, not an activation; nor the
    seed ones_like(loss), which reads only the loss's shape."""
    return (boundary.runs_backward(user) and user.op != "output"
            and target_name(user) not in SEP_BACKWARD_TARGETS and target_name(user) != SEED_TARGET)


def infer_hints(nodes, regions, given: GraphHints | None) -> GraphHints:
    """Placeholder roles of a train-step graph read from the graph itself:
    parameters are read in forward and written by the optimizer; optimizer
    state is written by the optimizer and never read before it; buffers are
    written in forward (batch-norm running statistics, counters)."""
    read_in_forward, written = set(), {region: set() for region in Region}
    for node in nodes:
        if node.op != "call_function":
            continue
        region = regions[node]
        if region in FORWARD_REGIONS:
            read_in_forward.update(a for a in node.all_input_nodes if a.op == "placeholder")
        written[region].update(p for p in written_args(node) if p.op == "placeholder")
    optimizer = written[Region.OPTIMIZER]
    base = given or GraphHints()
    return GraphHints(params=frozenset(p.name for p in optimizer & read_in_forward),
                      buffers=frozenset(p.name for p in written[Region.FORWARD] - optimizer),
                      opt_states=frozenset(p.name for p in optimizer - read_in_forward),
                      frozen_params=base.frozen_params, names=base.names)


def written_args(node: fx.Node) -> Iterator[fx.Node]:
    """Nodes an op writes into: mutable schema arguments (in-place ops, copy_,
    foreach lists), batch norm's running statistics (mutated although
    its schema does not say so) and the fused optimizer's copied-back lists,
    each followed back through the views the write goes through."""
    schema = getattr(node.target, "_schema", None)
    if schema is not None:
        for index, argument in enumerate(schema.arguments):
            if argument.alias_info is not None and argument.alias_info.is_write:
                value = node.args[index] if index < len(node.args) else node.kwargs.get(argument.name)
                yield from (_alias_root(a) for a in pytree.tree_leaves(value) if isinstance(a, fx.Node))
    yield from batch_norm_statistics(node)
    if target_name(node) in FUSED_ADAM_TARGETS:
        for group in node.args[:6]:
            yield from (_alias_root(a) for a in group)


def batch_norm_statistics(node: fx.Node) -> tuple[fx.Node, ...]:
    """The running statistics a training batch-norm op of BATCH_NORM_TARGETS
    updates in place (empty for any other node)."""
    if target_name(node) not in BATCH_NORM_TARGETS or len(node.args) <= 5 or not node.args[5]:
        return ()
    return tuple(a for a in node.args[3:5] if isinstance(a, fx.Node))


def _alias_root(node: fx.Node) -> fx.Node:
    """Back through ops whose result aliases their first argument (views,
    in-place results) to the node that holds the storage."""
    while node.op == "call_function" and node.all_input_nodes and _aliases_first_arg(node):
        node = node.args[0]
    return node


def _aliases_first_arg(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return (schema is not None and bool(schema.returns) and schema.returns[0].alias_info is not None
            and isinstance(node.args[0], fx.Node))


def _train_step_grads(nodes, boundary: Boundary, storages: StorageMap, params) -> dict:
    """A gradient is a storage made in BACKWARD that the optimizer reads. The
    fused Adam op names the pairs; otherwise (foreach, single-tensor, SGD) the
    optimizer visits parameters and their gradients in the same order, so the
    k-th parameter it touches pairs with the k-th gradient it reads."""
    if not params:
        return {}
    if boundary.optimizer_rank is None:
        raise AnalysisError(
            "the graph has no optimizer step after backward (no 'Optimizer.step' record_function "
            "marker), so gradients cannot be found: call optimizer.step() in train_step after "
            "loss.backward().")
    regions = boundary.regions
    optimizer_nodes = [n for n in nodes[boundary.optimizer_rank:]
                       if regions[n] is Region.OPTIMIZER and n.op == "call_function"]
    fused = {_alias_root(p): grad_value(g, storages) for node in optimizer_nodes
             if target_name(node) in FUSED_ADAM_TARGETS for p, g in zip(node.args[0], node.args[1])}
    if fused:
        return fused
    wanted = set(params)
    touched, read = {}, {}
    for node in optimizer_nodes:
        for arg in pytree.tree_leaves((node.args, node.kwargs)):
            if not isinstance(arg, fx.Node):
                continue
            if arg in wanted:
                touched.setdefault(arg, None)
            elif _made_in_backward(arg, regions, storages):
                read.setdefault(grad_value(arg, storages), None)
    if len(touched) != len(read):
        raise AnalysisError(
            f"the optimizer updates {len(touched)} parameters but reads {len(read)} gradient "
            "values made in backward, so they cannot be paired: the supported optimizers are "
            "Adam/AdamW (fused, foreach, single-tensor) and SGD; gradient transformations "
            "between backward and optimizer.step() must happen in place.")
    return dict(zip(touched, read))


def _made_in_backward(node: fx.Node, regions, storages: StorageMap) -> bool:
    refs = storages.refs.get(node, ())
    return bool(refs) and regions.get(storages.creator[refs[0]]) is Region.BACKWARD


def grad_value(node: fx.Node, storages: StorageMap) -> fx.Node:
    """The node that allocated the gradient: back through detach, views and
    reshapes that share its storage, stopping at the op (or the getitem of a
    multi-output op such as convolution_backward) that produced it."""
    while (node.op == "call_function" and node.target is not operator.getitem and node.all_input_nodes
           and storages.refs.get(node) == storages.refs.get(node.all_input_nodes[0])):
        node = node.all_input_nodes[0]
    return node


def _joint_grads(nodes, params, hints: GraphHints, storages: StorageMap) -> dict:
    """Joint outputs after num_fwd_outputs are one gradient per primal, in order."""
    if hints.num_fwd_outputs is None:
        raise AnalysisError("a joint graph needs hints.num_fwd_outputs to find gradients among its "
                            "outputs: pass the partitioner's num_fwd_outputs in GraphHints.")
    outputs = list(nodes[-1].args[0])
    primals = [n for n in nodes if n.op == "placeholder" and n.name.startswith("primals")]
    wanted = set(params)
    return {primal: grad_value(grad, storages)
            for primal, grad in zip(primals, outputs[hints.num_fwd_outputs:])
            if primal in wanted and isinstance(grad, fx.Node)}
