"""Per-node timers for the profiling interpreter.

Every timer has the same life cycle per iteration: ``start_iteration()``,
``before(i)`` / ``after(i)`` around node i, then ``finish_iteration()``
returns the milliseconds of each node. Names are the ones reports record:

- ``cpu``: ``time.perf_counter_ns`` around each node (CPU execution).
- ``cuda-events``: a CUDA event pair around each node, created once and
  reused, resolved with one synchronize per iteration. It measures launch
  latency plus kernel time: when the interpreter issues work more slowly than
  the GPU runs it, the GPU idles inside the pairs and times come out too high.
- ``cupti``: the GPU's own kernel, memcpy and memset durations, collected
  by torch.profiler (CUPTI) and attributed to the node that launched them.
  Launch gaps are not counted, so per-node times add up to the kernel time of
  the iteration.
"""

import bisect
import time
import warnings

import numpy as np
import torch
from torch._C._profiler import _RecordFunctionFast
from torch.autograd import _enable_record_function
from torch.profiler import ProfilerActivity, profile

TIMERS = ("cpu", "cuda-events", "cupti")


def default_timer(device: torch.device) -> str:
    return "cupti" if device.type == "cuda" else "cpu"


def make_timer(name: str, node_count: int, untimed: frozenset[int] = frozenset(),
               span_iterations: bool = False):
    """A timer for ``node_count`` nodes; the nodes in ``untimed`` are never
    timed and take 0 ms. With ``span_iterations`` a cupti timer keeps one
    profiler session over iterations and fills in their times at ``flush()``.
    The name is checked by arguments.check_timer."""
    if name == "cuda-events":  # the one that must know: an event pair never recorded cannot be read
        return CudaEventTimer(node_count, untimed)
    if name == "cupti":
        return CuptiTimer(node_count, span_iterations)
    return CpuTimer(node_count)


class CpuTimer:
    """Host wall time per node."""

    def __init__(self, node_count: int):
        self._start_ns = np.zeros(node_count, dtype=np.int64)
        self._end_ns = np.zeros(node_count, dtype=np.int64)

    def start_iteration(self):
        self._start_ns[:] = 0
        self._end_ns[:] = 0

    def before(self, i: int):
        self._start_ns[i] = time.perf_counter_ns()

    def after(self, i: int):
        self._end_ns[i] = time.perf_counter_ns()

    def finish_iteration(self) -> np.ndarray:
        return (self._end_ns - self._start_ns) / 1e6

    def flush(self):
        pass


class CudaEventTimer:
    """A CUDA event pair per timed node, created once; one synchronize per iteration."""

    def __init__(self, node_count: int, untimed: frozenset[int] = frozenset()):
        self._timed = [i for i in range(node_count) if i not in untimed]
        self._starts = [torch.cuda.Event(enable_timing=True) for _ in range(node_count)]
        self._ends = [torch.cuda.Event(enable_timing=True) for _ in range(node_count)]

    def start_iteration(self):
        pass

    def before(self, i: int):
        self._starts[i].record()

    def after(self, i: int):
        self._ends[i].record()

    def finish_iteration(self) -> np.ndarray:
        torch.cuda.synchronize()
        times_ms = np.zeros(len(self._starts))
        times_ms[self._timed] = [self._starts[i].elapsed_time(self._ends[i]) for i in self._timed]
        return times_ms

    def flush(self):
        pass


class CuptiTimer:
    """GPU activity durations from torch.profiler, attributed to nodes.

    Each node runs inside a "mutwo#<iteration>#<i>" range
    (``_RecordFunctionFast``, the C++ range torch.compile's generated code
    uses: 1.3 us a node on the H200's host against 7.2 us for
    ``record_function``). A GPU event links (``linked_correlation_id``) to
    the CUDA call that launched it; that call's start time falls inside
    exactly one node's range.

    The node's own ops run with record functions off: the profiler then
    records no CPU event per aten op (the range and the CUDA launches are
    what attribution needs), which spares the host their cost three times:
    while the ops run, when the session ends, and in the attribution.

    With ``span_iterations`` one profiler session covers every iteration
    until ``flush()``, which fills in the arrays ``finish_iteration``
    returned. Ending a session (synchronizing, stopping the profiler,
    reading and attributing its events) took 0.19 s of an interpreted
    iteration's 0.39 s for ResNet-152 on the H200; the profiler then starts
    and stops once, and only the attribution (0.085 s) stays per iteration."""

    _PREFIX = "mutwo#"

    def __init__(self, node_count: int, span_iterations: bool = False):
        self._node_count = node_count
        self._span = span_iterations
        self._names: list[str] = []
        self._pending: list[np.ndarray] = []  # this session's iterations, in order
        self._profiler = None
        self._range = None

    def start_iteration(self):
        if self._profiler is None:
            self._profiler = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            self._profiler.__enter__()
        prefix = f"{self._PREFIX}{len(self._pending)}#"
        self._names = [f"{prefix}{i}" for i in range(self._node_count)]

    def before(self, i: int):
        self._range = _RecordFunctionFast(self._names[i])
        self._range.__enter__()
        _enable_record_function(False)

    def after(self, i: int):
        _enable_record_function(True)
        self._range.__exit__(None, None, None)

    def finish_iteration(self) -> np.ndarray:
        times_ms = np.zeros(self._node_count)
        if self._profiler is None:  # flushed by a failed run
            return times_ms
        self._pending.append(times_ms)
        if not self._span:
            self.flush()
        return times_ms

    def flush(self):
        """Stop the session and fill in its iterations' times. (A failed run
        calls it too: a node that raised did not reach after().)"""
        _enable_record_function(True)
        if self._profiler is None:
            return
        torch.cuda.synchronize()
        with warnings.catch_warnings():  # a new profile per session is intended
            warnings.filterwarnings("ignore", message="Profiler clears events")
            self._profiler.__exit__(None, None, None)
        events = self._profiler.profiler.kineto_results.events()
        self._profiler = None
        self._attribute(events, self._pending)
        self._pending = []

    def _attribute(self, events, iterations: list[np.ndarray]) -> None:
        ranges, cpu_start_ns, gpu_events = [], {}, []
        for event in events:
            if event.device_type() == torch.autograd.DeviceType.CPU:
                cpu_start_ns[event.correlation_id()] = event.start_ns()
                name = event.name()
                if name.startswith(self._PREFIX):
                    iteration, node = name[len(self._PREFIX):].split("#")
                    ranges.append((event.start_ns(), event.end_ns(), int(iteration), int(node)))
            else:
                gpu_events.append(event)
        ranges.sort()
        starts = [r[0] for r in ranges]
        for event in gpu_events:
            launch_ns = cpu_start_ns.get(event.linked_correlation_id())
            where = bisect.bisect_right(starts, launch_ns) - 1 if launch_ns is not None else -1
            if where >= 0 and launch_ns <= ranges[where][1] and ranges[where][2] < len(iterations):
                _, _, iteration, node = ranges[where]
                iterations[iteration][node] += event.duration_ns() / 1e6
