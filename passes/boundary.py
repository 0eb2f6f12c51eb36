"""Boundary pass: where forward ends and backward starts, and the region of
every node (FORWARD, LOSS, BACKWARD, OPTIMIZER).

Train-step graphs carry separator ops (``separator.sep`` after the model
output, ``separator.sep_backward`` where its gradient arrives) and the
optimizer's ``record_function`` markers. AOTAutograd joint graphs carry
partitioner tags (``is_forward`` / ``is_backward``) instead."""

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

from torch import fx

from .enums import Region
from .errors import AnalysisError

SEP_TARGETS = ("separator.sep.default",)
SEP_BACKWARD_TARGETS = ("separator.sep_backward.default",)
RECORD_FUNCTION_ENTER = "profiler._record_function_enter_new.default"
SEED_TARGET = "aten.ones_like.default"
FORWARD_TAGS = ("is_forward", "must_be_in_forward")


@dataclass(frozen=True)
class Boundary:
    """``sep_rank`` / ``sep_backward_rank``: the separator nodes; FORWARD is
    every rank below sep_rank, LOSS the ranks from it to sep_backward_rank.
    A joint graph has no loss region: both are its first backward rank.
    ``optimizer_rank``: first node of the optimizer, or None."""

    sep_rank: int
    sep_backward_rank: int
    optimizer_rank: int | None
    regions: Mapping[fx.Node, Region]
    joint: bool  # True for an AOTAutograd joint graph
    # The loss's own backward, traced before sep_backward (LOSS region): from
    # the autograd seed (ones_like of the loss) on.
    loss_backward: frozenset[fx.Node] = frozenset()
    backward_start_rank: int = 0  # first node of loss_backward, else sep_backward_rank

    def runs_backward(self, node: fx.Node) -> bool:
        """A node of the backward pass: in BACKWARD, or the loss's backward."""
        return self.regions[node] is Region.BACKWARD or node in self.loss_backward


def target_name(node: fx.Node) -> str:
    return str(node.target)


def find_boundary(nodes: tuple[fx.Node, ...]) -> Boundary:
    targets = [target_name(n) if n.op == "call_function" else "" for n in nodes]
    seps = [i for i, t in enumerate(targets) if t in SEP_TARGETS]
    if seps:
        return _train_step_boundary(nodes, targets, seps)
    if any(n.meta.get("partitioner_tag") == "is_backward" for n in nodes):
        return _joint_boundary(nodes)
    raise AnalysisError(
        "the graph has no torch.ops.separator.sep node and no AOTAutograd partitioner tags, so "
        "forward and backward cannot be told apart: capture it with "
        "mutwo_backend.capture_train_step (whose train_step calls mutwo_backend.sep on the model "
        "output) or profile through torch.compile(model, backend='mutwo_profile').")


def _train_step_boundary(nodes, targets, seps) -> Boundary:
    if len(seps) > 1:
        raise AnalysisError(f"the graph holds {len(seps)} separator.sep nodes: call "
                            "mutwo_backend.sep exactly once, on the model output.")
    sep_rank = seps[0]
    backwards = [i for i, t in enumerate(targets) if t in SEP_BACKWARD_TARGETS]
    if not backwards:
        raise AnalysisError("the graph has separator.sep but no separator.sep_backward: the loss "
                            "must be computed from the tensor sep returns, and backward() called.")
    sep_backward_rank = backwards[0]
    optimizer_rank = _optimizer_start(nodes, targets, sep_backward_rank)
    regions = {}
    for rank, node in enumerate(nodes):
        if rank < sep_rank:
            regions[node] = Region.FORWARD
        elif rank < sep_backward_rank:
            regions[node] = Region.LOSS
        elif optimizer_rank is None or rank < optimizer_rank:
            regions[node] = Region.BACKWARD
        else:
            regions[node] = Region.OPTIMIZER
    loss_backward = _loss_backward(nodes[sep_rank:sep_backward_rank])
    backward_start = min((r for r in range(sep_rank, sep_backward_rank) if nodes[r] in loss_backward),
                         default=sep_backward_rank)
    return Boundary(sep_rank, sep_backward_rank, optimizer_rank, MappingProxyType(regions), joint=False,
                    loss_backward=loss_backward, backward_start_rank=backward_start)


def _loss_backward(loss_nodes) -> frozenset[fx.Node]:
    """loss.backward() starts by seeding the gradient with ones_like(loss);
    everything traced from there to sep_backward is the loss's backward."""
    seeds = [i for i, n in enumerate(loss_nodes) if target_name(n) == SEED_TARGET]
    return frozenset(loss_nodes[seeds[0]:]) if seeds else frozenset()


def _optimizer_start(nodes, targets, after: int) -> int | None:
    """The optimizer begins at its first record_function marker
    ('Optimizer.step#...' or 'Optimizer.zero_grad#...') after backward starts."""
    for rank in range(after, len(nodes)):
        if targets[rank] == RECORD_FUNCTION_ENTER and str(nodes[rank].args[0]).startswith("Optimizer."):
            return rank
    return None


def _joint_boundary(nodes) -> Boundary:
    """Forward is every node up to the last one tagged for the forward pass,
    tangents excepted; the rest is backward. That is where default_partition
    (torch >= 2.11) cuts the joint graph, so an ACT here is exactly a value it
    saves for backward. Buffer mutations (copy_ into batch norm's running
    statistics, tagged must_be_in_forward) sit after the backward nodes; they
    stay FORWARD but do not move the cut."""
    last_forward = max(rank for rank, node in enumerate(nodes)
                       if node.op == "placeholder" and not _is_tangent(node)
                       or node.meta.get("partitioner_tag") in FORWARD_TAGS and not _is_mutation_epilogue(node))
    regions = {node: Region.FORWARD if (rank <= last_forward or _is_mutation_epilogue(node))
               and not _is_tangent(node) else Region.BACKWARD
               for rank, node in enumerate(nodes)}
    # no loss region: both separator ranks sit on the first backward node
    boundary_rank = last_forward + 1
    return Boundary(boundary_rank, boundary_rank, None, MappingProxyType(regions), joint=True,
                    backward_start_rank=boundary_rank)


def _is_mutation_epilogue(node: fx.Node) -> bool:
    return target_name(node) == "aten.copy_.default" and node.meta.get("partitioner_tag") == "must_be_in_forward"


def _is_tangent(node: fx.Node) -> bool:
    return node.op == "placeholder" and node.name.startswith("tangents")
