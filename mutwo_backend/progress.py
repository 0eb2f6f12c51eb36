"""Progress of long jobs: a log line when a phase starts and one when it
ends with its duration; the durations are kept by phase name."""

import contextlib
import logging
import time

log = logging.getLogger("mutwo")


class PhaseLog:
    """``with phases.phase("capture"): ...`` or ``phases.run("saving", fn, *args)``;
    ``seconds`` maps each phase's name, without a parenthesised detail such
    as "(3 iterations)", to its duration."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str):
        began = time.perf_counter()
        log.info("%s ...", name)
        yield
        took = time.perf_counter() - began
        self.seconds[name.split(" (")[0]] = took
        log.info("%s done in %.1f s", name, took)

    def run(self, name: str, fn, *args, **kwargs):
        with self.phase(name):
            return fn(*args, **kwargs)
