"""GraphProfiler ties a captured graph, its static analysis, the profiling
interpreter and the statistics together; profile_train_step is the one-call
entry point for a user's train step."""

import contextlib
import functools
import logging

import torch
from torch import fx

from passes import GraphAnalysis, run_pipeline

from .capture import capture_train_step
from .device_memory import check_step_fits, out_of_memory_explained
from .errors import MutwoError
from .interpreter import ProfilingInterpreter
from .metrics import activation_metrics
from .plot_processes import PlotProcesses
from .progress import PhaseLog
from .report import SCHEMA, Report
from .statistics import NodeStatistics, Statistics, format_statistics
from .swap import calibrating, start_calibration, swap_model
from .timers import default_timer

SWAP_MODES = ("model", "measure")
log = logging.getLogger("mutwo")


class GraphProfiler:
    """Profiles repeated runs of one graph (the plan's GraphProfiler).

    ``freed_after`` (a TrainStepGraph's) frees values where eager does.
    Call ``run(*graph_inputs)`` per iteration, ``reset_stats()`` after the
    warm-up, then ``aggregate_stats()`` / ``print_stats()`` / ``report()``.
    With ``span_iterations`` the GPU profiler that times the runs (cupti)
    stays on from the first run to one of those: one session instead of one
    per run (profile_train_step, which reads the statistics right after)."""

    def __init__(self, gm: fx.GraphModule, analysis: GraphAnalysis, device: torch.device,
                 timer: str | None = None, swap: str = "model", freed_after: dict[str, str] | None = None,
                 span_iterations: bool = False):
        if swap not in SWAP_MODES:
            raise MutwoError(f"unknown swap mode {swap!r}: choose one of {', '.join(SWAP_MODES)}")
        self.gm, self.analysis, self.device, self.swap = gm, analysis, device, swap
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

    def report(self, meta: dict) -> Report:
        return build_report(self.analysis, self.aggregate_stats(), device=self.device,
                            timer=self.timer, swap=self.swap, meta=meta)


def check_iterations(warmup: int, iters: int) -> None:
    if iters < 1 or warmup < 0:
        raise MutwoError(f"need iters >= 1 and warmup >= 0, got iters={iters}, warmup={warmup}")


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


def build_report(analysis: GraphAnalysis, stats: NodeStatistics, *, device: torch.device,
                 timer: str, swap: str, meta: dict) -> Report:
    """The report of one graph from its analysis and the statistics of its
    measured iterations (indexed by the analysis' ranks)."""
    memory, model = analysis.memory, swap_model(device)
    measured_swaps = swap == "measure"
    activations = activation_metrics(analysis, stats.run_time_ms, model,
                                     stats.swap_out_measured_ms if measured_swaps else None,
                                     stats.swap_in_measured_ms if measured_swaps else None)
    measured = stats.peak_bytes is not None
    nodes = []
    for rank, node in enumerate(analysis.nodes):
        nodes.append({
            "name": node.name, "rank": rank, "op": node.op, "target": _target_name(node),
            "region": analysis.regions[node].value, "kind": analysis.kinds[node].value,
            "run_time_ms": float(stats.run_time_ms[rank]),
            "run_time_min_ms": float(stats.run_time_min_ms[rank]),
            "run_time_max_ms": float(stats.run_time_max_ms[rank]),
            "peak_bytes": int(stats.peak_bytes[rank] if measured else memory.peak_during_bytes[rank]),
            "active_bytes": int(stats.allocated_after_bytes[rank] if measured else memory.live_bytes[rank]),
            "output_bytes": int(stats.output_bytes[rank] if measured else analysis.output_bytes[node]),
            "simulated_live_bytes": int(memory.live_bytes[rank]),
        })
    notes = list(meta.get("notes", []))
    graph_peak = int(stats.peak_bytes.max()) if measured else None
    outside = {where: int(b) for where, b in stats.outside_peak_bytes.items()}
    notes += _outside_peak_notes(graph_peak, outside)
    if model.estimated:
        notes.append("swap times are estimated (no GPU): a default model of "
                     f"{model.device_to_host.bytes_per_ms / 1e6:.0f} GB/s each way")
    meta = {
        **meta, "device": str(device), "device_name": _device_name(device),
        "torch_version": str(torch.__version__), "timer": timer, "iters": stats.iterations,
        "iteration_time_ms": stats.iteration_ms, "instrumented_wall_ms": stats.wall_ms,
        "swap": swap, "swap_model": model.to_dict(), "notes": notes,
    }
    return Report({
        "schema": SCHEMA, "meta": meta, "nodes": nodes,
        "activations": [a.to_dict() for a in activations],
        "memory": {
            "peak_bytes": int(memory.peak_bytes), "peak_rank": int(memory.peak_rank),
            "breakdown_at_peak": {k.value: int(v) for k, v in memory.breakdown_at_peak.items()},
            "timeline": {kind.value: [int(b) for b in memory.timeline_of(kind)] for kind in memory.kinds},
            "measured_peak_bytes": max([graph_peak, *outside.values()]) if measured else None,
            "measured_graph_peak_bytes": graph_peak,
            "outside_graphs_peak_bytes": outside or None,
            "measured_allocated_after_bytes": ([int(b) for b in stats.allocated_after_bytes]
                                               if measured else None),
        },
    })


_OUTSIDE = {
    "before_backward": "between the forward and backward graphs (eager code such as the loss and its backward)",
    "before_forward": "between iterations (eager code such as the optimizer step, zero_grad or data loading)",
}


def _outside_peak_notes(graph_peak: int | None, outside: dict[str, int]) -> list[str]:
    """A note when the allocator peaked outside the compiled graphs, where
    no node can show what was allocated."""
    if graph_peak is None or not outside:
        return []
    where, peak = max(outside.items(), key=lambda item: item[1])
    if peak <= graph_peak:
        return []
    return [f"the allocator's peak, {peak:,} B, came outside the compiled graphs, {_OUTSIDE[where]}; "
            f"inside them it reached {graph_peak:,} B. To see that memory node by node, compile the "
            "loss with the model (one torch.compile'd function) or capture the whole step with "
            "capture_train_step."]


def profile_train_step(train_step, model, optimizer, *args, warmup: int | None = None, iters: int = 3,
                       timer: str | None = None, swap: str = "model", model_name: str | None = None,
                       report_dir: str | None = None):
    """Capture ``train_step``, analyse its graph, run ``warmup`` real
    training iterations of the graph as it is (first-run costs: CUDA context,
    kernel loading, allocator growth), then ``iters`` through the profiling
    interpreter, and return the Report of those. The model and optimizer are
    trained by all of them exactly as eager training would train them.

    By default (``warmup=None``) a recorded capture is the warm-up: it ran the
    step for real on the device, on copies of the state, and paid the
    first-run costs. A traced capture ran nothing: one warm-up iteration.

    With ``report_dir`` the report is also saved there (Report.save), and the
    processes that draw its plots start first, beside the profiling."""
    check_iterations(0 if warmup is None else warmup, iters)
    with PlotProcesses() if report_dir else contextlib.nullcontext() as plot_processes:
        report, phases = _profile_train_step(train_step, model, optimizer, args, warmup, iters, timer, swap,
                                             model_name)
        if report_dir:
            report.add_meta(phase_seconds=dict(phases.seconds))  # (report.json's: all but the saving)
            with phases.phase("save"):
                report.save(report_dir, plot_processes=plot_processes)
    return report.add_meta(phase_seconds=phases.seconds)


def _profile_train_step(train_step, model, optimizer, args, warmup, iters, timer, swap,
                        model_name) -> tuple[Report, PhaseLog]:
    device = next(model.parameters()).device
    phases = PhaseLog()
    with calibrating(device):  # its host buffer is faulted in beside the capture
        with phases.phase("capture"):
            step = capture_train_step(train_step, model, optimizer, *args)
        with phases.phase("passes"):
            start_calibration(device)  # its copies run on the GPU beside the passes, which only use the host
            analysis = run_pipeline(step.gm, step.hints, allocator_rounding=device.type == "cuda")
            profiler = GraphProfiler(step.gm, analysis, device, timer, swap, step.freed_after,
                                     span_iterations=True)
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
                                  "capture_method": step.capture_method, "warmup": warmup})
    return report, phases


def _iterations(count: int) -> str:
    return f"{count} iteration" + ("" if count == 1 else "s")


def _target_name(node: fx.Node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
