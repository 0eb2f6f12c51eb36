"""The command line's memory commands: ``plan`` (offline, from a saved
report), ``optimize`` (profile, plan and run a zoo model's step under the
plan, predictions against measurements), ``max-batch`` (the largest batch
that trains within a memory limit, eager and with a plan) and what ``sweep
--budget`` runs for each batch size (run_with_plan)."""

import argparse
import dataclasses
import json
import logging
import os

import torch
from tabulate import tabulate

from planner import BudgetError, plan_memory
from planner.budget import HOW, budget_bytes

from .cli_options import OPTIMIZERS, add_model_options, default_batch_size, is_out_of_memory, positive_int, seq_len
from .device_memory import free_device_memory
from .errors import MutwoError
from .models import get_model, zoo_train_step
from .progress import PhaseLog
from .report import Report, format_bytes

log = logging.getLogger("mutwo")
SWAP_CHOICES = {"auto": None, "yes": True, "no": False}


def parse_budget(text: str):
    """``--budget`` as plan_memory takes it: a plain number up to 1 is a
    fraction of the profiled peak, a larger one bytes; else a size with
    units ("6GiB", "6GB")."""
    try:
        value = float(text)
    except ValueError:
        try:
            budget_bytes(text, 1)
        except MutwoError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        return text
    if 0 < value <= 1:
        return value
    if value > 1 and value == int(value):
        return int(value)
    raise argparse.ArgumentTypeError(f"--budget {text}: give {HOW}")


def parse_memory(text: str) -> int:
    """``--memory``: bytes, or a size with units; not a fraction."""
    value = parse_budget(text)
    if isinstance(value, float):
        raise argparse.ArgumentTypeError(f"--memory {text}: give a size (\"16GiB\") or bytes, not a fraction")
    return budget_bytes(value, 1)


def add_commands(commands) -> None:
    """The memory commands' subparsers, on cli.build_parser's ``commands``."""

    plan = commands.add_parser(
        "plan", help="plan a saved report for a memory budget (no GPU needed)",
        description="Read a report saved by `profile` (its directory or report.json), decide per activation "
                    "whether to keep, recompute or swap it so the step fits --budget, print the plan and save "
                    "plan.json.")
    plan.add_argument("report", metavar="REPORT", help="a report directory or its report.json")
    _add_plan_options(plan)
    plan.add_argument("--solver", choices=["greedy", "milp"], default="greedy",
                      help="greedy: mu-TWO's; milp: an exact solver for small graphs (default: greedy)")
    plan.add_argument("--out", default=None, metavar="DIR",
                      help="where plan.json goes (default: the report's directory)")
    plan.add_argument("--top", type=positive_int, default=15, metavar="N", help="rows of the plan table")
    plan.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")

    optimize = commands.add_parser(
        "optimize", help="profile, plan and run a zoo model's step under the plan: predicted against measured",
        description="Profile a zoo model's training step, plan it for --budget, run it rewritten for --steps "
                    "measured steps and print the predicted and measured peak and step time beside eager's. "
                    "Saves plan.json, measurement.json and the report under --out.")
    add_model_options(optimize, "mutwo_optimize")
    optimize.add_argument("--batch-size", type=positive_int, default=None, metavar="N",
                          help="mini-batch size (default: 32 on cuda, 2 on cpu)")
    _add_plan_options(optimize)
    optimize.add_argument("--steps", type=positive_int, default=5, metavar="K",
                          help="measured steps of the optimized and of the eager step (default: 5)")

    max_batch = commands.add_parser(
        "max-batch", help="the largest batch that trains within a memory limit, eager and with a plan",
        description="Search the largest batch size of a zoo model whose step fits --memory: eager (its "
                    "profiled peak) and with mutwo (a plan for that budget), with samples per second for each. "
                    "On a GPU the plan's step runs under the limit (torch.cuda.set_per_process_memory_fraction) "
                    "and is measured; the profiles run without it. On the CPU the limit is simulated: fits "
                    "and times are the profile's and the plan's predictions.")
    add_model_options(max_batch, "mutwo_max_batch")
    max_batch.add_argument("--memory", required=True, type=parse_memory, metavar="SIZE",
                           help='the memory limit, e.g. "16GiB" (bytes, or a size with units)')
    max_batch.add_argument("--allow-swap", choices=sorted(SWAP_CHOICES), default="auto",
                           help="plan swaps: auto (on a GPU only), yes or no (default: auto)")
    max_batch.add_argument("--max-batch-size", type=positive_int, default=4096, metavar="N",
                           help="the search's upper end (default: 4096)")


def _add_plan_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--budget", required=True, type=parse_budget, metavar="B",
                        help=f"the step's peak memory to fit: {HOW}")
    parser.add_argument("--allow-swap", choices=sorted(SWAP_CHOICES), default="auto",
                        help="plan swaps: auto (for a GPU report only), yes or no (default: auto)")


# --- plan ------------------------------------------------------------------------------

def plan_command(args: argparse.Namespace) -> None:
    phases = PhaseLog()
    report = phases.run("loading the report", Report.load, args.report)
    plan = phases.run("planning", plan_memory, report, args.budget, allow_swap=SWAP_CHOICES[args.allow_swap],
                      solver=args.solver)
    plan.print(top=args.top)
    out = args.out or (args.report if os.path.isdir(args.report) else os.path.dirname(args.report) or ".")
    os.makedirs(out, exist_ok=True)
    path = plan.save(os.path.join(out, "plan.json"))
    print()
    print(f"plan saved to {os.path.abspath(path)}")


# --- optimize --------------------------------------------------------------------------

def optimize_command(args: argparse.Namespace) -> None:
    from .runtime import optimize_train_step

    phases = PhaseLog()
    spec = get_model(args.model)
    device = torch.device(args.device)
    batch_size = args.batch_size or default_batch_size(args.device)
    torch.manual_seed(args.seed)
    model = phases.run(f"building {spec.name}", lambda: spec.build().to(device))
    optimizer = OPTIMIZERS[args.optimizer](model.parameters())
    inputs, targets = spec.make_batch(batch_size, seq_len(args, spec) or 0, device)
    step = phases.run("profiling and planning", optimize_train_step, zoo_train_step(spec), model, optimizer,
                      inputs, targets, memory_budget=args.budget, allow_swap=SWAP_CHOICES[args.allow_swap],
                      warmup=args.warmup, iters=args.iters, timer=args.timer)
    step.plan.print()
    result = phases.run(f"measurement ({args.steps} optimized and {args.steps} eager steps)", step.measure,
                        inputs, targets, iters=args.steps)
    print()
    print(format_measurement(result))
    os.makedirs(args.out, exist_ok=True)
    step.plan.save(os.path.join(args.out, "plan.json"))
    with open(os.path.join(args.out, "measurement.json"), "w") as f:
        json.dump({**result, "model": spec.name, "batch_size": batch_size}, f, indent=1)
    phases.run("saving the report", step.report.save, os.path.join(args.out, "report"))
    print(f"\nplan, measurement and report saved to {os.path.abspath(args.out)}")


def format_measurement(result: dict) -> str:
    """Predicted against measured peak and step time, beside eager's."""
    def ratio(measured, predicted):
        return f"{measured / predicted - 1:+.1%}" if measured and predicted else "-"

    rows = [("peak", format_bytes(result["predicted_peak_bytes"]), format_bytes(result["measured_peak_bytes"]),
             ratio(result["measured_peak_bytes"], result["predicted_peak_bytes"]),
             format_bytes(result["eager_peak_bytes"])),
            ("step time", f"{result['predicted_iteration_ms']:.2f} ms", f"{result['measured_step_ms']:.2f} ms",
             ratio(result["measured_step_ms"], result["predicted_iteration_ms"]), f"{result['eager_step_ms']:.2f} ms")]
    table = tabulate(rows, headers=["", "predicted", f"measured ({result['runtime']})", "gap", "eager (measured)"],
                     tablefmt="simple", disable_numparse=True)
    lines = [table, f"budget {format_bytes(result['budget_bytes'])}"]
    if result.get("pool_bytes") is not None:
        lines.append(f"the CUDA graph's memory pool holds {format_bytes(result['pool_bytes'])}")
    return "\n".join(lines)


# --- max-batch -------------------------------------------------------------------------

@dataclasses.dataclass
class BatchOutcome:
    """One batch size tried: whether eager and a plan fit, and their
    samples per second (measured on a GPU, the profile's and the plan's
    predictions on the CPU)."""

    batch_size: int
    eager_fits: bool
    eager_samples_per_s: float | None = None
    mutwo_fits: bool = False
    mutwo_samples_per_s: float | None = None
    note: str | None = None


def max_batch_command(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    limit = args.memory
    tried = search_max_batch(lambda batch: try_batch(args, batch, limit, device), args.max_batch_size)
    print(format_max_batch(tried, limit, get_model(args.model).name))


def search_max_batch(try_batch, upper: int) -> dict[int, BatchOutcome]:
    """Double the batch size from 1 until a plan no longer fits (or
    ``upper``), then bisect between the last two for both eager's and the
    plan's largest. Assumes a larger batch never needs less memory."""
    tried: dict[int, BatchOutcome] = {}

    def outcome(batch: int) -> BatchOutcome:
        if batch not in tried:
            log.info("batch size %d", batch)
            tried[batch] = try_batch(batch)
        return tried[batch]

    for fits in ("eager_fits", "mutwo_fits"):
        low, high = 0, 1  # low fits (0: nothing yet), high is to try
        while high <= upper and getattr(outcome(high), fits):
            low, high = high, high * 2
        high = min(high, upper + 1)
        while high - low > 1:  # low fits, high does not (or is past the upper end)
            middle = (low + high) // 2
            low, high = (middle, high) if getattr(outcome(middle), fits) else (low, middle)
    return tried


def try_batch(args: argparse.Namespace, batch: int, limit: int, device: torch.device) -> BatchOutcome:
    """Profile ``batch`` (without the limit), and plan it for ``limit``; on a
    GPU, run the plan under the limit and measure it."""
    from .profiler import profile_captured_step
    from .runtime import OptimizedStep

    spec = get_model(args.model)
    torch.manual_seed(args.seed)
    try:
        model = spec.build().to(device)
        optimizer = OPTIMIZERS[args.optimizer](model.parameters())
        inputs, targets = spec.make_batch(batch, seq_len(args, spec) or 0, device)
        report, _, step = profile_captured_step(zoo_train_step(spec), model, optimizer, (inputs, targets),
                                                args.warmup, args.iters, args.timer, "model", spec.name, 2)
    except Exception as error:  # noqa: BLE001 - out of memory even without the limit: nothing fits
        if not is_out_of_memory(error):
            raise
        free_device_memory(device)
        return BatchOutcome(batch, False, note="the profile itself ran out of memory")
    data = report.to_dict()
    peak = data["memory"]["measured_peak_bytes"] or data["memory"]["peak_bytes"]
    time_ms = data["meta"]["node_time_sum_ms"]  # (the base the plan's predicted time adds to)
    outcome = BatchOutcome(batch, peak <= limit, batch / time_ms * 1e3 if peak <= limit else None)
    try:
        plan = plan_memory(report, limit, allow_swap=SWAP_CHOICES[args.allow_swap])
    except BudgetError as error:
        outcome.note = f"no plan: lowest peak {format_bytes(error.lowest_peak_bytes or 0)}"
        free_device_memory(device)
        return outcome
    outcome.mutwo_fits, outcome.mutwo_samples_per_s = True, batch / plan.predicted_iteration_ms * 1e3
    if device.type == "cuda":
        outcome.mutwo_fits, outcome.mutwo_samples_per_s, outcome.note = _measured_under(
            limit, device, OptimizedStep(step, plan, report, zoo_train_step(spec)), batch, (inputs, targets))
    free_device_memory(device)
    return outcome


def _measured_under(limit: int | None, device: torch.device, optimized, batch: int,
                    args) -> tuple[bool, float | None, str | None]:
    """Run the optimized step with the process held to ``limit`` bytes:
    (it fit, samples per second, why not)."""
    result, why = measure_within(limit, device, optimized, args, iters=3)
    return result is not None, batch / result["measured_step_ms"] * 1e3 if result else None, why


def measure_within(limit: int | None, device: torch.device, optimized, args, iters: int) -> tuple[dict | None, str | None]:
    """OptimizedStep.measure, on a GPU with the process held to ``limit``
    bytes (set_per_process_memory_fraction); None and why where it ran out."""
    if device.type != "cuda" or limit is None:
        return optimized.measure(*args, iters=iters, eager=limit is None), None
    total = torch.cuda.get_device_properties(device).total_memory
    free_device_memory(device)
    torch.cuda.set_per_process_memory_fraction(min(1.0, limit / total), device)
    try:
        return optimized.measure(*args, iters=iters, eager=False), None  # (eager's step need not fit the limit)
    except Exception as error:  # noqa: BLE001
        if not is_out_of_memory(error):
            raise
        return None, "the plan's step ran out of memory under the limit"
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)


def run_with_plan(report, step, train_step, batch_args, args: argparse.Namespace, device: torch.device) -> dict:
    """``sweep --budget``: the batch size's step planned for the budget and
    run (peak and median time measured: the allocator's on a GPU,
    MemTracker's on the CPU), with whether it fits ``--memory``."""
    from .runtime import OptimizedStep

    memory = args.memory
    try:
        plan = plan_memory(report, args.budget, allow_swap=SWAP_CHOICES[args.allow_swap])
    except BudgetError as error:
        return {"status": "no plan", "lowest_peak_bytes": error.lowest_peak_bytes}
    result, why = measure_within(memory, device, OptimizedStep(step, plan, report, train_step), batch_args,
                                 iters=args.iters)
    if result is None:
        return {"status": "oom", "note": why}
    fits = memory is None or result["measured_peak_bytes"] <= memory
    return {"status": "ok" if fits else "over memory", "peak_bytes": result["measured_peak_bytes"],
            "iteration_time_ms": result["measured_step_ms"], "runtime": result["runtime"],
            "predicted_peak_bytes": plan.predicted_peak_bytes, "predicted_iteration_ms": plan.predicted_iteration_ms,
            "budget_bytes": plan.budget_bytes, "recompute": plan.count("recompute"), "swap": plan.count("swap")}


def format_max_batch(tried: dict[int, BatchOutcome], limit: int, model: str) -> str:
    rows = [(o.batch_size, "yes" if o.eager_fits else "no",
             f"{o.eager_samples_per_s:.1f}" if o.eager_samples_per_s else "-",
             "yes" if o.mutwo_fits else "no", f"{o.mutwo_samples_per_s:.1f}" if o.mutwo_samples_per_s else "-",
             o.note or "") for o in sorted(tried.values(), key=lambda o: o.batch_size)]
    table = tabulate(rows, headers=["batch size", "eager fits", "eager samples/s", "mutwo fits", "mutwo samples/s",
                                    "note"], tablefmt="simple", disable_numparse=True)
    eager = max((o for o in tried.values() if o.eager_fits), key=lambda o: o.batch_size, default=None)
    mutwo = max((o for o in tried.values() if o.mutwo_fits), key=lambda o: o.batch_size, default=None)
    best = max((o for o in tried.values() if o.mutwo_fits), key=lambda o: o.mutwo_samples_per_s, default=None)
    lines = [f"{model} within {format_bytes(limit)}", table, ""]
    lines.append(f"eager: largest batch {eager.batch_size}, {eager.eager_samples_per_s:.1f} samples/s"
                 if eager else "eager: no batch size fits")
    lines.append(f"mutwo: largest batch {mutwo.batch_size}, {mutwo.mutwo_samples_per_s:.1f} samples/s; best "
                 f"throughput at batch {best.batch_size}, {best.mutwo_samples_per_s:.1f} samples/s"
                 if mutwo else "mutwo: no batch size fits")
    return "\n".join(lines)
