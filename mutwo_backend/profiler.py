"""GraphProfiler ties a captured graph, its static analysis, the profiling
interpreter and the statistics together; profile_train_step is the one-call
entry point for a user's train step."""

import contextlib
import functools
import logging

import torch
from torch import fx

from passes import GraphAnalysis, GraphHints, run_pipeline

from .arguments import check_module_depth, check_profile_arguments
from .assemble import DEFAULT_MODULE_DEPTH, assemble_report
from .capture import TrainStepGraph, capture_train_step
from .device_memory import check_step_fits, out_of_memory_explained
from .interpreter import ProfilingInterpreter, swap_points
from .optimizers import new_state_removed_on_error
from .plot_processes import PlotProcesses
from .progress import PhaseLog
from .report import Report, check_report_dir
from .statistics import NodeStatistics, Statistics, format_statistics
from .swap import calibrating, start_calibration, swap_model
from .timers import default_timer

log = logging.getLogger("mutwo")


class GraphProfiler:
    """Profiles repeated runs of one graph (the plan's GraphProfiler).

    ``freed_after`` (a TrainStepGraph's) frees values where eager does;
    ``hints`` (a TrainStepGraph's) name its placeholders in the report.
    Call ``run(*graph_inputs)`` per iteration, ``reset_stats()`` after the
    warm-up, then ``aggregate_stats()`` / ``print_stats()`` / ``report()``.
    With ``span_iterations`` the GPU profiler that times the runs (cupti)
    stays on from the first run to one of those: one session instead of one
    per run (profile_train_step, which reads the statistics right after)."""

    def __init__(self, gm: fx.GraphModule, analysis: GraphAnalysis, device: torch.device,
                 timer: str | None = None, swap: str = "model", freed_after: dict[str, str] | None = None,
                 span_iterations: bool = False, hints: GraphHints | None = None,
                 root_module: str | None = None):
        check_profile_arguments(device, None, 1, timer, swap)
        self.gm, self.analysis, self.device, self.swap = gm, analysis, device, swap
        self.hints, self.root_module = hints, root_module  # the names reports give nodes
        self.timer = timer or default_timer(device)
        swap_out_after, swap_in_before = swap_points(analysis)
        self.interpreter = ProfilingInterpreter(gm, device, self.timer, swap_out_after, swap_in_before,
                                                measure_swaps=swap == "measure", freed_after=freed_after,
                                                span_iterations=span_iterations)
        self.stats = Statistics()

    def run(self, *graph_inputs, read_memory: bool | None = None):
        """One instrumented iteration. Every iteration after the first
        allocates the same, so the allocator is read once: in this iteration
        if ``read_memory``, by default while no record holds readings."""
        swap_model(self.device)  # the calibration's copies must not run beside a measured iteration
        if read_memory is None:
            read_memory = not self.stats.has_memory()
        out, record = self.interpreter.run_iteration(*graph_inputs, read_memory=read_memory)
        self.stats.add(record)
        return out

    def reset_stats(self) -> None:
        """Drop the iterations so far (the warm-up)."""
        self.interpreter.flush_timer()
        self.stats.reset()

    def aggregate_stats(self) -> NodeStatistics:
        self.interpreter.flush_timer()
        return self.stats.aggregate()

    def print_stats(self) -> None:
        print(format_statistics([n.name for n in self.interpreter.nodes], self.aggregate_stats()))

    def report(self, meta: dict, module_depth: int = DEFAULT_MODULE_DEPTH) -> Report:
        """The report of the iterations since ``reset_stats()``; ``meta``
        holds what the caller knows (capture, warmup, model...)."""
        check_module_depth(module_depth)
        return assemble_report(self.analysis, self.aggregate_stats(), device=self.device, timer=self.timer,
                               swap=self.swap, swap_model=swap_model(self.device), meta=meta, hints=self.hints,
                               root_module=self.root_module, module_depth=module_depth)


def profile_train_step(train_step, model, optimizer, *args, warmup: int | None = None, iters: int = 3,
                       timer: str | None = None, swap: str = "model", model_name: str | None = None,
                       report_dir: str | None = None, module_depth: int = DEFAULT_MODULE_DEPTH):
    """Capture ``train_step``, analyse its graph, run ``warmup`` real
    training iterations of the graph as it is (first-run costs: CUDA context,
    kernel loading, allocator growth), then ``iters`` through the profiling
    interpreter, and return the Report of those. The model and optimizer are
    trained by all of them exactly as eager training would train them.

    By default (``warmup=None``) a recorded capture is the warm-up: it ran the
    step for real on the device, on copies of the state, and paid the
    first-run costs. A traced capture ran nothing: one warm-up iteration.

    Every argument is checked, and ``report_dir`` created and checked
    writable, before anything runs; a call that fails before the first real
    iteration leaves the model and the optimizer as they were. With
    ``report_dir`` the report is also saved there (Report.save), and the
    processes that draw its plots start first, beside the profiling; if
    saving fails, the ReportNotSavedError raised holds the report.
    ``module_depth`` is the depth of the report's per-module totals."""
    device = next(model.parameters()).device
    check_profile_arguments(device, warmup, iters, timer, swap, module_depth)
    if report_dir:
        check_report_dir(report_dir)
    with PlotProcesses() if report_dir else contextlib.nullcontext() as plot_processes:
        report, phases, _ = profile_captured_step(train_step, model, optimizer, args, warmup, iters, timer, swap,
                                                  model_name, module_depth)
        if report_dir:
            report.add_meta(phase_seconds=dict(phases.seconds))  # (report.json's: all but the saving)
            with phases.phase("save"):
                report.save(report_dir, plot_processes=plot_processes)
    return report.add_meta(phase_seconds=phases.seconds)


def profile_captured_step(train_step, model, optimizer, args, warmup, iters, timer, swap, model_name,
                          module_depth) -> tuple[Report, PhaseLog, TrainStepGraph]:
    """profile_train_step's work, arguments checked, returning the captured
    step too (optimize_train_step runs it rewritten)."""
    device = next(model.parameters()).device
    phases = PhaseLog()
    with new_state_removed_on_error(optimizer):  # until a real iteration runs
        with calibrating(device):  # its host buffer is faulted in beside the capture
            with phases.phase("capture"):
                step = capture_train_step(train_step, model, optimizer, *args)
            with phases.phase("passes"):
                start_calibration(device)  # its copies run on the GPU beside the passes, which only use the host
                analysis = run_pipeline(step.gm, step.hints, allocator_rounding=device.type == "cuda")
                profiler = GraphProfiler(step.gm, analysis, device, timer, swap, step.freed_after,
                                         span_iterations=True, hints=step.hints, root_module=type(model).__name__)
            with phases.phase("swap calibration"):  # what the passes did not hide; frees its device buffer
                swap_model(device)
        check_step_fits(device, analysis)  # before anything runs
    if warmup is None:
        warmup = 0 if step.capture_method == "recorded" else 1
        if not warmup:
            log.info("warm-up: none, the recorded capture's real step was one")
    if warmup:
        with phases.phase(f"warm-up ({_iterations(warmup)})"), out_of_memory_explained(device, analysis, "warm-up"):
            for _ in range(warmup):  # the graph's own code: nothing to measure, ten times faster
                step.run(*args)
    with phases.phase(f"measurement ({_iterations(iters)})"), \
            out_of_memory_explained(device, analysis, "measurement"):
        for i in range(iters):  # the allocator is read in the last (with no warm-up, not a first run)
            step.run(*args, executor=functools.partial(profiler.run, read_memory=i == iters - 1))
        profiler.interpreter.flush_timer()  # the GPU's kernel times, attributed to nodes
    with phases.phase("report"):
        report = profiler.report({"model": model_name or type(model).__name__, "capture": "train-step",
                                  "capture_method": step.capture_method, "warmup": warmup}, module_depth)
    return report, phases, step


def _iterations(count: int) -> str:
    return f"{count} iteration" + ("" if count == 1 else "s")
