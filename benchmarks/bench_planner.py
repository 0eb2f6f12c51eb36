"""Planning time and predictions of plan_memory at budgets 0.3 to 0.9 of a
report's peak.

    .venv/bin/python benchmarks/bench_planner.py REPORT_DIR_OR_JSON [...] [--budgets 0.3,0.5,0.7,0.9]
    .venv/bin/python benchmarks/bench_planner.py --profile resnet152:2 bert:2   # profile on this machine first

For each report and budget, one line: the planning time (best of
``--repeat``), the budget, the predicted peak and iteration time against
the profile's, and how many activations each action took. The issue's
bound: ResNet-152 at budget 0.5 planned in at most 2 s on the 2-core CPU.
A report made on the CPU has the graph of an H200 one (the same nodes at
another batch size); its times are the CPU's, so its swaps hide in longer
nodes."""

import argparse
import sys
import time

import torch

from mutwo_backend import BudgetError, Report, plan_memory, profile_train_step
from mutwo_backend.models import get_model, zoo_train_step
from mutwo_backend.report import format_bytes


def cpu_report(spec_text: str) -> tuple[str, Report]:
    name, _, batch = spec_text.partition(":")
    spec = get_model(name)
    torch.manual_seed(0)
    model = spec.build()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    inputs, targets = spec.make_batch(int(batch or 2), 128, torch.device("cpu"))
    report = profile_train_step(zoo_train_step(spec), model, optimizer, inputs, targets, iters=1)
    return f"{name} batch {batch or 2} (profiled here)", report


def bench(label: str, report: Report, budgets: list[float], repeat: int, allow_swap: bool | None) -> list[str]:
    lines = [f"{label}: {len(report.to_dict()['nodes'])} nodes, {len(report.to_dict()['activations'])} activations"]
    for fraction in budgets:
        best, plan, error = float("inf"), None, None
        for _ in range(repeat):
            start = time.perf_counter()
            try:
                plan = plan_memory(report, fraction, allow_swap=allow_swap)
            except BudgetError as caught:
                error = caught
            best = min(best, time.perf_counter() - start)
        if plan is None:
            lines.append(f"  budget {fraction:.2f}: {best:.3f} s, no plan: {str(error)[:160]}")
            continue
        lines.append(
            f"  budget {fraction:.2f} ({format_bytes(plan.budget_bytes)}): planned in {best:.3f} s; peak "
            f"{format_bytes(plan.baseline_peak_bytes)} -> {format_bytes(plan.predicted_peak_bytes)}, time "
            f"{plan.baseline_iteration_ms:.2f} -> {plan.predicted_iteration_ms:.2f} ms "
            f"({plan.predicted_iteration_ms / plan.baseline_iteration_ms:.3f}x); "
            f"keep {plan.count('keep')}, recompute {plan.count('recompute')}, swap {plan.count('swap')}")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="*", help="report directories or report.json files (schema /2)")
    parser.add_argument("--profile", nargs="*", default=[], metavar="MODEL:BATCH",
                        help="zoo models to profile on this machine first, e.g. resnet152:2")
    parser.add_argument("--budgets", default="0.3,0.4,0.5,0.6,0.7,0.8,0.9",
                        help="fractions of the profiled peak (default: 0.3 to 0.9)")
    parser.add_argument("--repeat", type=int, default=3, help="plan each budget this many times, keep the best")
    parser.add_argument("--allow-swap", choices=["auto", "yes", "no"], default="auto",
                        help="swaps: auto plans them for GPU reports only (default: auto)")
    args = parser.parse_args(argv)
    allow_swap = {"auto": None, "yes": True, "no": False}[args.allow_swap]
    budgets = [float(b) for b in args.budgets.split(",")]
    cases = [(path, Report.load(path)) for path in args.reports] + [cpu_report(s) for s in args.profile]
    if not cases:
        parser.error("give report paths or --profile MODEL:BATCH")
    for label, report in cases:
        print("\n".join(bench(label, report, budgets, args.repeat, allow_swap)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
