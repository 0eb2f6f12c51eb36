"""Holds every plan's predictions to the allocator and the clock (Stage 3).

For each model, in a process of its own: profile the step once, then for
each budget plan it, run it rewritten (as one CUDA graph where it can be)
and measure its peak and median step time beside the plan's predictions
and an eager step's, measured in the same process. Where a plan swaps,
one more step runs as the graph's code with the copies timed on their
streams, against the swap model. Last, 5 steps of mutwo against two eager
runs from the same state and generator (with and without the CUDA graph,
under torch.use_deterministic_algorithms). Prints one line per goal;
writes validate_plan_<model>.json under --out.

    python benchmarks/validate_plan.py --models resnet152:64 bert:16 --out benchmarks/results
    python benchmarks/validate_plan.py --models mlp:64 --device cpu --out /tmp/v   # a smoke run
"""

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys

import torch

from mutwo_backend import BudgetError, OptimizedStep, plan_memory
from mutwo_backend.device_memory import free_device_memory
from mutwo_backend.models import fresh_setup, zoo_train_step
from mutwo_backend.profiler import profile_captured_step

BUDGETS = (0.35, 0.4, 0.5, 0.6, 0.65, 0.8)
MIB = 2 ** 20
GIB = 2 ** 30
# (budget, peak at most x eager, time at most x eager): the goals per model
SPEED_GOALS = {"resnet152": ((0.65, 0.65, 1.02), (0.5, 0.50, 1.10), (0.35, 0.35, 1.30)),
               "bert": ((0.7, 0.70, 1.02), (0.55, 0.55, 1.10))}


def validate(name: str, batch: int, device: torch.device, budgets) -> dict:
    spec, model, optimizer, inputs, targets = fresh_setup(name, batch, device)
    args = (inputs, targets)
    train_step = zoo_train_step(spec)
    report, _, step = profile_captured_step(train_step, model, optimizer, args, None, 3, None, "model", name, 2)
    swap_model = report.to_dict()["meta"]["swap_model"]
    result = {"model": name, "batch": batch, "device": str(device), "torch": torch.__version__,
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "profiled_peak_bytes": report.to_dict()["memory"].get("measured_peak_bytes")
              or report.to_dict()["memory"]["peak_bytes"], "swap_model": swap_model, "budgets": []}
    for budget in budgets:
        row = {"budget": budget}
        try:
            plan = plan_memory(report, budget)
        except BudgetError as error:
            row.update(error=str(error), lowest_peak_bytes=error.lowest_peak_bytes)
            result["budgets"].append(row)
            print(f"{name} budget {budget}: {error}", flush=True)
            continue
        optimized = OptimizedStep(step, plan, report, train_step)
        row.update(optimized.measure(*args, iters=7), recompute=plan.count("recompute"), swap=plan.count("swap"),
                   keep=plan.count("keep"), runtime_note=report.to_dict()["meta"].get("runtime_note"))
        del optimized
        free_device_memory(device)
        if plan.count("swap") and device.type == "cuda":
            row["copies"] = copy_times(step, plan, report, train_step, args, swap_model)
            free_device_memory(device)
        result["budgets"].append(row)
        print(line(name, row), flush=True)
    planned = [r["budget"] for r in result["budgets"] if "measured_peak_bytes" in r]
    result["training"] = training_check(name, batch, device, budget=0.5 if 0.5 in planned else min(planned, default=1.0))
    return result


def copy_times(step, plan, report, train_step, args, swap_model) -> dict:
    """Median measured and modelled copy time per direction, over the
    swapped storages of 1 MiB or more, in one graph-code step."""
    optimized = OptimizedStep(step, plan, report, train_step, cuda_graph=False)
    streams = getattr(optimized.gm, "mutwo_swap")
    streams.timings = []
    optimized(*args)
    times = {}
    for direction in ("device_to_host", "host_to_device"):
        short = "d2h" if direction == "device_to_host" else "h2d"
        copies = [c for c in streams.copy_times() if c["direction"] == direction and c["bytes"] >= MIB]
        modelled = [swap_model[f"{short}_latency_ms"] + c["bytes"] / (swap_model[f"{short}_bandwidth_gb_s"] * 1e6)
                    for c in copies]
        if copies:
            times[direction] = {"copies": len(copies), "measured_ms": statistics.median(c["ms"] for c in copies),
                                "modelled_ms": statistics.median(modelled)}
    return times


def training_check(name: str, batch: int, device: torch.device, budget: float, steps: int = 5) -> dict:
    """Largest difference from a first eager run, over parameters, Adam
    state and buffers, after ``steps`` steps from the same state and
    generator: of a second eager run, and of mutwo (CUDA graph and graph
    code), all under deterministic algorithms."""
    torch.use_deterministic_algorithms(True)
    try:
        spec, model, optimizer, inputs, targets = fresh_setup(name, batch, device)
        args = (inputs, targets)
        train_step = zoo_train_step(spec)
        train_step(model, optimizer, *args)  # the Adam state exists: the state to start from
        start = copy.deepcopy((model.state_dict(), optimizer.state_dict()))
        rng = torch.random.get_rng_state(), torch.cuda.get_rng_state_all() if device.type == "cuda" else None

        def run(make_step):
            model.load_state_dict(start[0])
            optimizer.load_state_dict(copy.deepcopy(start[1]))
            torch.random.set_rng_state(rng[0])
            if rng[1] is not None:
                torch.cuda.set_rng_state_all(rng[1])
            run_step = make_step()
            for _ in range(steps):
                run_step(*args)
            state = [*model.parameters(), *model.buffers()]
            state += [v for p in model.parameters() for v in optimizer.state[p].values() if torch.is_tensor(v)]
            return [t.detach().double().cpu() for t in state]

        def eager():
            return lambda *a: train_step(model, optimizer, *a)

        first = run(eager)
        second = run(eager)
        report, _, step = profile_captured_step(train_step, model, optimizer, args, None, 1, None, "model", name, 2)
        plan = plan_memory(report, budget)
        diffs = {"eager_vs_eager": _max_diff(first, second)}
        for label, graph in (("mutwo_cuda_graph", None), ("mutwo_graph_code", False)):
            if graph is None and device.type != "cuda":
                continue
            diffs[label] = _max_diff(first, run(lambda: OptimizedStep(step, plan, report, train_step, graph)))
            free_device_memory(device)
        return {"steps": steps, "budget": budget, "deterministic": True, **diffs}
    finally:
        torch.use_deterministic_algorithms(False)


def _max_diff(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


def line(name: str, row: dict) -> str:
    gap_peak = row["measured_peak_bytes"] / row["predicted_peak_bytes"] - 1
    gap_time = row["measured_step_ms"] / row["predicted_iteration_ms"] - 1
    return (f"{name} budget {row['budget']}: {row['runtime']}, peak {row['measured_peak_bytes'] / GIB:.2f} GiB "
            f"(predicted {row['predicted_peak_bytes'] / GIB:.2f}, {gap_peak:+.1%}; budget "
            f"{row['budget_bytes'] / GIB:.2f}; eager {row['eager_peak_bytes'] / GIB:.2f}), time "
            f"{row['measured_step_ms']:.1f} ms (predicted {row['predicted_iteration_ms']:.1f}, {gap_time:+.1%}; "
            f"eager {row['eager_step_ms']:.1f}); recompute {row['recompute']}, swap {row['swap']}")


def goals(result: dict) -> list[tuple[str, bool]]:
    """(goal, met) for every goal of the issue this run measured."""
    out = []
    rows = [r for r in result["budgets"] if "measured_peak_bytes" in r]
    for r in rows:
        b = r["budget"]
        if b in (0.4, 0.5, 0.6, 0.8):
            gap = r["measured_peak_bytes"] / r["predicted_peak_bytes"] - 1
            out.append((f"budget {b}: measured peak within 3% of predicted ({gap:+.1%})", abs(gap) <= 0.03))
        over = r["measured_peak_bytes"] / r["budget_bytes"] - 1
        out.append((f"budget {b}: measured peak at most 2% over the budget ({over:+.1%})", over <= 0.02))
        gap = r["measured_step_ms"] / r["predicted_iteration_ms"] - 1
        out.append((f"budget {b}: step time within 5% of predicted, {r['runtime']} ({gap:+.1%})", abs(gap) <= 0.05))
        for direction, c in r.get("copies", {}).items():
            gap = c["measured_ms"] / c["modelled_ms"] - 1
            out.append((f"budget {b}: {direction} copies within 10% of the model ({gap:+.1%}, median of "
                        f"{c['copies']})", abs(gap) <= 0.10))
    for budget, peak, time in SPEED_GOALS.get(result["model"], ()):
        r = next((r for r in rows if r["budget"] == budget), None)
        if r is not None:
            p, t = r["measured_peak_bytes"] / r["eager_peak_bytes"], r["measured_step_ms"] / r["eager_step_ms"]
            out.append((f"peak <= {peak}x eager at <= {time}x eager's time ({p:.2f}x at {t:.2f}x)",
                        p <= peak and t <= time))
    training = result["training"]
    for label in ("mutwo_cuda_graph", "mutwo_graph_code"):
        if label in training:
            out.append((f"{label}: 5 steps no further from eager ({training[label]:.2e}) than a second eager run "
                        f"({training['eager_vs_eager']:.2e})", training[label] <= training["eager_vs_eager"]))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet152:64", "bert:16"], help="name:batch")
    parser.add_argument("--budgets", nargs="+", type=float, default=list(BUDGETS))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", required=True)
    parser.add_argument("--one", action="store_true", help="(internal) run the first model in this process")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if not args.one:
        env = {**os.environ, "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}  # what deterministic cuBLAS needs
        for model in args.models:
            subprocess.run([sys.executable, __file__, "--one", "--models", model, "--device", args.device,
                            "--out", args.out, "--budgets", *map(str, args.budgets)], check=True, env=env)
        return
    name, _, batch = args.models[0].partition(":")
    result = validate(name, int(batch), torch.device(args.device), args.budgets)
    result["goals"] = [{"goal": goal, "met": met} for goal, met in goals(result)]
    for goal in result["goals"]:
        print(f"  {'PASS' if goal['met'] else 'FAIL'}  {name}: {goal['goal']}")
    path = os.path.join(args.out, f"validate_plan_{name}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
