"""Errors of the planner; each message names the problem and the fix."""

from passes.errors import MutwoError


class PlanningError(MutwoError):
    """A report or an argument the planner cannot plan from."""


class BudgetError(PlanningError):
    """No plan fits the memory budget; the message names the lowest peak
    the planner reaches and what holds it there."""
