"""A report's memory plots, drawn by child Python processes.

matplotlib's import (0.9 s on the H200's host, more where it first builds
its font cache) and the drawing (0.4 s for ResNet-152's 10,000 nodes) run
Python code: on a thread they would hold the GIL the profiler
needs. Child processes run them on other cores instead, beside whatever the
parent does meanwhile: the profiling, when ``profile_train_step(...,
report_dir=...)`` starts them first, or the writing of the report's other
files, when ``Report.save`` starts them.

Each child loads ``mutwo_backend.plots`` without the packages'
``__init__`` (which import torch), imports matplotlib and draws a small
figure, then waits on its stdin for one plot's data. A child that cannot
start or fails leaves its plot to the parent, with a warning."""

import json
import logging
import os
import subprocess
import sys
import tempfile

from .plots import available
from .report import memory_graph

# plots.py's functions, each drawing "<name>.png"
PLOTS = ("memory_breakdown", "memory_timeline")

_CHILD = """
import json, os, sys, types
for name, path in (("mutwo_backend", sys.argv[1]), ("passes", os.path.join(os.path.dirname(sys.argv[1]), "passes"))):
    package = types.ModuleType(name)  # the packages without their __init__, which imports torch
    package.__path__ = [path]
    sys.modules[name] = package
from mutwo_backend import plots
plots.warm_up()
request = sys.stdin.read().splitlines()
if request:  # (none: the parent ended without a plot to draw)
    name, data_path, path, options = request
    with open(data_path) as f:
        getattr(plots, name)(json.load(f), path, **json.loads(options))
"""

log = logging.getLogger("mutwo")


class PlotProcesses:
    """One child process per plot of PLOTS, started at once where the
    machine has a core for each beside this process; ``draw`` hands them a
    report and ``wait`` returns when the files are written (a plot without a
    child is drawn here, in ``wait``). Use it as a context manager: leaving
    it ends children that were never used.

    The data goes through a temporary file and only its name through the
    child's stdin, which therefore never blocks. It goes as JSON, which
    holds plain values only: unpickling a report's meta imported torch in
    the child (torch.__version__ is a str subclass of torch's), 4.4 s on
    the H200's host."""

    def __init__(self):
        package_dir = os.path.dirname(os.path.abspath(__file__))
        self._children: dict[str, tuple[subprocess.Popen, object]] = {}
        self._pending: dict[str, tuple] = {}
        self._data_file = None
        wanted = available() and _spare_cores() and sys.executable  # (embedded: no Python to start)
        for name in PLOTS if wanted else ():
            stderr = tempfile.TemporaryFile()
            try:
                child = subprocess.Popen([sys.executable, "-c", _CHILD, package_dir],
                                         stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=stderr)
            except OSError as error:
                stderr.close()
                log.warning("could not start a process to draw %s.png (%s): drawing it here", name, error)
                continue
            self._children[name] = (child, stderr)

    def draw(self, data: dict, directory: str, options: dict[str, dict] | None = None) -> None:
        """Start drawing every plot of the report ``data`` into ``directory``;
        ``options`` holds keyword arguments per plot name."""
        options = options or {}
        subset = plot_data(data)
        if self._children:
            self._data_file = tempfile.NamedTemporaryFile("w", prefix="mutwo-plot-", suffix=".json", delete=False)
            with self._data_file as f:
                f.write(json.dumps(subset))
        for name in PLOTS:
            path = os.path.join(directory, f"{name}.png")
            child, stderr = self._children.pop(name, (None, None))
            if child is not None:
                child.stdin.write(f"{name}\n{self._data_file.name}\n{path}\n"
                                  f"{json.dumps(options.get(name, {}))}\n".encode())
                child.stdin.close()
            self._pending[name] = (child, stderr, subset, path, options.get(name, {}))

    def wait(self) -> None:
        """Wait for the plots; draw here each one a child could not."""
        from . import plots

        for name in list(self._pending):
            child, stderr, data, path, plot_options = self._pending[name]
            if child is not None:
                returncode = child.wait()
                stderr.seek(0)
                message = stderr.read().decode(errors="replace")[-2000:]
                stderr.close()
            del self._pending[name]  # (until here close() would end the child)
            if child is None or returncode != 0:
                if child is not None:
                    log.warning("the process drawing %s.png failed (exit code %s): drawing it here\n%s",
                                name, returncode, message)
                getattr(plots, name)(data, path, **plot_options)
        self._remove_data_file()

    def close(self) -> None:
        """End the children still running: those given nothing to draw, and
        those whose plot nobody waits for (the caller failed after draw)."""
        running = [*self._children.values(), *((c, e) for c, e, *_ in self._pending.values() if c)]
        for child, stderr in running:
            child.kill()
            child.wait()
            stderr.close()
        self._children, self._pending = {}, {}
        self._remove_data_file()

    def _remove_data_file(self) -> None:
        if self._data_file is not None:
            os.unlink(self._data_file.name)
            self._data_file = None

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
    """What the plots read of a report: its meta, memory and, for each node
    of the graph the memory timeline follows, its name, module, region,
    time and peak."""
    nodes = [{key: n.get(key) for key in ("name", "module", "region", "run_time_ms", "peak_bytes")}
             for n in memory_graph(data)["nodes"]]
    return {"meta": data["meta"], "memory": data["memory"], "nodes": nodes}
