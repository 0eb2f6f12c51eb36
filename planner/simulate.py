"""Memory under a plan, re-simulated at storage level (μ-TWO's Algorithm G,
over storages rather than tensors: a view never looks like a saving).

Every storage is live while the nodes from its allocation to its last use
run. A dropped candidate is away from ``away_from`` (the first rank whose
node runs without it) until ``back_at`` (the rank from which it is there
again: its recompute's, or its prefetch's), and a recompute holds its
intermediates at ``back_at`` too. Changes apply in place, one choice at a
time, so the greedy re-simulates in O(ranks) per choice."""

from dataclasses import dataclass

import numpy as np

from .problem import PlanningProblem


@dataclass(frozen=True)
class Away:
    """A storage's absence from the device, and what its return holds."""

    nbytes: int
    away_from: int
    back_at: int
    transient_bytes: int = 0  # alive while back_at runs (a recompute's intermediates)


class MemoryTimeline:
    """``during[r]``: bytes live while node r runs, plus the problem's
    measured offset: the measured kind of peak."""

    def __init__(self, problem: PlanningProblem):
        count = len(problem.node_names)
        change = np.zeros(count + 1, dtype=np.int64)
        np.add.at(change, problem.storage_alloc_rank, problem.storage_bytes)
        np.add.at(change, problem.storage_free_rank + 1, -problem.storage_bytes)
        self.during = np.cumsum(change)[:count] + problem.offset_bytes

    def apply(self, away: Away) -> None:
        self.during[away.away_from:away.back_at] -= away.nbytes
        self.during[away.back_at] += away.transient_bytes

    def restore(self, away: Away) -> None:
        """Undo ``apply``: the storage is kept again."""
        self.during[away.away_from:away.back_at] += away.nbytes
        self.during[away.back_at] -= away.transient_bytes

    def extend(self, nbytes: int, first: int, last: int) -> None:
        """Hold ``nbytes`` from rank ``first`` to ``last`` too (a kept value
        a recompute reads after its last use)."""
        if first <= last:
            self.during[first:last + 1] += nbytes

    @property
    def peak_bytes(self) -> int:
        return int(self.during.max())

    @property
    def peak_rank(self) -> int:
        return int(self.during.argmax())

    def over(self, budget_bytes: int) -> np.ndarray:
        """The ranks whose memory exceeds the budget."""
        return np.flatnonzero(self.during > budget_bytes)
