"""Errors raised by mutwo_backend; every message names the problem and the fix."""

from passes.errors import AnalysisError, MutwoError

__all__ = ["AnalysisError", "CaptureError", "MutwoError", "StepDoesNotFitError"]


class CaptureError(MutwoError):
    """A train step could not be captured as one graph."""


class StepDoesNotFitError(MutwoError):
    """A training step needs more device memory than the device has free."""
