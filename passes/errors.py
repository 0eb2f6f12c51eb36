"""The project's base exception. It lives in the lowest layer (passes) so that
mutwo_backend, which builds on passes, and passes itself share one root."""


class MutwoError(RuntimeError):
    """Base class of every error mutwo raises on bad input; the message names
    the problem and the fix."""


class AnalysisError(MutwoError):
    """A graph lacks what an analysis pass needs."""
