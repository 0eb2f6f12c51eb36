"""ProfilingInterpreter: runs an fx graph node by node and records, per node,
its run time, the allocator's memory around it and (optionally) real swap
copies of activations, without changing any result."""

import operator
import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import fx

from passes import GraphAnalysis

from .device_memory import AllocatorReadings
from .errors import MutwoError
from .optimizers import EAGER_EQUIVALENTS
from .swap import SwapCopies
from .timers import make_timer


class NodeExecutionError(MutwoError):
    """A node raised while the graph ran; names the node."""


@dataclass
class IterationRecord:
    """What one run of a graph measured, per node in graph order.

    The memory arrays come from the CUDA caching allocator. They are None
    on the CPU, where the memory simulation pass stands in for them, and in
    iterations run with ``read_memory=False``."""

    run_time_ms: np.ndarray
    wall_ms: float
    allocated_after_bytes: np.ndarray | None = None
    peak_bytes: np.ndarray | None = None
    # The allocator's peak between the end of the previous run on the device
    # and the start of this one: code outside the graph, such as the eager
    # loss between torch.compile's forward and backward graphs. None where
    # the memory arrays are None.
    peak_before_bytes: int | None = None
    # The compile backend's joint records: peak_before_bytes of the forward
    # and backward graphs, as {"before_forward": B, "before_backward": B}.
    outside_peak_bytes: dict[str, int] = field(default_factory=dict)
    swap_out_measured_ms: dict[str, float] = field(default_factory=dict)
    swap_in_measured_ms: dict[str, float] = field(default_factory=dict)


class ProfilingInterpreter(fx.Interpreter):
    """Interprets ``gm`` with a timer around every node.

    ``swap_out_after`` maps a node name to the activations whose last forward
    access it is; ``swap_in_before`` maps a node name to the activations whose
    first backward access it is. With ``measure_swaps`` (CUDA only) those
    activations are really copied to pinned host memory and back on a side
    stream; the copies are timed and never used, so results do not change.

    Values are freed after their last use, or after the node that
    ``freed_after`` names for them if that comes later: where eager drops
    its last reference (lifetimes.py), so that memory is eager's.

    With ``span_iterations`` the cupti timer profiles every iteration in
    one session: call ``flush_timer()`` before reading their times.

    ``getitem`` nodes (Python indexing into a multi-output op's result, 40%
    of a ResNet-152 train step's nodes) launch no kernel and allocate
    nothing: they are not timed (0 ms) and repeat the allocator reading of
    the node before them, which spares their share of the host time."""

    def __init__(self, gm: fx.GraphModule, device: torch.device, timer: str,
                 swap_out_after: Mapping[str, Sequence[str]] = None,
                 swap_in_before: Mapping[str, Sequence[str]] = None,
                 measure_swaps: bool = False, freed_after: Mapping[str, str] = None,
                 span_iterations: bool = False):
        super().__init__(gm, garbage_collect_values=True)
        self.nodes = list(gm.graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.by_name = {n.name: n for n in self.nodes}
        self._free_as_eager_does(freed_after or {})
        self.device = device
        self.timer_name = timer
        self.untimed = frozenset(i for i, n in enumerate(self.nodes) if _is_getitem(n))
        self.timer = make_timer(timer, len(self.nodes), self.untimed, span_iterations)
        self.on_cuda = device.type == "cuda"
        self._allocator = AllocatorReadings(device) if self.on_cuda else None
        self.swap_out_after = {self.by_name[k]: v for k, v in (swap_out_after or {}).items()}
        self.swap_in_before = {self.by_name[k]: v for k, v in (swap_in_before or {}).items()}
        if measure_swaps and not self.on_cuda:
            raise MutwoError("swap='measure' copies activations to pinned host memory and needs "
                             "a CUDA device: use swap='model' on the CPU.")
        self.swaps = SwapCopies() if measure_swaps else None

    def _free_as_eager_does(self, freed_after: Mapping[str, str]) -> None:
        """Move each value's deletion to where eager frees it, if later."""
        freed_at = {n: user for user, values in self.user_to_last_uses.items() for n in values}
        for name, after in freed_after.items():
            node, eager = self.by_name.get(name), self.by_name.get(after)
            if node is None or eager is None or node.op == "placeholder":
                continue
            graph = freed_at.get(node)
            if graph is None or self.index[eager] > self.index[graph]:
                if graph is not None:
                    self.user_to_last_uses[graph].remove(node)
                self.user_to_last_uses.setdefault(eager, []).append(node)

    def run_iteration(self, *args, boxed: bool = False, read_memory: bool = True):
        """Run the graph once; return (outputs, IterationRecord). With
        ``boxed``, ``args`` is one list that is emptied, so inputs are freed at
        their last use (AOTAutograd's calling convention).

        ``read_memory=False`` skips the allocator readings (a quarter of the
        host time per node): every iteration of a graph allocates the same,
        so callers read them in one measured iteration and time all."""
        count = len(self.nodes)
        self._reading = self.on_cuda and read_memory
        # rows: allocated after the node, the node's peak
        self._memory = np.zeros((2, count), dtype=np.int64) if self._reading else None
        peak_before = self._allocator.allocated_and_peak_bytes()[1] if self._reading else None
        start = time.perf_counter()
        self.timer.start_iteration()
        try:
            out = self.boxed_run(args[0]) if boxed else self.run(*args)
        except BaseException:
            self.timer.flush()  # a profiler session must not outlive a failed run
            raise
        finally:
            # fx.Interpreter keeps its env after run(): the output node's entry
            # would hold the outputs (a forward graph's saved activations)
            # until the next run, past their last use in backward.
            self.env = {}
            run_time_ms = self.timer.finish_iteration()
        if self.on_cuda:
            torch.cuda.synchronize()
            self._allocator.reset_peak()  # from here the peak is the next run's peak_before_bytes
        wall_ms = (time.perf_counter() - start) * 1e3
        record = IterationRecord(run_time_ms, wall_ms, peak_before_bytes=peak_before)
        if self._reading:
            record.allocated_after_bytes, record.peak_bytes = self._memory
        if self.swaps is not None:
            record.swap_out_measured_ms, record.swap_in_measured_ms = self.swaps.finish()
        return out, record

    def flush_timer(self) -> None:
        """Fill in the times of iterations whose timer spans them (cupti with
        ``span_iterations``); their records hold zeros until then."""
        self.timer.flush()

    def call_function(self, target, args, kwargs):
        """Optimizer ops run as the eager optimizer does: functional fused
        Adam(W) in place, copies of a tensor into itself skipped (same values,
        eager's memory and time; see optimizers.EAGER_EQUIVALENTS)."""
        return super().call_function(EAGER_EQUIVALENTS.get(target, target), args, kwargs)

    def run_node(self, n: fx.Node):
        i = self.index[n]
        self._swap_in_before(n)
        if i in self.untimed:
            return self._run_getitem(n, i)
        if self._reading:
            self._allocator.reset_peak()
        self.timer.before(i)
        try:
            result = super().run_node(n)
        except Exception as error:
            raise NodeExecutionError(
                f"node {n.name} (rank {i}, {n.op} {n.target}) failed: {type(error).__name__}: {error}"
            ) from error
        self.timer.after(i)
        if self._reading:
            self._memory[0, i], self._memory[1, i] = self._allocator.allocated_and_peak_bytes()
        self._swap_out_after(n, result)
        return result

    def _run_getitem(self, n: fx.Node, i: int):
        collection, index = n.args
        result = self.env[collection][index]
        if self._reading:
            allocated = self._memory[0, i - 1]  # (a getitem is never a graph's first node)
            self._memory[:, i] = allocated, allocated
        self._swap_out_after(n, result)
        return result

    def _swap_in_before(self, n: fx.Node) -> None:
        if self.swaps is not None and n in self.swap_in_before:
            for name in self.swap_in_before[n]:
                self.swaps.copy_in(name, self.env[self.by_name[name]])

    def _swap_out_after(self, n: fx.Node, result) -> None:
        if self.swaps is not None and n in self.swap_out_after:
            for name in self.swap_out_after[n]:
                value = result if name == n.name else self.env[self.by_name[name]]
                self.swaps.copy_out(name, value)


def _is_getitem(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target is operator.getitem
            and isinstance(node.args[0], fx.Node) and not node.kwargs)


def swap_points(analysis: GraphAnalysis, names: set[str] | None = None) -> tuple[dict, dict]:
    """Where the interpreter copies activations: ``({node name: activations
    last accessed in forward there}, {node name: activations first accessed in
    backward there})``. With ``names`` (the nodes of one of several graphs),
    only points where both the node and the activation are among them."""
    swap_out_after, swap_in_before = {}, {}
    for node, info in analysis.activations.items():
        for points, rank in ((swap_out_after, info.last_fw_rank), (swap_in_before, info.first_bw_rank)):
            at = analysis.nodes[rank].name
            if names is None or (at in names and node.name in names):
                points.setdefault(at, []).append(node.name)
    return swap_out_after, swap_in_before
