"""The project's exceptions: every message names the problem and the fix."""


class MutwoError(RuntimeError):
    """Base class of every error mutwo raises on bad input."""


class CaptureError(MutwoError):
    """A train step could not be captured as one graph."""
