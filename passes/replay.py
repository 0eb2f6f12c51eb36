"""How a recompute may replay each forward op, so that the replay gives the
same bits as the original run and changes no state:

- SAME: a deterministic op without side effects runs again as it is.
- OUT_OF_PLACE: an in-place op (``relu_``, ``add_``) runs as its functional
  form. Legal only where what it writes is itself rebuilt by the same
  replay (a replay must not write a value kept for backward).
- SCRATCH_STATISTICS: a training batch norm (``native_batch_norm`` on the
  CPU, cuDNN's and MIOpen's on a GPU) runs with its running statistics
  left out (None): its output uses the batch's statistics, so the bits are
  the same, and the real statistics are updated once.
- VIEW: ``separator.sep`` runs as a plain alias of its input, not as a
  second separator.
- FROM_MASK: dropout on a GPU (``native_dropout``, whose mask autograd
  keeps for backward) is rebuilt from its mask, as its backward scales a
  gradient (``native_dropout_backward``): the generator is not drawn again.
  (The CPU form, ``bernoulli_`` then ``div_`` into a float mask and a
  ``mul``, needs no rule: the ``mul`` replays from the kept mask.)
- NEVER: a random op (it would draw other numbers and advance the
  generator twice), a collective, or a write this module cannot undo.

``replay_op(node)`` is the op a replay calls; the rewriter (Stage 3) uses
it, and ``replay_reason(nodes, storages)`` decides whether a list of nodes
may be replayed at all."""

import enum
import operator

import torch
from torch import fx

from .boundary import SEP_TARGETS, target_name
from .kinds import BATCH_NORM_TARGETS, batch_norm_statistics
from .storage import StorageMap

NATIVE_DROPOUT = "aten.native_dropout.default"
COLLECTIVE_MARKERS = ("c10d", "_functional_collectives", "all_reduce", "all_gather", "reduce_scatter")


class Replay(enum.Enum):
    SAME = "same"
    OUT_OF_PLACE = "out_of_place"
    SCRATCH_STATISTICS = "scratch_statistics"
    VIEW = "view"
    FROM_MASK = "from_mask"
    NEVER = "never"


def replay_rule(node: fx.Node) -> tuple[Replay, str | None]:
    """The rule for ``node``, and for NEVER the reason."""
    name = target_name(node)
    if name in SEP_TARGETS:
        return Replay.VIEW, None
    if name == NATIVE_DROPOUT:
        if dropout_mask(node) is None:
            return Replay.NEVER, f"dropout {node.name} whose mask nothing keeps: a replay would draw other numbers"
        return Replay.FROM_MASK, None
    if torch.Tag.nondeterministic_seeded in getattr(node.target, "tags", ()):
        return Replay.NEVER, f"random op {name} ({node.name}): a replay would draw other numbers"
    if any(marker in name for marker in COLLECTIVE_MARKERS):
        return Replay.NEVER, f"collective {name} ({node.name}): every rank would have to replay it"
    if name in BATCH_NORM_TARGETS:
        return (Replay.SCRATCH_STATISTICS if batch_norm_statistics(node) else Replay.SAME), None
    schema = getattr(node.target, "_schema", None)
    if schema is None or not schema.is_mutable:
        return Replay.SAME, None
    if functional_form(node.target) is None:
        return Replay.NEVER, f"mutation {name} ({node.name}): a replay would apply it twice"
    return Replay.OUT_OF_PLACE, None


def dropout_mask(node: fx.Node) -> fx.Node | None:
    """The node holding ``native_dropout``'s mask (its output 1), if any."""
    return next((u for u in node.users if u.target is operator.getitem and u.args[1] == 1), None)


def dropout_from_mask(value: torch.Tensor, mask: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``native_dropout(value, p, True)`` again, from the mask it drew:
    the op autograd differentiates it with, applied to the value."""
    return torch.ops.aten.native_dropout_backward.default(value, mask, 0.0 if p == 1 else 1.0 / (1.0 - p)), mask


def replay_sources(node: fx.Node) -> tuple[fx.Node, ...]:
    """Values a replay of ``node`` reads beyond its own inputs (dropout's mask)."""
    mask = dropout_mask(node) if target_name(node) == NATIVE_DROPOUT else None
    return (mask,) if mask is not None else ()


def replay_args(node: fx.Node, args: tuple) -> tuple:
    """The arguments a replay of ``node`` calls ``replay_op(node)`` with,
    from the node's own (its inputs already replaced by their copies)."""
    rule, _ = replay_rule(node)
    if rule is Replay.SCRATCH_STATISTICS:  # no running statistics: the batch's are used, nothing is updated
        return (*args[:3], None, None, *args[5:])
    if rule is Replay.FROM_MASK:  # the value, the kept mask, p
        return args[0], dropout_mask(node), args[1]
    return args


def functional_form(op) -> "torch._ops.OpOverload | None":
    """The functional overload of an in-place aten op (``relu_.default`` ->
    ``relu.default``) whose only write is its first argument, or None."""
    schema = getattr(op, "_schema", None)
    if schema is None or not schema.name.endswith("_") or not schema.arguments:
        return None
    writes = [a for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    if len(writes) != 1 or writes[0] is not schema.arguments[0]:
        return None
    namespace, _, packet = schema.name.partition("::")
    functional = getattr(getattr(getattr(torch.ops, namespace), packet[:-1], None), op._overloadname, None)
    if functional is None or functional._schema.is_mutable:
        return None
    return functional


def replay_op(node: fx.Node):
    """The callable a replay of ``node`` runs, with ``replay_args``."""
    rule, reason = replay_rule(node)
    if rule is Replay.NEVER:
        raise ValueError(f"{node.name} may not be replayed: {reason}")
    if rule is Replay.OUT_OF_PLACE:
        return functional_form(node.target)
    if rule is Replay.VIEW:
        return torch.ops.aten.alias.default
    if rule is Replay.FROM_MASK:
        return dropout_from_mask
    return node.target


def replay_reason(nodes, storages: StorageMap | None = None) -> str | None:
    """Why replaying ``nodes`` in order would not reproduce their values or
    would change state; None when it may. An in-place op may be replayed
    out of place only where what it writes is made by ``nodes`` themselves
    (``storages`` says who made what; without it, never)."""
    made = {key for node in nodes for key in (storages.created_by(node) if storages else ())}
    for node in nodes:
        rule, reason = replay_rule(node)
        if rule is Replay.NEVER:
            return reason
        if rule is Replay.FROM_MASK and dropout_mask(node) in nodes:
            return (f"dropout {node.name}'s mask ({dropout_mask(node).name}) is random: it can be kept or swapped, "
                    "not rebuilt")
        if rule is Replay.OUT_OF_PLACE:
            written = node.args[0]
            keys = storages.refs.get(written, ()) if storages and isinstance(written, fx.Node) else ()
            if not keys or not set(keys) <= made:
                return (f"mutation {target_name(node)} ({node.name}): it writes a value the replay does not "
                        "rebuild, which a replay would change")
    return None
