"""mutwo: graph-level profiler of a whole PyTorch training iteration, after
the profiler of mu-TWO (Purandare et al., MLSys 2023)."""

from .capture import InputRole, TrainStepGraph, capture_train_step
from .errors import CaptureError, MutwoError
from .separator import SEPFunction, sep

__all__ = [
    "CaptureError", "InputRole", "MutwoError", "SEPFunction", "TrainStepGraph",
    "capture_train_step", "sep",
]
