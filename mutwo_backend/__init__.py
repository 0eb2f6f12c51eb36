"""mutwo: graph-level profiler and memory planner of a whole PyTorch
training iteration, after mu-TWO (Purandare et al., MLSys 2023)."""

from .capture import InputRole, TrainStepGraph, capture_train_step
from .errors import CaptureError, MutwoError, StepDoesNotFitError
from .separator import SEPFunction, sep
from .interpreter import NodeExecutionError, ProfilingInterpreter
from .profiler import GraphProfiler, profile_train_step
from .report import Report
from .backend import get_report, mutwo_profile, register
from .optimizing_backend import get_plan, mutwo
from planner import BudgetError, Plan, plan_memory  # Stage 2 (the planner package, beside passes)
from .runtime import OptimizedStep, RewriteError, optimize_train_step, rewrite

register()

__all__ = [
    "BudgetError", "CaptureError", "GraphProfiler", "InputRole", "MutwoError", "NodeExecutionError",
    "OptimizedStep", "Plan", "ProfilingInterpreter", "Report", "RewriteError", "SEPFunction", "StepDoesNotFitError",
    "TrainStepGraph", "capture_train_step", "get_plan", "get_report", "mutwo", "mutwo_profile", "optimize_train_step", "plan_memory",
    "profile_train_step", "rewrite", "sep",
]
