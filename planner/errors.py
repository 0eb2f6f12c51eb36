"""Errors of the planner; each message names the problem and the fix."""

from passes.errors import MutwoError


class PlanningError(MutwoError):
    """A report or an argument the planner cannot plan from."""


class BudgetError(PlanningError):
    """No plan fits the memory budget; the message names the lowest peak
    the planner reaches and what holds it there. ``lowest_peak_bytes``:
    that peak, where known (a budget above it may fit)."""

    def __init__(self, message: str, lowest_peak_bytes: int | None = None):
        super().__init__(message)
        self.lowest_peak_bytes = lowest_peak_bytes
