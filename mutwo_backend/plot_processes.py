"""A report's memory plots, drawn by child Python processes.

matplotlib's import (0.3 to 0.6 s; more where it first builds its font
cache) and the drawing (0.4 s for ResNet-152's 10,000 nodes on the H200's
host) run Python code: on a thread they would hold the GIL the profiler
needs. Child processes run them on other cores instead, beside whatever the
parent does meanwhile: the profiling, when ``profile_train_step(...,
report_dir=...)`` starts them first, or the writing of the report's other
files, when ``Report.save`` starts them.

Each child loads ``mutwo_backend.plots`` without the package's
``__init__`` (which imports torch), imports matplotlib and draws a small
figure, then waits on its stdin for one plot's data. A child that cannot
start or fails leaves its plot to the parent, with a warning."""

import logging
import os
import pickle
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from .plots import available
from .report import memory_graph

# plots.py's functions, each drawing "<name>.png"
PLOTS = ("memory_breakdown", "memory_timeline")

_CHILD = """
import pickle, sys, types
package = types.ModuleType("mutwo_backend")  # the package without its __init__, which imports torch
package.__path__ = [sys.argv[1]]
sys.modules["mutwo_backend"] = package
from mutwo_backend import plots
plots.warm_up()
request = sys.stdin.buffer.read()
if request:  # (empty: the parent closed the process without a plot to draw)
    name, data, path = pickle.loads(request)
    getattr(plots, name)(data, path)
"""

log = logging.getLogger("mutwo")


class PlotProcesses:
    """One child process per plot of PLOTS, started at once where the
    machine has a core for each beside this process; ``draw`` hands them a
    report and ``wait`` returns when the files are written (a plot without a
    child is drawn here, in ``wait``). Use it as a context manager: leaving
    it ends children that were never used."""

    def __init__(self):
        package_dir = os.path.dirname(os.path.abspath(__file__))
        self._children: dict[str, subprocess.Popen] = {}
        self._pending = {}
        self._senders = ThreadPoolExecutor(max_workers=len(PLOTS), thread_name_prefix="mutwo-plot")
        wanted = available() and _spare_cores() and sys.executable  # (embedded: no Python to start)
        for name in PLOTS if wanted else ():
            try:
                self._children[name] = subprocess.Popen(
                    [sys.executable, "-c", _CHILD, package_dir],
                    stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            except OSError as error:
                log.warning("could not start a process to draw %s.png (%s): drawing it here", name, error)

    def draw(self, data: dict, directory: str) -> None:
        """Start drawing every plot of the report ``data`` into ``directory``."""
        request = {name: (name, plot_data(data), os.path.join(directory, f"{name}.png")) for name in PLOTS}
        for name in PLOTS:
            child = self._children.pop(name, None)
            payload = pickle.dumps(request[name], protocol=pickle.HIGHEST_PROTOCOL)
            # communicate() writes and reads on a helper thread: the pipe holds 64 KiB, and a
            # child only reads its request once matplotlib is imported
            future = self._senders.submit(child.communicate, payload) if child else None
            self._pending[name] = (child, future, request[name])

    def wait(self) -> None:
        """Wait for the plots; draw here each one a child could not."""
        from . import plots

        pending, self._pending = self._pending, {}
        for name, (child, future, (_, data, path)) in pending.items():
            if child is not None:
                _, stderr = future.result()
                if child.returncode == 0:
                    continue
                log.warning("the process drawing %s.png failed (exit code %s): drawing it here\n%s",
                            name, child.returncode, stderr.decode(errors="replace")[-2000:])
            getattr(plots, name)(data, path)

    def close(self) -> None:
        """End the children that were given nothing to draw."""
        for child in self._children.values():
            child.kill()
            child.communicate()
        self._children = {}
        self._senders.shutdown(wait=True)

    def __enter__(self) -> "PlotProcesses":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _spare_cores() -> bool:
    """Whether the children can each have a core beside this process: on
    fewer cores they only compete with it (two cores: 2.0 to 2.3 s to save
    ResNet-152's report against 1.8 to 1.9 s drawing here)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return cores > len(PLOTS)


def plot_data(data: dict) -> dict:
    """What the plots read of a report: its meta, memory and the region and
    peak of each node of the graph the memory timeline follows."""
    nodes = [{"region": n["region"], "peak_bytes": n["peak_bytes"]} for n in memory_graph(data)["nodes"]]
    return {"meta": data["meta"], "memory": data["memory"], "nodes": nodes}
