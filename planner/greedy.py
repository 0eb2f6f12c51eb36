"""μ-TWO's planner (the paper's Appendix A): a greedy loop that drops, one
at a time, the activation storage whose recompute or swap costs least,
until the re-simulated peak fits the budget.

- Algorithm B, the loop: among the candidates live across the current peak
  (a storage that is away elsewhere frees nothing there), take the best
  recompute candidate (largest recompute ratio) and the best swap candidate
  (longest inactive time), and choose the one of lower overhead.
- Algorithm C, a swap's overhead: its copy out starts when its last forward
  access ends and its copy back must end before its first backward access;
  each direction is one queue (a copy engine each), no prefetch starts
  inside the peak interval, and what the compute stream waits for is the
  overhead.
- Algorithms E and F: once a storage is to be recomputed, every recompute
  that read it rebuilds it first (its nodes and sources join theirs), and
  its own recompute runs once more for each of them.
- Algorithm G: the memory is re-simulated after every choice (simulate.py),
  exactly as the rewriter will make the step, recompute chains and all.
"""

import bisect
import dataclasses
from dataclasses import dataclass

import numpy as np

from .errors import BudgetError
from .plan import size_text
from .problem import Candidate, PlanningProblem
from .simulate import Away, MemoryTimeline

SEARCH_WORK = 1_000_000  # nodes x choices the re-plans may cost in all (a ResNet-152's plan: none)


@dataclass(frozen=True)
class Choice:
    """What was decided for one candidate, with its place in the step."""

    candidate: Candidate  # as it stood when the plan ended (merged recompute lists)
    action: str  # "recompute" or "swap"
    away: Away
    exposed_ms: float  # swap: time the compute stream waits for copies
    swap_out_after: int | None = None  # rank
    prefetch_at: int | None = None  # rank

    @property
    def cost_ms(self) -> float:
        """The time it adds: its recompute's, or its copies' exposed time."""
        return self.candidate.recompute_ms if self.action == "recompute" else self.exposed_ms


@dataclass(frozen=True)
class Schedule:
    """A solver's result: its choices and the memory they leave."""

    choices: tuple[Choice, ...]
    peak_bytes: int
    peak_rank: int

    @property
    def added_ms(self) -> float:
        """The time its recomputes and exposed copies add to the step."""
        return sum(c.cost_ms for c in self.choices)


def greedy_schedule(problem: PlanningProblem, budget_bytes: int, allow_swap: bool) -> Schedule:
    """The greedy's plan, then, where the graph is small enough
    (SEARCH_WORK), the loop run again with each of its choices, costliest
    first, left out: a choice made early for its ratio can make later
    recomputes rebuild it over and over, and the loop never revisits it.
    The cheapest plan that fits wins (deterministic: counted, not timed)."""
    best = GreedyPlanner(problem, allow_swap).plan(budget_bytes)
    work = len(problem.node_names) * max(1, len(best.choices))
    tries = sorted(best.choices, key=lambda c: -c.cost_ms)[:SEARCH_WORK // work]
    banned: frozenset[int] = frozenset()
    for choice in tries:
        trial = banned | {choice.candidate.index}
        try:
            schedule = GreedyPlanner(problem, allow_swap, trial).plan(budget_bytes)
        except BudgetError:
            continue
        if schedule.added_ms < best.added_ms - 1e-9:
            best, banned = schedule, trial
    return best


class CopyQueue:
    """One copy direction: busy intervals (ms), kept sorted; first fit."""

    def __init__(self):
        self.busy: list[tuple[float, float]] = []

    def earliest(self, not_before: float, duration: float) -> float:
        """The earliest start at or after ``not_before`` with ``duration`` free."""
        start = not_before
        for begin, end in self.busy:
            if end <= start:
                continue
            if begin >= start + duration:
                break
            start = end
        return start

    def latest(self, end_by: float, not_before: float, duration: float) -> float | None:
        """The latest start that ends by ``end_by`` and starts at or after
        ``not_before`` in a free gap, or None."""
        end = end_by
        for begin, finish in reversed(self.busy):
            if begin >= end:
                continue
            if finish <= end - duration:
                break
            end = begin
        return end - duration if end - duration >= not_before else None

    def book(self, start: float, duration: float) -> None:
        bisect.insort(self.busy, (start, start + duration))


class GreedyPlanner:
    """One run of the loop over ``problem``; ``plan(budget)`` returns the Schedule."""

    def __init__(self, problem: PlanningProblem, allow_swap: bool, banned: frozenset[int] = frozenset()):
        self.problem, self.allow_swap = problem, allow_swap
        self.timeline = MemoryTimeline(problem)
        self.remaining = {c.index: dataclasses.replace(c) for c in problem.candidates if c.index not in banned}
        self.chosen: dict[int, Choice] = {}
        self.absorbed: set[int] = set()  # chosen recomputes that other recompute lists rebuild
        self.d2h, self.h2d = CopyQueue(), CopyQueue()
        self.end_ms = problem.node_start_ms + problem.node_ms
        self.rank = problem.rank_of
        self.holder = problem.holders()

    def plan(self, budget_bytes: int) -> Schedule:
        while self.timeline.peak_bytes > budget_bytes:
            peak = self.timeline.peak_rank
            live = [c for c in self.remaining.values() if c.last_fw_rank < peak < c.first_bw_rank]
            options = []
            recompute = max((c for c in live if self._recomputable(c)), key=lambda c: c.recompute_ratio, default=None)
            if recompute is not None:
                options.append((recompute.total_recompute_ms, 0, recompute, "recompute"))
            swap = max((c for c in live if self._swappable(c)), key=lambda c: c.inactive_time_ms, default=None)
            if swap is not None:
                options.append((self._swap_overhead(swap, budget_bytes)[0], 1, swap, "swap"))
            if not options:
                raise BudgetError(self._floor_message(budget_bytes), self.timeline.peak_bytes)
            _, _, candidate, action = min(options, key=lambda option: option[:2])
            if action == "recompute":
                self._recompute(candidate)
            else:
                self._swap(candidate, budget_bytes)
            self._simulate()
        self._keep_what_fits(budget_bytes)
        return Schedule(tuple(self.chosen.values()), self.timeline.peak_bytes, self.timeline.peak_rank)

    def _simulate(self) -> None:
        """Algorithm G: the step's memory under the choices so far."""
        self.timeline = MemoryTimeline(self.problem, self.chosen.values())

    def _keep_what_fits(self, budget_bytes: int) -> None:
        """The loop never undoes a choice, and later choices can make an
        earlier one needless: keep again, costliest first, every choice the
        plan still fits without. (Not a recompute that others' recomputes
        absorbed: they read it rebuilt. The copies a swap queued stay
        booked, so its neighbours' times are over-, never under-estimated.)"""
        for index, choice in sorted(self.chosen.items(), key=lambda item: -item[1].cost_ms):
            if index in self.absorbed or choice.cost_ms <= 0:
                continue
            del self.chosen[index]
            self._simulate()
            if self.timeline.peak_bytes > budget_bytes:
                self.chosen[index] = choice
                self._simulate()

    # --- recompute (Algorithms D, E, F) ---------------------------------------

    def _recomputable(self, candidate: Candidate) -> bool:
        """Its own ops are safe to replay, and no source of it is away on the
        host (a recompute reads what is on the device)."""
        return candidate.recomputable and not any(
            self.chosen.get(self.holder.get(src), None) is not None
            and self.chosen[self.holder[src]].action == "swap" for src in candidate.recompute_srcs)

    def _recompute(self, candidate: Candidate) -> None:
        del self.remaining[candidate.index]
        away = Away(candidate.memory_bytes, candidate.last_fw_rank + 1, candidate.first_bw_rank)
        self.chosen[candidate.index] = Choice(candidate, "recompute", away, 0.0)
        for other in [*self.remaining.values(), *(c.candidate for c in self.chosen.values())]:
            if other.index != candidate.index and set(candidate.activations) & set(other.recompute_srcs):
                self._absorb(other, candidate)
                self.absorbed.add(candidate.index)
        for src in candidate.recompute_srcs:  # F: a source's own recompute would run once more for it
            if self.holder.get(src) in self.remaining:
                self.remaining[self.holder[src]].recompute_count += 1

    def _absorb(self, other: Candidate, chosen: Candidate) -> None:
        """``other`` reads ``chosen``, which will not be kept: it rebuilds it
        from chosen's sources first (E for chosen recomputes, F for the rest)."""
        names = set(chosen.activations)
        nodes = sorted(set(other.recompute_nodes) | set(chosen.recompute_nodes) | names, key=self.rank.__getitem__)
        srcs = sorted((set(other.recompute_srcs) - names) | set(chosen.recompute_srcs), key=self.rank.__getitem__)
        other.recompute_nodes, other.recompute_srcs = tuple(nodes), tuple(srcs)
        other.recompute_ms = float(sum(self.problem.node_ms[self.rank[n]] for n in nodes))
        other.recomputable = other.recomputable and chosen.recomputable

    # --- swap (Algorithm C) ----------------------------------------------------

    def _swappable(self, candidate: Candidate) -> bool:
        """Swaps are allowed, and no chosen recompute reads it on the device."""
        return self.allow_swap and not self._read_by_recomputes().intersection(candidate.activations)

    def _read_by_recomputes(self) -> set[str]:
        """The values the chosen recomputes read, for the choices made so far
        (kept once per set of choices: the loop asks for every candidate)."""
        key = (len(self.chosen), id(next(reversed(self.chosen.values()), None)))
        if getattr(self, "_read_key", None) != key:
            self._read_key = key
            self._read = {src for choice in self.chosen.values() if choice.action == "recompute"
                          for src in choice.candidate.recompute_srcs}
        return self._read

    def _swap_overhead(self, candidate: Candidate, budget_bytes: int) -> tuple[float, Away, float, float, int]:
        """(exposed ms, its absence, copy-out start, copy-back start, prefetch rank)."""
        starts, ends = self.problem.node_start_ms, self.end_ms
        peak = self.timeline.peak_rank
        ready = float(ends[candidate.last_fw_rank])
        out_start = self.d2h.earliest(ready, candidate.swap_out_ms)
        out_end = out_start + candidate.swap_out_ms
        away_from = int(np.searchsorted(starts, out_end, side="left"))
        exposed = 0.0
        if away_from > peak:  # the compute stream waits at the peak for the copy to end
            exposed += out_end - float(starts[peak])
            away_from = peak
        away_from = max(away_from, candidate.last_fw_rank + 1)
        # no prefetch inside the peak interval: not before the over-budget ranks ahead of its first use end
        over = self.timeline.over(budget_bytes)
        over = over[(over >= away_from) & (over < candidate.first_bw_rank)]
        not_before = max(out_end, float(ends[over[-1]]) if len(over) else ready)
        need = float(starts[candidate.first_bw_rank])
        in_start = self.h2d.latest(need, not_before, candidate.swap_in_ms)
        if in_start is None:
            in_start = self.h2d.earliest(not_before, candidate.swap_in_ms)
            exposed += in_start + candidate.swap_in_ms - need
        prefetch = int(np.searchsorted(starts, in_start, side="right")) - 1
        prefetch = min(max(prefetch, away_from), candidate.first_bw_rank)
        return exposed, Away(candidate.memory_bytes, away_from, prefetch), out_start, in_start, prefetch

    def _swap(self, candidate: Candidate, budget_bytes: int) -> None:
        exposed, away, out_start, in_start, prefetch = self._swap_overhead(candidate, budget_bytes)
        del self.remaining[candidate.index]
        self.d2h.book(out_start, candidate.swap_out_ms)
        self.h2d.book(in_start, candidate.swap_in_ms)
        self.chosen[candidate.index] = Choice(candidate, "swap", away, exposed, candidate.last_fw_rank, prefetch)

    # --- when no plan fits -------------------------------------------------------

    def _floor_message(self, budget_bytes: int) -> str:
        """The lowest peak reached, what is live there by kind, and the
        largest activations there that stay, with why."""
        problem, peak = self.problem, self.timeline.peak_rank
        by_kind = self.timeline.live_by_kind(peak)
        held = ", ".join(f"{kind} {size_text(b)}" for kind, b in sorted(by_kind.items(), key=lambda kv: -kv[1]) if b)
        staying = sorted((c for c in self.remaining.values() if c.last_fw_rank < peak < c.first_bw_rank),
                         key=lambda c: -c.memory_bytes)[:3]
        why = "; ".join(f"{c.activations[0]} ({size_text(c.memory_bytes)}) cannot be recomputed: "
                        + (c.recompute_reason or "a source of it is swapped out")
                        + ("" if self.allow_swap else ", and swaps are off") for c in staying)
        return (f"no plan fits a budget of {size_text(budget_bytes)}: the lowest peak the planner reaches is "
                f"{size_text(self.timeline.peak_bytes)}, while {problem.node_names[peak]} (rank {peak}) runs, where "
                f"{held} are live" + (f", and {size_text(problem.offset_bytes)} the simulation misses (measured)"
                                      if problem.offset_bytes else "") +
                (f". Activations there that stay: {why}" if staying else
                 ". No activation there can go: it is all read there, or state, gradients and inputs") +
                ". Raise the budget or use a smaller batch" + ("" if self.allow_swap else ", or allow swaps") + ".")


