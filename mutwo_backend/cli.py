"""Command line: ``python -m mutwo_backend {profile,sweep,plan,optimize,max-batch} ...``.

``profile`` profiles one training iteration of a zoo model, prints the
report's tables and saves the report; ``sweep`` profiles a model at several
batch sizes, stops cleanly at the first out-of-memory and plots peak memory
and iteration latency against the batch size. ``plan``, ``optimize`` and
``max-batch`` are memory_commands.py's. Progress goes to stderr, one line
per phase with its duration and the time elapsed."""

import argparse
import json
import logging
import os
import sys
import time

import torch

from passes import NodeType

from . import memory_commands
from .cli_options import OPTIMIZERS, add_model_options, default_batch_size, is_out_of_memory, positive_int, seq_len
from .assemble import DEFAULT_MODULE_DEPTH, device_name
from .device_memory import free_device_memory
from .errors import MutwoError
from .models import get_model, zoo_train_step
from .plot_processes import PlotProcesses
from .plots import TIMELINE_X_AXES
from .progress import PhaseLog
from .report import Report, check_report_dir, format_bytes

log = logging.getLogger("mutwo")
SWEEP_SCHEMA = "mutwo.sweep/1"
CAPTURES = ("train-step", "compile")

def resolve_device(asked: str | None) -> str:
    """``--device`` as given, or cuda when a GPU is visible; without one the
    command falls back to the CPU, with a warning that says what changes."""
    if asked is None:
        if torch.cuda.is_available():
            return "cuda"
        log.warning("no CUDA GPU is visible: profiling on the CPU, where node times are the CPU's and "
                    "memory is simulated, not measured (--device cpu asks for this and silences the warning)")
        return "cpu"
    if asked == "cuda" and not torch.cuda.is_available():
        raise MutwoError("--device cuda was asked for but no CUDA GPU is visible: "
                         "use --device cpu (or run on a machine with a GPU).")
    return asked


def _batch_sizes(text: str) -> list[int]:
    """"4,8,16" -> [4, 8, 16] (sorted, no repeats)."""
    sizes = []
    for part in text.split(","):
        try:
            sizes.append(positive_int(part.strip()))
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(
                f"invalid batch sizes {text!r}: give positive integers separated by commas, e.g. 4,8,16") from None
    return sorted(set(sizes))


def _add_run_options(parser: argparse.ArgumentParser, out_default: str) -> None:
    """Flags that ``profile`` and ``sweep`` share."""
    add_model_options(parser, out_default)
    parser.add_argument("--swap", choices=["model", "measure"], default="model",
                        help="swap times from the latency + bandwidth model only, or also measured by really "
                             "copying every activation to pinned host memory and back (default: model)")
    parser.add_argument("--capture", choices=CAPTURES, default="train-step",
                        help="train-step: forward, loss, backward and optimizer step traced as one graph; "
                             "compile: torch.compile(model, backend='mutwo_profile') in an ordinary training "
                             "loop (the optimizer runs outside the graph) (default: train-step)")
    parser.add_argument("--module-depth", type=positive_int, default=DEFAULT_MODULE_DEPTH, metavar="D",
                        help="depth of the per-module totals: 1 gives layer3, 2 layer3.4 "
                             f"(default: {DEFAULT_MODULE_DEPTH})")
    parser.add_argument("--timeline-x", choices=TIMELINE_X_AXES, default="time",
                        help="x axis of memory_timeline.png: the step's time (node medians end to end) or "
                             "node rank (graph order) (default: time)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mutwo_backend",
        description="Profile whole training iterations of a model at the level of its fx graph (time and "
                    "memory per node, activation liveness, swap and recompute costs), then plan and run the step "
                    "in less memory by recomputing or swapping activations (after mu-TWO).")
    commands = parser.add_subparsers(dest="command", required=True,
                                     metavar="{profile,sweep,plan,optimize,max-batch}")
    profile = commands.add_parser(
        "profile", help="profile one batch size: print the tables, save the report",
        description="Profile warm-up + measured training iterations of a zoo model, print the report's "
                    "tables and save report.json, nodes.csv, activations.csv, trace.json, "
                    "memory_breakdown.png and memory_timeline.png under --out.")
    _add_run_options(profile, "mutwo_report")
    profile.add_argument("--batch-size", type=positive_int, default=None, metavar="N",
                         help="mini-batch size (default: 32 on cuda, 2 on cpu)")
    profile.add_argument("--top", type=positive_int, default=15, metavar="N",
                         help="rows of the slowest-nodes and largest-activations tables (default: 15)")
    sweep = commands.add_parser(
        "sweep", help="profile several batch sizes: peak memory and latency vs batch size",
        description="Profile a zoo model at each batch size in turn, stop cleanly at the first "
                    "out-of-memory (recorded in sweep.json), and save sweep.json, "
                    "peak_memory_vs_batch.png and latency_vs_batch.png under --out, with each batch "
                    "size's full report in --out/batch_<N>/.")
    _add_run_options(sweep, "mutwo_sweep")
    sweep.add_argument("--batch-sizes", type=_batch_sizes, required=True, metavar="N,N,...",
                       help="comma-separated batch sizes, profiled from the smallest up, e.g. 4,8,16,32")
    sweep.add_argument("--no-reports", action="store_true",
                       help="do not save each batch size's own report, only the sweep's files")
    sweep.add_argument("--budget", type=memory_commands.parse_budget, default=None, metavar="B",
                       help="also plan each batch size for this budget (a fraction of its peak, bytes or a size) "
                            "and run it with the plan: both are plotted (train-step capture only)")
    sweep.add_argument("--memory", type=memory_commands.parse_memory, default=None, metavar="SIZE",
                       help="with --budget: a memory limit (a size); a batch size whose step exceeds it is shown "
                            "as not fitting, with and without the plan")
    sweep.add_argument("--allow-swap", choices=sorted(memory_commands.SWAP_CHOICES), default="auto",
                       help="with --budget: plan swaps: auto (on a GPU only), yes or no (default: auto)")
    memory_commands.add_commands(commands)
    return parser


# --- profiling ---------------------------------------------------------------------

def profile_zoo_model(args: argparse.Namespace, batch_size: int, phases: PhaseLog, keep=None) -> Report:
    """Build the zoo model, profile ``args.warmup`` (None: the default) + ``args.iters`` iterations
    at ``batch_size`` and return the report (meta completed with what the
    command knows: model, batch size, sequence length, optimizer, seed).
    ``keep`` (a dict) receives the captured step, train step and batch, to
    run it again under a plan."""
    spec = get_model(args.model)
    device = torch.device(args.device)
    length = seq_len(args, spec)
    torch.manual_seed(args.seed)
    model = phases.run(f"building {spec.name}", lambda: spec.build().to(device))
    optimizer = OPTIMIZERS[args.optimizer](model.parameters())
    inputs, targets = spec.make_batch(batch_size, length or 0, device)
    if keep is not None:
        from .profiler import profile_captured_step

        report, _, step = profile_captured_step(zoo_train_step(spec), model, optimizer, (inputs, targets),
                                                args.warmup, args.iters, args.timer, args.swap, spec.name,
                                                args.module_depth)
        keep.update(step=step, train_step=zoo_train_step(spec), batch=(inputs, targets))
    else:
        profile = _profile_compiled if args.capture == "compile" else _profile_train_step
        report = profile(spec, model, optimizer, inputs, targets, args, phases)
    return report.add_meta(model=spec.name, batch_size=batch_size, seq_len=length, optimizer=args.optimizer,
                           seed=args.seed)


def _profile_train_step(spec, model, optimizer, inputs, targets, args, phases: PhaseLog) -> Report:
    """profile_train_step logs its own phases (capture, passes, warm-up,
    measurement, report) to the "mutwo" logger."""
    from .profiler import profile_train_step

    return profile_train_step(zoo_train_step(spec), model, optimizer, inputs, targets, warmup=args.warmup,
                              iters=args.iters, timer=args.timer, swap=args.swap, model_name=spec.name,
                              module_depth=args.module_depth)


def _compile_warmup(args: argparse.Namespace) -> int:
    """--warmup, or 1: the compile capture runs nothing before its first iteration."""
    return 1 if args.warmup is None else args.warmup


def _profile_compiled(spec, model, optimizer, inputs, targets, args, phases: PhaseLog) -> Report:
    """An ordinary training loop over torch.compile(model, backend="mutwo_profile")."""
    from .backend import get_report

    options = {"warmup": _compile_warmup(args), "iters": args.iters, "timer": args.timer, "swap": args.swap,
               "optimizer": optimizer, "module_depth": args.module_depth}
    # a fresh dynamo per profile: a sweep compiles one new model per batch
    # size, which would otherwise reach dynamo's recompile limit
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="mutwo_profile", options=options, dynamic=False)

    def step():
        loss = spec.loss(spec.forward(compiled, inputs), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    phases.run("capture, passes and iteration 1 (dynamo, AOTAutograd)", step)
    if options["warmup"] > 1:
        with phases.phase(f"warm-up (iterations 2 to {options['warmup']})"):
            for _ in range(options["warmup"] - 1):
                step()
    with phases.phase(f"measurement ({args.iters} iteration{'s' * (args.iters != 1)})"):
        for _ in range(args.iters - (1 if options["warmup"] == 0 else 0)):
            step()
    report = phases.run("report", get_report, compiled)
    if report is None:
        raise MutwoError("the compiled model ran but mutwo_profile completed no measurement: "
                         "did the model run without gradients?")
    return report


def profile(args: argparse.Namespace) -> None:
    phases = PhaseLog()
    batch_size = args.batch_size or default_batch_size(args.device)
    with PlotProcesses() as plot_processes:  # matplotlib imported beside the profiling
        report = profile_zoo_model(args, batch_size, phases)
        report.print(top=args.top)
        path = phases.run("saving", report.save, args.out, plot_processes=plot_processes,
                          timeline_x=args.timeline_x)
    print()
    print(f"report saved to {os.path.abspath(args.out)}: " + ", ".join(sorted(os.listdir(args.out))))
    log.debug("report.json at %s", path)


# --- sweep -------------------------------------------------------------------------

def sweep(args: argparse.Namespace) -> None:
    if args.budget is not None and args.capture != "train-step":
        raise MutwoError("sweep --budget runs each batch size with a plan, which needs --capture train-step")
    if args.memory is not None and args.budget is None:
        raise MutwoError("sweep --memory is a limit for the plan's runs: give --budget too")
    phases = PhaseLog()
    device = torch.device(args.device)
    spec = get_model(args.model)
    runs, not_run = [], []
    for index, batch_size in enumerate(args.batch_sizes):
        log.info("batch size %d (%d of %d)", batch_size, index + 1, len(args.batch_sizes))
        kept = {} if args.budget is not None else None
        try:
            report = profile_zoo_model(args, batch_size, phases, kept)
        except Exception as error:  # noqa: BLE001 - only out-of-memory is expected; the rest is re-raised
            if not is_out_of_memory(error):
                raise
            log.warning("batch size %d does not fit in memory: stopping the sweep", batch_size)
            runs.append({"batch_size": batch_size, "status": "oom",
                         "error": f"{type(error).__name__}: {error}"[:2000]})
            not_run = args.batch_sizes[index + 1:]
            free_device_memory(device)
            break
        data = report.to_dict()
        run = {"batch_size": batch_size, "status": "ok", "warmup": data["meta"]["warmup"],
               "iteration_time_ms": data["meta"]["iteration_time_ms"],
               "instrumented_wall_ms": data["meta"].get("instrumented_wall_ms"),
               "peak_bytes": data["memory"]["peak_bytes"],
               "measured_peak_bytes": data["memory"]["measured_peak_bytes"],
               "breakdown_at_peak": data["memory"]["breakdown_at_peak"],
               "nodes": len(data["nodes"]), "activations": len(data["activations"]),
               "activation_bytes": sum(a["memory_bytes"] for a in data["activations"]),
               "report_dir": None}
        if args.budget is not None:
            if args.memory is not None:
                run["fits"] = (run["measured_peak_bytes"] or run["peak_bytes"]) <= args.memory
            run["with_plan"] = phases.run(f"batch size {batch_size} with the plan", memory_commands.run_with_plan,
                                          report, kept["step"], kept["train_step"], kept["batch"], args, device)
            del kept
        if not args.no_reports:
            run["report_dir"] = f"batch_{batch_size}"
            phases.run("saving", report.save, os.path.join(args.out, run["report_dir"]), timeline_x=args.timeline_x)
        runs.append(run)
        del report, data
        free_device_memory(device)
    result = {"schema": SWEEP_SCHEMA,
              "meta": {"model": spec.name, "device": str(device), "device_name": device_name(device),
                       "torch_version": str(torch.__version__), "capture": args.capture, "optimizer": args.optimizer,
                       "seq_len": seq_len(args, spec),
                       "warmup": args.warmup, "iters": args.iters, "swap": args.swap, "seed": args.seed,
                       "budget": args.budget, "memory": args.memory,
                       "batch_sizes": args.batch_sizes, "not_run": not_run, "notes": []},
              "runs": runs}
    print(format_sweep(result))
    print()
    print(f"sweep saved to {os.path.abspath(args.out)}: "
          + ", ".join(phases.run("saving the sweep", save_sweep, result, args.out)))


def save_sweep(result: dict, directory: str) -> list[str]:
    """Write sweep.json and, with matplotlib, the two plots; returns the file names."""
    from . import plots
    from .report import PLOT_HINT

    os.makedirs(directory, exist_ok=True)
    names = ["sweep.json"]
    if plots.available():
        plots.peak_memory_vs_batch(result, os.path.join(directory, "peak_memory_vs_batch.png"))
        plots.latency_vs_batch(result, os.path.join(directory, "latency_vs_batch.png"))
        names += ["peak_memory_vs_batch.png", "latency_vs_batch.png"]
    else:
        result["meta"]["notes"].append(PLOT_HINT)
        log.warning(PLOT_HINT)
    with open(os.path.join(directory, "sweep.json"), "w") as f:
        json.dump(result, f, indent=1)
    return names


def format_sweep(result: dict) -> str:
    from tabulate import tabulate

    planned = result["meta"].get("budget") is not None
    rows = []
    for run in result["runs"]:
        if run["status"] == "ok":
            row = [run["batch_size"], "ok" if run.get("fits", True) else "over --memory",
                   f"{run['iteration_time_ms']:.2f}",
                   f"{run['batch_size'] / run['iteration_time_ms'] * 1000:.1f}" if run["iteration_time_ms"] else "-",
                   format_bytes(run["peak_bytes"]), format_bytes(run["measured_peak_bytes"]),
                   format_bytes(run["breakdown_at_peak"].get(NodeType.ACT.value, 0))]
            if planned:
                plan = run["with_plan"]
                row += [plan["status"], f"{plan['iteration_time_ms']:.2f}" if "iteration_time_ms" in plan else "-",
                        format_bytes(plan["peak_bytes"]) if "peak_bytes" in plan else "-"]
        else:
            row = [run["batch_size"], "out of memory", "-", "-", "-", "-", "-"] + ["-"] * (3 * planned)
        rows.append(row)
    rows += [[size, "not run (after out of memory)", "-", "-", "-", "-", "-"] + ["-"] * (3 * planned)
             for size in result["meta"]["not_run"]]
    meta = result["meta"]
    title = f"{meta['model']} on {meta['device_name']}, {meta['capture']}, {meta['optimizer']}"
    if planned:
        title += f", with a plan for budget {meta['budget']}"
    headers = ["batch size", "status", "iteration time (ms)", "samples/s", "simulated peak", "measured peak",
               "ACT at peak"] + (["with plan", "time with plan (ms)", "peak with plan"] if planned else [])
    return title + "\n" + tabulate(rows, headers=headers, tablefmt="simple", disable_numparse=True)


# --- entry point ---------------------------------------------------------------------

class _ElapsedFormatter(logging.Formatter):
    def __init__(self):
        super().__init__()
        self.start = time.perf_counter()

    def format(self, record: logging.LogRecord) -> str:
        return f"[mutwo {time.perf_counter() - self.start:7.1f} s] {record.getMessage()}"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_ElapsedFormatter())
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.WARNING if args.quiet else logging.INFO)
    try:
        if args.out is not None:
            check_report_dir(args.out)  # before anything runs
        if hasattr(args, "device"):  # (plan needs no device)
            args.device = resolve_device(args.device)
        {"profile": profile, "sweep": sweep, "plan": memory_commands.plan_command,
         "optimize": memory_commands.optimize_command, "max-batch": memory_commands.max_batch_command,
         }[args.command](args)
    except MutwoError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    return 0
