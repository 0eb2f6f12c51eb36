"""An exact reference for small graphs: a mixed-integer program
(scipy.optimize.milp, HiGHS) that keeps, recomputes or swaps each
candidate at the least added time, over a *relaxation* of the greedy's
model (greedy.py): every plan the greedy's loop can make is a feasible
point of the program at no more cost, so the program's optimum (HiGHS's
dual bound, ``lower_bound_ms``) bounds from below what any such plan adds,
the greedy's own included. The plan returned is then evaluated honestly,
in the greedy's model.

The program. Memory is constrained only at *constrained ranks*: of the
ranks whose baseline (MemoryTimeline(problem).during, offset included)
exceeds the budget, in each run of consecutive ones over which no
candidate's interval begins or ends, the one of most bytes. There the
baseline, minus the bytes of every candidate away at that rank, is at most
the budget. Per candidate c
(ready: when c.last_fw_rank's node ends; need: when c.first_bw_rank's
node starts):

- recompute (binary, only if c.recomputable): c is away over
  [last_fw_rank + 1, first_bw_rank), as in the greedy's model. Its cost is exactly the
  greedy's merged recompute list (Algorithms E and F): c's own nodes, plus
  the nodes of every candidate reachable from c through recomputed
  sources, each node once (continuous reach and node-use columns, at
  their least exactly the greedy's union of node lists).
- swap (only if allow_swap): at each constrained rank r of c's interval, a
  binary away[r], and a continuous gone[r] >= away[r], non-decreasing in r
  (c's copy out is over by r). Its exposed time e >= 0 (continuous, in the
  objective) is at least
  - swap_out_ms + swap_in_ms - inactive_time_ms: the copies back to back
    (the greedy's copy back starts after its copy out ends);
  - ready + swap_out_ms - start of r, where gone[r]: the compute stream
    waits for the copy out at the rank it is away from;
  - end of r + swap_in_ms - need, where away[r]: its copy back starts after
    r;
  - one copy queue per direction, as the greedy's: for a time t1 and a rank
    r, the copies out of the swaps ready at or after t1 and gone by r run
    one after another from t1 and end by start of r plus the largest of
    their exposures; for a time t2 and a rank r, the copies back of the
    swaps needed by t2 and away at r run one after another from the end of
    r and end by t2 plus the largest of their exposures (the sum of their
    exposures stands for the largest). t1 ranges over ready times, t2 over
    need times.
- at most one of recompute and swap; no recompute of c while a candidate
  holding one of c's recompute_srcs is swapped (the greedy's rule).

Left out, each of which only adds time or memory in the greedy's model:
memory at the other ranks and at the recompute steps the rewritten step
runs before a reader (their copies, and the kept values they read, which
live until then: simulate.py); that a swap is away over one interval;
where the greedy places each copy in its queue (first fit, latest first
for copies back, in the order of its choices) beyond the bounds above; and
its rule that no prefetch starts inside the peak interval (the over-budget
ranks when the swap is chosen), which can expose copies the program
overlaps.

The solution, evaluated honestly. The greedy's loop runs again
(GreedyPlanner's own _recompute and _swap, its queues, its peak rule)
restricted to the program's choices and their actions: while the peak is
over the budget it drops, of the chosen candidates live across the peak,
the one the greedy would; choices it never needs are left out. It runs in
three orders (recomputes first, both at once, swaps first; the order
decides where the greedy places copies) and keeps the cheapest result. If
the peak is still over the budget with no chosen candidate live across it,
the greedy continues unrestricted from there and the schedule says so
(``repaired``); if even that cannot fit, BudgetError naming the replay. So
the Schedule returned always fits the budget, and its peak_bytes and
exposed_ms are the greedy's model's, as the Plan reports them; its time can
exceed the program's objective, and with swaps even the greedy's own plan.

A budget the relaxation cannot meet raises BudgetError with the
relaxation's lowest peak (a second program: every candidate may be away
over its whole interval, the peak minimised), a lower bound of the peak of
any plan of the greedy's model.

Size, measured on this project's 2-core CPU over budgets removing 20 to
80% of the activation bytes live at the peak: without swaps, MAX_SIZE =
200,000 candidates x ranks (a CNN of 24 residual blocks, 123 x 1,312 =
161,376: at most 4.2 s; one of 48 blocks, 616,248: over 60 s; deep MLPs up
to 1,005,684: 1.1 s); with swaps, MAX_SWAP_SIZE = 6,000 (copies as slow as
1 to 4 steps for the activations at the peak: an 8-layer MLP, 18 x 298 =
5,364: at most 6.4 s; a 12-layer one, 10,868: up to the 60 s limit). Above
them milp_schedule refuses and names the greedy. HiGHS stops after
``time_limit_s`` (default 20 s) with its best plan and a weaker bound, or a
PlanningError if it has none.
"""

from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, milp

from .errors import BudgetError, PlanningError
from .greedy import GreedyPlanner, Schedule
from .plan import size_text
from .problem import Candidate, PlanningProblem
from .simulate import MemoryTimeline

MAX_SIZE = 200_000  # candidates x ranks, swaps off
MAX_SWAP_SIZE = 6_000  # candidates x ranks, swaps on
TIME_LIMIT_S = 20.0
_UNIT = float(2 ** 20)  # bytes per unit in the memory rows (MiB): coefficients near 1


@dataclass(frozen=True)
class MilpSchedule(Schedule):
    """The Schedule of the program's choices, replayed in the greedy's
    model, with what the program found. ``objective_ms``: the program's
    cost of its solution (a relaxation's); ``lower_bound_ms``: HiGHS's
    dual bound, at most what any plan of the greedy's model adds (equal to
    objective_ms within 1e-6 relative when ``optimal``); ``chosen``: the
    program's choices, candidate index -> "recompute" or "swap";
    ``repaired``: the greedy had to add choices of its own."""

    objective_ms: float
    lower_bound_ms: float
    optimal: bool
    chosen: dict
    repaired: bool


def milp_schedule(problem: PlanningProblem, budget_bytes: int, allow_swap: bool, *,
                  time_limit_s: float = TIME_LIMIT_S) -> MilpSchedule:
    """The least added time (in the relaxation above) that fits
    ``budget_bytes``, as a Schedule of the greedy's model. Raises
    BudgetError when the relaxation cannot fit the budget (naming its lowest
    peak) or its choices cannot be made to fit, PlanningError for a graph
    above MAX_SIZE or no solution within ``time_limit_s``."""
    ranks, count = len(problem.node_names), len(problem.candidates)
    limit = MAX_SWAP_SIZE if allow_swap else MAX_SIZE
    if count * ranks > limit:
        raise PlanningError(
            f"the exact solver plans graphs of at most {limit:,} candidates x ranks "
            + ("with swaps" if allow_swap else "without swaps") + f"; this one has {count} candidates x {ranks} "
            f"ranks = {count * ranks:,}: use solver='greedy' (μ-TWO's), which plans graphs of any size"
            + (f", or plan without swaps (allow_swap=False, up to {MAX_SIZE:,})" if allow_swap else "") + ".")
    baseline = MemoryTimeline(problem)
    if baseline.peak_bytes <= budget_bytes:
        return MilpSchedule((), baseline.peak_bytes, baseline.peak_rank, 0.0, 0.0, True, {}, False)
    program, recompute, _, away = _program(problem, budget_bytes, allow_swap)
    result = program.solve(time_limit_s)
    if result.status == 2:  # infeasible: the relaxation's lowest peak
        floor, rank = lowest_peak(problem, allow_swap, time_limit_s)
        raise BudgetError(_floor_message(problem, budget_bytes, floor, rank, allow_swap), floor)
    if result.x is None:
        raise PlanningError(
            f"the exact solver found no plan within its time limit of {time_limit_s:g} s ({result.message}): "
            "use solver='greedy', or call milp_schedule with a larger time_limit_s.")
    chosen = {c: "recompute" for c, j in recompute.items() if result.x[j] > 0.5}
    chosen.update({c: "swap" for c, columns in away.items() if max(result.x[j] for j in columns.values()) > 0.5})
    objective = float(result.fun)
    bound = float(result.mip_dual_bound) if result.mip_dual_bound is not None else -np.inf
    try:
        planner, schedule = replay(problem, budget_bytes, allow_swap, chosen)
    except BudgetError as error:
        failure = BudgetError(
            f"the exact solver's relaxation fits a budget of {size_text(budget_bytes)} (at {objective:.3f} ms "
            "added), but its choices, replayed in the greedy's model (recompute steps and what they hold, copy "
            "queues, no prefetch inside the peak interval), do not, and "
            f"neither does the greedy continuing from them: {error}", error.lowest_peak_bytes)
        failure.lower_bound_ms = max(0.0, min(bound, objective))  # (still bounds any plan)
        raise failure from None
    return MilpSchedule(schedule.choices, schedule.peak_bytes, schedule.peak_rank, objective,
                        max(0.0, min(bound, objective)), result.status == 0, chosen, planner.repaired)


class _Program:
    """Columns and sparse rows (sum <= upper) of one mixed-integer program."""

    def __init__(self):
        self.cost, self.integer, self.lower, self.upper = [], [], [], []
        self.rows, self.cols, self.vals, self.row_upper = [], [], [], []

    def column(self, cost: float = 0.0, integer: bool = True, lower: float = 0.0, upper: float = 1.0) -> int:
        self.cost.append(cost)
        self.integer.append(1 if integer else 0)
        self.lower.append(lower)
        self.upper.append(upper)
        return len(self.cost) - 1

    def row(self, coefficients: dict, upper: float) -> None:
        index = len(self.row_upper)
        for col, val in coefficients.items():
            self.rows.append(index)
            self.cols.append(col)
            self.vals.append(val)
        self.row_upper.append(upper)

    def solve(self, time_limit_s: float):
        matrix = sparse.csr_matrix((self.vals, (self.rows, self.cols)), shape=(len(self.row_upper), len(self.cost)))
        return milp(np.array(self.cost), constraints=[LinearConstraint(matrix, -np.inf, np.array(self.row_upper))],
                    integrality=np.array(self.integer), bounds=Bounds(self.lower, self.upper),
                    options={"time_limit": time_limit_s, "mip_rel_gap": 1e-6})


def tight_ranks(problem: PlanningProblem, budget_bytes: int) -> np.ndarray:
    """The ranks the program constrains: of the ranks over the budget in the
    baseline, in each run of them over which no candidate's interval begins
    or ends, the one of most baseline bytes."""
    worst = MemoryTimeline(problem).during
    edges = np.zeros(len(worst) + 1, dtype=bool)
    for c in problem.candidates:
        edges[c.last_fw_rank + 1] = edges[c.first_bw_rank] = edges[c.first_bw_rank + 1] = True
    over = np.flatnonzero(worst > budget_bytes)
    kept, run = [], []
    for r in over:
        if run and (r != run[-1] + 1 or edges[r]):
            kept.append(max(run, key=lambda q: (worst[q], -q)))
            run = []
        run.append(int(r))
    if run:
        kept.append(max(run, key=lambda q: (worst[q], -q)))
    return np.array(kept, dtype=np.int64)


def _program(problem: PlanningProblem, budget_bytes: int, allow_swap: bool
             ) -> tuple[_Program, dict[int, int], dict[int, int], dict[int, dict[int, int]]]:
    """The program of the module's docstring; with, per candidate index,
    its recompute column, its swap column (gone by its last constrained
    rank) and its away columns per constrained rank."""
    during = MemoryTimeline(problem).during
    starts = problem.node_start_ms
    ends = starts + problem.node_ms
    tight = tight_ranks(problem, budget_bytes)
    is_tight = np.zeros(len(during), dtype=bool)
    is_tight[tight] = True
    program = _Program()
    memory: dict[int, dict[int, float]] = {int(r): {} for r in tight}  # rank -> column -> MiB
    recompute, swap = {}, {}
    exposure: dict[int, int] = {}
    gone: dict[int, dict[int, int]] = {}  # candidate -> tight rank -> column
    away: dict[int, dict[int, int]] = {}
    for c in problem.candidates:
        first, last = c.last_fw_rank + 1, c.first_bw_rank
        span = tight[(tight >= first) & (tight < last)]
        if c.recomputable and len(span):
            j = recompute[c.index] = program.column(c.recompute_ms)
            for r in span:
                memory[int(r)][j] = -c.memory_bytes / _UNIT
        if not allow_swap or not len(span):
            continue
        ready, need = float(ends[c.last_fw_rank]), float(starts[c.first_bw_rank])
        e = exposure[c.index] = program.column(1.0, integer=False, upper=np.inf)
        a = away[c.index] = {int(r): program.column() for r in span}
        g = gone[c.index] = {int(r): program.column(integer=False) for r in span}
        previous = None
        for r in map(int, span):
            memory[r][a[r]] = -c.memory_bytes / _UNIT
            program.row({a[r]: 1.0, g[r]: -1.0}, 0.0)  # gone by r if away at r
            if previous is not None:  # and ever after
                program.row({g[previous]: 1.0, g[r]: -1.0}, 0.0)
            if ready + c.swap_out_ms > starts[r]:  # gone by r: the compute stream waits for the copy out
                program.row({g[r]: c.swap_out_ms, e: -1.0}, float(starts[r]) - ready)
            if float(ends[r]) + c.swap_in_ms > need:  # away at r: its copy back starts after r
                program.row({a[r]: c.swap_in_ms, e: -1.0}, need - float(ends[r]))
            previous = r
        s = swap[c.index] = g[int(span[-1])]
        program.row({s: c.swap_out_ms + c.swap_in_ms - c.inactive_time_ms, e: -1.0}, 0.0)
        if c.index in recompute:
            program.row({recompute[c.index]: 1.0, s: 1.0}, 1.0)
    for r, coefficients in memory.items():
        program.row(coefficients, (budget_bytes - int(during[r])) / _UNIT)
    _queue_rows(problem, program, tight, exposure, gone, away)
    holder = problem.holders()
    for c, j in recompute.items():  # no recompute from a swapped source
        for source in _sources(problem.candidates[c], holder):
            if source in swap:
                program.row({j: 1.0, swap[source]: 1.0}, 1.0)
    _chain_columns(problem, program, recompute)
    return program, recompute, swap, away


def _queue_rows(problem: PlanningProblem, program: _Program, tight: np.ndarray, exposure: dict[int, int],
                gone: dict[int, dict[int, int]], away: dict[int, dict[int, int]]) -> None:
    """One queue per direction: what must have been copied by a time runs
    one copy after another (the module's docstring)."""
    starts = problem.node_start_ms
    ends = starts + problem.node_ms
    swapped = [problem.candidates[c] for c in exposure]
    ready = {c.index: float(ends[c.last_fw_rank]) for c in swapped}
    need = {c.index: float(starts[c.first_bw_rank]) for c in swapped}
    spans = {c.index: np.array(sorted(gone[c.index])) for c in swapped}
    for r in map(int, tight):
        # copies out: a window per distinct set, from the latest ready time that makes it
        out = [c for c in swapped if spans[c.index][0] <= r]
        for t1 in sorted({ready[c.index] for c in out}):
            row, total = {}, 0.0
            for c in out:
                if ready[c.index] >= t1:  # gone by r: by its latest tight rank up to r
                    span = spans[c.index]
                    row[gone[c.index][int(span[np.searchsorted(span, r, side="right") - 1])]] = c.swap_out_ms
                    row[exposure[c.index]] = -1.0
                    total += c.swap_out_ms
            if len(row) > 2 and total > starts[r] - t1:
                program.row(row, float(starts[r]) - t1)
        # copies back: a window per distinct set, to the earliest need time that makes it
        there = [c for c in swapped if r in away[c.index]]
        for t2 in sorted({need[c.index] for c in there}):
            row, total = {}, 0.0
            for c in there:
                if need[c.index] <= t2:
                    row.update({away[c.index][r]: c.swap_in_ms, exposure[c.index]: -1.0})
                    total += c.swap_in_ms
            if len(row) > 2 and total > t2 - ends[r]:
                program.row(row, t2 - float(ends[r]))


def _chain_columns(problem: PlanningProblem, program: _Program, recompute: dict[int, int]) -> None:
    """The greedy's merged recompute lists (Algorithms E and F). For the
    recompute of a and each candidate c reachable from a through recompute
    sources (c holds a value a reads, or one a reachable candidate reads):
    reach[a, c] >= reach[a, b] + r_c - 1 for each b reaching c directly
    (reach[a, a] = r_a); for each node n of a reachable candidate's, not of
    a's own, use[a, n] >= reach[a, c] for every c holding n, at n's ms. Both
    continuous in [0, 1]: at their least, the greedy's union of lists."""
    holder, rank = problem.holders(), problem.rank_of
    sources = {a: [s for s in _sources(problem.candidates[a], holder) if s in recompute] for a in recompute}
    nodes = {c: set(problem.candidates[c].recompute_nodes) | set(problem.candidates[c].activations)
             for c in recompute}
    for a, j in recompute.items():
        reach: dict[int, int] = {a: j}
        stack = [a]
        while stack:
            b = stack.pop()
            for c in sources[b]:
                if c not in reach:
                    reach[c] = program.column(integer=False)
                    stack.append(c)
                program.row({reach[b]: 1.0, recompute[c]: 1.0, reach[c]: -1.0}, 1.0)
        holders: dict[str, list[int]] = {}
        for c in reach:
            for node in nodes[c] - nodes[a]:
                if problem.node_ms[rank[node]] > 0:
                    holders.setdefault(node, []).append(c)
        for node, cs in holders.items():
            use = program.column(float(problem.node_ms[rank[node]]), integer=False)
            for c in cs:
                program.row({reach[c]: 1.0, use: -1.0}, 0.0)


def _sources(candidate: Candidate, holder: dict[str, int]) -> list[int]:
    """The other candidates holding a value the candidate's recompute reads."""
    return sorted({holder[s] for s in candidate.recompute_srcs if s in holder} - {candidate.index})


def lowest_peak(problem: PlanningProblem, allow_swap: bool, time_limit_s: float = TIME_LIMIT_S) -> tuple[int, int]:
    """The relaxation's lowest peak (bytes) and its rank: every candidate
    may be recomputed, or (allow_swap) away over its whole interval, as no
    greedy plan's swap is longer; a lower bound of any plan's peak in the
    greedy's model."""
    during = MemoryTimeline(problem).during
    program = _Program()
    peak = program.column(1.0, integer=False, lower=-np.inf, upper=np.inf)
    memory: list[dict[int, float]] = [{peak: -1.0} for _ in during]
    for c in problem.candidates:
        first, last = c.last_fw_rank + 1, c.first_bw_rank
        if first >= last:
            continue
        columns = []
        if c.recomputable:
            columns.append(program.column())
        if allow_swap:
            columns.append(program.column())
        for j in columns:
            for r in range(first, last):
                memory[r][j] = -c.memory_bytes / _UNIT
        if len(columns) == 2:
            program.row({j: 1.0 for j in columns}, 1.0)
    for r, coefficients in enumerate(memory):
        program.row(coefficients, -int(during[r]) / _UNIT)
    result = program.solve(time_limit_s)
    bound = result.mip_dual_bound
    if result.x is None:  # out of time without a plan: HiGHS's bound, at the baseline's peak rank
        floor = int(bound * _UNIT) if bound is not None and np.isfinite(bound) else int(during.min())
        return max(floor, int(during.min())), int(during.argmax())
    x = np.round(result.x)
    exact = during.astype(np.float64)
    for r, coefficients in enumerate(memory):
        exact[r] += sum(v * x[j] for j, v in coefficients.items() if j != peak) * _UNIT
    floor = int(np.rint(exact.max()))
    if result.status != 0 and bound is not None:  # stopped early: its plan's peak may not be the least
        floor = min(floor, int(bound * _UNIT))
    return floor, int(exact.argmax())


ORDERS = ((("recompute",), ("recompute", "swap")), (("recompute", "swap"),), (("swap",), ("recompute", "swap")))


def replay(problem: PlanningProblem, budget_bytes: int, allow_swap: bool, chosen: dict[int, str]
           ) -> tuple["_Replay", Schedule]:
    """The program's choices through the greedy's loop, in each of ORDERS;
    the cheapest that fits with the choices alone, else the cheapest
    repaired one (its planner and schedule). Raises BudgetError if none
    fits."""
    done, error = [], None
    for order in ORDERS:
        planner = _Replay(problem, allow_swap, chosen, order)
        try:
            schedule = planner.run(budget_bytes)
        except BudgetError as failure:
            error = failure
            continue
        done.append((planner.repaired, schedule.added_ms, len(done), planner, schedule))
    if not done:
        raise error
    _, _, _, planner, schedule = min(done)
    return planner, schedule


class _Replay(GreedyPlanner):
    """The greedy's loop restricted to the program's choices (candidate
    index -> "recompute" or "swap"), allowing the actions of each phase of
    ``order`` in turn (the greedy starts no prefetch inside the peak
    interval, so a swap chosen once the recomputes are in may prefetch
    earlier); then, if the peak is still over the budget, any candidate
    (``repaired``)."""

    def __init__(self, problem: PlanningProblem, allow_swap: bool, chosen: dict[int, str], order=ORDERS[0]):
        super().__init__(problem, allow_swap)
        self.actions, self.order, self.allowed, self.repaired = chosen, order, order[0], False

    def _recomputable(self, candidate: Candidate) -> bool:
        return self._allows(candidate, "recompute") and super()._recomputable(candidate)

    def _swappable(self, candidate: Candidate) -> bool:
        return self._allows(candidate, "swap") and super()._swappable(candidate)

    def _allows(self, candidate: Candidate, action: str) -> bool:
        return self.repaired or (action in self.allowed and self.actions.get(candidate.index) == action)

    def run(self, budget_bytes: int) -> Schedule:
        for allowed in self.order:
            self.allowed = allowed
            try:
                return self.plan(budget_bytes)
            except BudgetError:  # none of these is live across the peak, still over budget
                pass
        self.repaired = True
        return self.plan(budget_bytes)


def _floor_message(problem: PlanningProblem, budget_bytes: int, floor: int, rank: int, allow_swap: bool) -> str:
    return (f"no plan fits a budget of {size_text(budget_bytes)} ({budget_bytes:,} B): the exact solver's lowest "
            f"peak is {size_text(floor)} ({floor:,} B), while {problem.node_names[rank]} (rank {rank}) runs, with "
            "every activation that can go away wherever it frees most (a lower bound: no plan goes below it). "
            f"Raise the budget to at least {floor:,} B or use a smaller batch"
            + ("" if allow_swap else ", or allow swaps (allow_swap=True)") + ".")
