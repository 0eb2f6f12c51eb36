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
- NEVER: a random op (it would draw other numbers and advance the
  generator twice), a collective, or a write this module cannot undo.

``replay_op(node)`` is the op a replay calls; the rewriter (Stage 3) uses
it, and ``replay_reason(nodes, storages)`` decides whether a list of nodes
may be replayed at all."""

import enum

import torch
from torch import fx

from .boundary import SEP_TARGETS, target_name
from .kinds import BATCH_NORM_TARGETS, batch_norm_statistics
from .storage import StorageMap

COLLECTIVE_MARKERS = ("c10d", "_functional_collectives", "all_reduce", "all_gather", "reduce_scatter")


class Replay(enum.Enum):
    SAME = "same"
    OUT_OF_PLACE = "out_of_place"
    SCRATCH_STATISTICS = "scratch_statistics"
    VIEW = "view"
    NEVER = "never"


def replay_rule(node: fx.Node) -> tuple[Replay, str | None]:
    """The rule for ``node``, and for NEVER the reason."""
    name = target_name(node)
    if name in SEP_TARGETS:
        return Replay.VIEW, None
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
    """The callable a replay of ``node`` runs with the node's arguments (for
    SCRATCH_STATISTICS, with args 3 and 4, the running statistics, None)."""
    rule, reason = replay_rule(node)
    if rule is Replay.NEVER:
        raise ValueError(f"{node.name} may not be replayed: {reason}")
    if rule is Replay.OUT_OF_PLACE:
        return functional_form(node.target)
    if rule is Replay.VIEW:
        return torch.ops.aten.alias.default
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
        if rule is Replay.OUT_OF_PLACE:
            written = node.args[0]
            keys = storages.refs.get(written, ()) if storages and isinstance(written, fx.Node) else ()
            if not keys or not set(keys) <= made:
                return (f"mutation {target_name(node)} ({node.name}): it writes a value the replay does not "
                        "rebuild, which a replay would change")
    return None
