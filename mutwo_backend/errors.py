"""Errors raised by mutwo_backend; every message names the problem and the fix."""

from passes.errors import AnalysisError, MutwoError

__all__ = ["AnalysisError", "CaptureError", "MutwoError"]


class CaptureError(MutwoError):
    """A train step could not be captured as one graph."""
