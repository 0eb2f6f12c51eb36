"""mutwo: graph-level profiler of a whole PyTorch training iteration, after
the profiler of mu-TWO (Purandare et al., MLSys 2023)."""

from .capture import InputRole, TrainStepGraph, capture_train_step
from .errors import CaptureError, MutwoError, StepDoesNotFitError
from .separator import SEPFunction, sep
from .interpreter import NodeExecutionError, ProfilingInterpreter
from .profiler import GraphProfiler, profile_train_step
from .report import Report
from .backend import get_report, mutwo_profile, register

register()

__all__ = [
    "CaptureError", "GraphProfiler", "InputRole", "MutwoError", "NodeExecutionError",
    "ProfilingInterpreter", "Report", "SEPFunction", "StepDoesNotFitError", "TrainStepGraph", "capture_train_step",
    "get_report", "mutwo_profile", "profile_train_step", "sep",
]
