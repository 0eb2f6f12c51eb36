"""optimize_train_step: capture, profile, plan and rewrite a training step,
and OptimizedStep, which runs it under the plan and measures it."""

import copy
import logging
import statistics
import time

import torch

from planner import plan_memory
from planner.budget import budget_bytes

from ..arguments import check_profile_arguments
from ..capture import TrainStepGraph
from ..errors import MutwoError
from ..profiler import profile_captured_step
from .cuda_graph import CudaGraphStep, cuda_graph_unsupported
from .rewrite import rewrite
from .training_state import restored_on

GRAPH_CODE, CUDA_GRAPH = "graph code", "cuda graph"
log = logging.getLogger("mutwo")


class OptimizedStep:
    """One captured training step rewritten under a plan. Calling it runs a
    real training iteration and updates the model, its buffers and the
    optimizer state in place, as the captured step does.

    ``plan``: the Plan; ``report``: the profile it was planned from (its
    ``meta.runtime`` says how the step runs, and ``meta.runtime_note`` why
    not as a CUDA graph); ``gm``: the rewritten graph."""

    def __init__(self, step: TrainStepGraph, plan, report, train_step, cuda_graph: bool | None = None):
        self.plan, self.report, self.train_step = plan, report, train_step
        self.gm = rewrite(step.gm, plan)
        self.step = copy.copy(step)
        self.step.gm = self.gm
        self.device = next(step.model.parameters()).device
        why_not = cuda_graph_unsupported(self.gm, self.device)
        if cuda_graph and why_not:
            raise MutwoError(f"cuda_graph=True, but {why_not}: pass cuda_graph=None to run the graph's code")
        self.runtime = CUDA_GRAPH if (cuda_graph is None and why_not is None) or cuda_graph else GRAPH_CODE
        self.cuda_graph = CudaGraphStep(self.gm, self.device) if self.runtime == CUDA_GRAPH else None
        note = why_not if cuda_graph is None else "cuda_graph=False" if self.runtime == GRAPH_CODE else None
        report.add_meta(runtime=self.runtime, runtime_note=note and f"runs as the graph's code: {note}")
        if note and self.device.type == "cuda" and cuda_graph is None:  # (on the CPU there is no other way)
            log.warning("the optimized step runs as the graph's code, not as one CUDA graph: %s", note)

    def __call__(self, *args):
        return self.step.run(*args, executor=self.cuda_graph)

    def measure(self, *args, iters: int = 5, eager: bool = True) -> dict:
        """Run ``iters`` optimized steps, then ``iters`` eager steps of the
        train step (both train the model), and return their measured peak
        (bytes) and median step time (ms) beside the plan's predictions. On
        a GPU the peak is ``max_memory_allocated`` (for a CUDA graph, over
        its capture, with ``pool_bytes`` what its pool holds); on the CPU,
        MemTracker's around one step. ``eager=False`` leaves eager's out
        (None): under a memory limit only the plan fits."""
        if iters < 1:
            raise MutwoError(f"iters must be at least 1, got {iters}")
        model, optimizer = self.step.model, self.step.optimizer
        optimized_peak, optimized_ms = _measured(self.device, lambda: self(*args), iters, model, optimizer, args)
        if self.cuda_graph is not None:
            optimized_peak = self.cuda_graph.capture_peak_bytes
        eager_peak = eager_ms = None
        if eager:
            eager_peak, eager_ms = _measured(self.device, lambda: self.train_step(model, optimizer, *args), iters,
                                             model, optimizer, args)
        return {"runtime": self.runtime, "measured_peak_bytes": optimized_peak, "measured_step_ms": optimized_ms,
                "pool_bytes": self.cuda_graph.pool_bytes if self.cuda_graph else None,
                "predicted_peak_bytes": self.plan.predicted_peak_bytes,
                "predicted_iteration_ms": self.plan.predicted_iteration_ms, "budget_bytes": self.plan.budget_bytes,
                "eager_peak_bytes": eager_peak, "eager_step_ms": eager_ms}


def optimize_train_step(train_step, model, optimizer, *args, memory_budget, allow_swap: bool | None = None,
                        cuda_graph: bool | None = None, warmup: int | None = None, iters: int = 3,
                        timer: str | None = None) -> OptimizedStep:
    """Capture ``train_step(model, optimizer, *args)``, profile it as
    profile_train_step does (``warmup``, ``iters`` and ``timer`` are its),
    plan for ``memory_budget`` (plan_memory's: a fraction of the profiled
    peak, bytes, or "6GiB") and return the step rewritten under the plan.

    ``cuda_graph`` None replays the step as one CUDA graph where it can be
    (a GPU, static shapes, no host reads) and runs the graph's code
    elsewhere. An impossible budget raises BudgetError (and a plan the
    graph cannot take a MutwoError) with the model and optimizer put back
    as they were before the profiling trained them."""
    device = next(model.parameters()).device
    check_profile_arguments(device, warmup, iters, timer, "model")
    budget_bytes(memory_budget, 1)  # its form, before anything runs
    with restored_on((MutwoError,), model, optimizer):  # a budget no plan meets, a plan the graph refuses
        report, _, step = profile_captured_step(train_step, model, optimizer, args, warmup, iters, timer, "model",
                                                None, 2)
        plan = plan_memory(report, memory_budget, allow_swap=allow_swap)
        return OptimizedStep(step, plan, report, train_step, cuda_graph)


def step_times_ms(run, device: torch.device, iters: int) -> list[float]:
    """The time of each of ``iters`` calls of ``run``, in ms: CUDA events
    around it on a GPU, the host's clock elsewhere."""
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            began = time.perf_counter()
            run()
            times.append((time.perf_counter() - began) * 1e3)
    return times


def _measured(device: torch.device, run, iters: int, model, optimizer, args) -> tuple[int, float]:
    """(peak bytes, median ms) of ``iters`` calls of ``run``."""
    if device.type == "cuda":
        run()  # a first run (a CUDA graph's capture) outside the measurement
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        times = step_times_ms(run, device, iters)
        return torch.cuda.max_memory_allocated(device), statistics.median(times)
    from torch.distributed._tools.mem_tracker import MemTracker
    tracker = MemTracker()
    tracker.track_external(model, optimizer, *[a for a in args if isinstance(a, torch.Tensor)])
    with tracker:
        run()
    peak = tracker.get_tracker_snapshot("peak")[device]["Total"]
    return peak, statistics.median(step_times_ms(run, device, iters))
