"""Stage 2, the planner: from a profile (a Report's records, schema
mutwo.report/2) and a memory budget to a Plan that keeps, recomputes or
swaps each activation. A pure function of plain data: it runs the same on
a report loaded from report.json, on a machine without a GPU, and knows
nothing of fx.

    problem.py   the planning problem read off the records
    simulate.py  memory under a plan, at storage level (Algorithm G)
    greedy.py    μ-TWO's greedy (Algorithms B to F)
    milp.py      an exact reference for small graphs
    plan.py      the Plan, schema mutwo.plan/1
"""

from .errors import BudgetError, PlanningError
from .plan import PLAN_SCHEMA, Decision, Plan
from .planning import SOLVERS, plan_memory

__all__ = ["BudgetError", "Decision", "PLAN_SCHEMA", "Plan", "PlanningError", "SOLVERS", "plan_memory"]
