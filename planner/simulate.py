"""Memory of the step as the rewriter makes it under a set of choices,
simulated at storage level (μ-TWO's Algorithm G, over storages rather than
tensors: a view never looks like a saving), exactly: every recompute's
copies are the steps they are in the rewritten graph.

A storage is live from the node that allocates it to its last use. A
recomputed storage dies at its last forward access; just before its first
backward reader the union of the recomputes read there runs once, in graph
order: a node that allocates in the original allocates a copy, an in-place
node (run out of place) a new storage the size of the one it writes, a
view nothing. A copy lives until its last read in the chain or, for a
storage rebuilt there, until that storage's last use; what a chain reads
lives until it is read. A swapped storage is away from ``away_from`` (its
device copy freed before that node) to ``back_at`` (allocated again before
that node, at its prefetch)."""

from dataclasses import dataclass

import numpy as np

from .problem import PlanningProblem


@dataclass(frozen=True)
class Away:
    """A storage's absence from the device: from the node ``away_from`` to
    the node ``back_at``."""

    nbytes: int
    away_from: int
    back_at: int


class MemoryTimeline:
    """``during[r]``: the most bytes live while node r runs or while the
    recompute steps just before it run, plus the problem's measured offset:
    the measured kind of peak. ``choices``: greedy.Choice (none: the
    profiled step, freeing every value at its last use)."""

    def __init__(self, problem: PlanningProblem, choices=()):
        self.problem = problem
        count = len(problem.node_names)
        last = problem.storage_free_rank.copy()
        chains: dict[int, set[int]] = {}
        rebuilt: dict[int, list[int]] = {}  # reader rank -> storages rebuilt there
        swapped = []
        rank = problem.rank_of if choices else {}
        for choice in choices:
            c = choice.candidate
            if choice.action == "recompute":
                last[c.storage] = c.last_fw_rank
                chains.setdefault(c.first_bw_rank, set()).update(rank[n] for n in c.recompute_nodes)
                rebuilt.setdefault(c.first_bw_rank, []).append(c.storage)
            else:
                swapped.append((c.storage, choice.away.away_from, choice.away.back_at))
        inserted = np.zeros(count, dtype=np.int64)
        for reader, nodes in chains.items():
            inserted[reader] = len(nodes)
        self.position = np.arange(count) + np.cumsum(inserted)  # of each node in the rewritten graph
        size = count + int(inserted.sum())
        first = self.position[problem.storage_alloc_rank]
        end = self.position[last]
        copies = []
        for reader in sorted(chains):
            copies += _chain_intervals(problem, sorted(chains[reader]), rebuilt[reader],
                                       int(self.position[reader]) - len(chains[reader]), self.position, end)
        nbytes = problem.storage_bytes.copy()
        returns = []
        for storage, away_from, back_at in swapped:
            returns.append((int(self.position[back_at]), int(end[storage]), int(nbytes[storage])))
            end[storage] = self.position[away_from] - 1
        extra = np.array(copies + returns, dtype=np.int64).reshape(-1, 3)
        self.first = np.concatenate([first, extra[:, 0]])
        self.end = np.concatenate([end, extra[:, 1]])
        self.nbytes = np.concatenate([nbytes, extra[:, 2]])
        change = np.zeros(size + 1, dtype=np.int64)
        np.add.at(change, self.first, self.nbytes)
        np.add.at(change, self.end + 1, -self.nbytes)
        self.during_steps = np.cumsum(change)[:size] + problem.offset_bytes
        starts = np.concatenate([[0], self.position[:-1] + 1])
        self.during = np.maximum.reduceat(self.during_steps, starts)

    @property
    def peak_bytes(self) -> int:
        return int(self.during.max())

    @property
    def peak_rank(self) -> int:
        return int(self.during.argmax())

    def over(self, budget_bytes: int) -> np.ndarray:
        """The ranks whose memory exceeds the budget."""
        return np.flatnonzero(self.during > budget_bytes)

    def live_by_kind(self, rank: int) -> dict[str, int]:
        """Bytes live while node ``rank`` runs, by the storages' kind (the
        recomputes' copies as "recompute copies")."""
        at = self.position[rank]
        live = (self.first <= at) & (at <= self.end)
        kinds = [*self.problem.storage_kind, *["recompute copies"] * (len(self.first) - len(self.problem.storage_kind))]
        totals: dict[str, int] = {}
        for index in np.flatnonzero(live):
            totals[kinds[index]] = totals.get(kinds[index], 0) + int(self.nbytes[index])
        return totals


def _chain_intervals(problem: PlanningProblem, nodes: list[int], rebuilt: list[int], start: int,
                     position: np.ndarray, end: np.ndarray) -> list[tuple[int, int, int]]:
    """The copies of one reader's chain (``nodes``: ranks, in order; its
    steps take positions from ``start``): (first, last position, bytes).
    Extends ``end`` of the original storages it reads."""
    copies = []  # [first, last, bytes]
    holder: dict[int, int] = {}  # original storage -> its current copy
    refs_of: dict[int, list[tuple[bool, int]]] = {}  # chain node -> (is a copy, copy index or storage)
    in_chain = set(nodes)
    for step, r in enumerate(nodes):
        at = start + step
        for i in problem.node_inputs[r]:
            for is_copy, key in refs_of[i] if i in in_chain else [(False, s) for s in problem.node_storages[i]]:
                if is_copy:
                    copies[key][1] = max(copies[key][1], at)
                else:
                    end[key] = max(end[key], at)
        storages = problem.node_storages[r]
        written = storages[0] if problem.node_in_place[r] and storages else None
        refs = []
        for s in storages:
            if problem.storage_alloc_rank[s] == r or s == written:
                holder[s] = len(copies)
                copies.append([at, at, int(problem.storage_bytes[s])])
            refs.append((True, holder[s]) if s in holder else (False, s))
        refs_of[r] = refs
    for s in rebuilt:  # read in backward until the storage's last use
        copies[holder[s]][1] = int(position[problem.storage_free_rank[s]])
    return [tuple(c) for c in copies]

