"""Checks the interpreter's accuracy goals (issue 4) on a CUDA GPU.

For each model: the sum of per-node times against the kernel time of one
uninstrumented run of the same graph (torch.profiler), nodes of 0.1 ms or
more against the same node re-run alone (CUDA events, median), the profiled
peak and the simulated peak against an eager step's max_memory_allocated,
and the swap model against real pinned copies. Prints one line per goal and
a summary line; writes JSON.

    python benchmarks/validate_gpu.py --models resnet152:64 bert:16 --out DIR
"""

import argparse
import json
import logging
import os
import time

import numpy as np
import torch
from torch import fx
from torch.profiler import ProfilerActivity, profile

import mutwo_backend
from mutwo_backend.models import get_model, zoo_train_step
from mutwo_backend.optimizers import EAGER_EQUIVALENTS
from mutwo_backend.profiler import profile_train_step
from passes import run_pipeline


def gpu_time_ms(fn, *args) -> float:
    """Sum of GPU activity durations (kernels, memcpy, memset) of one call."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(*args)
        torch.cuda.synchronize()
    events = prof.profiler.kineto_results.events()
    return sum(e.duration_ns() for e in events if e.device_type() != torch.autograd.DeviceType.CPU) / 1e6


def eager_reference(spec, model, optimizer, inputs, targets):
    step_fn = zoo_train_step(spec)
    step_fn(model, optimizer, inputs, targets)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    step_fn(model, optimizer, inputs, targets)
    torch.cuda.synchronize()
    step_ms = (time.perf_counter() - start) * 1e3
    return {"eager_peak_bytes": torch.cuda.max_memory_allocated(), "eager_step_ms": step_ms,
            "eager_kernel_ms": gpu_time_ms(step_fn, model, optimizer, inputs, targets)}


def gpu_time_alone_ms(fn, repeats: int = 10, rounds: int = 3) -> float:
    """Median GPU time of ``fn`` run back to back behind a sleep kernel: the
    launches queue up while the GPU sleeps, so host-side launch overhead
    (cuDNN's is tens of microseconds) is not counted."""
    fn()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(20_000_000)  # about 10 ms: longer than launching the repeats
        start.record()
        for _ in range(repeats):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / repeats)
    return float(np.median(times))


class RerunInterpreter(fx.Interpreter):
    """Runs the graph as the profiler does (fused Adam in place); after each
    chosen node, re-runs it alone on the same inputs (gpu_time_alone_ms)."""

    def __init__(self, gm, chosen):
        super().__init__(gm)
        self.chosen, self.alone_ms = chosen, {}

    def call_function(self, target, args, kwargs):
        return super().call_function(EAGER_EQUIVALENTS.get(target, target), args, kwargs)

    def run_node(self, n):
        result = super().run_node(n)
        if n.name in self.chosen:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            self.alone_ms[n.name] = gpu_time_alone_ms(lambda: getattr(self, n.op)(n.target, args, kwargs))
        return result


def validate(name: str, batch: int, seq_len: int | None) -> dict:
    spec = get_model(name)
    seq_len = seq_len or spec.default_seq_len
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = spec.build().to(device)
    optimizer = torch.optim.Adam(model.parameters(), fused=True)
    inputs, targets = spec.make_batch(batch, seq_len, device)
    result = {"model": name, "batch_size": batch, "seq_len": seq_len,
              "device_name": torch.cuda.get_device_name(), "torch_version": torch.__version__}
    result.update(eager_reference(spec, model, optimizer, inputs, targets))

    step = mutwo_backend.capture_train_step(zoo_train_step(spec), model, optimizer, inputs, targets)
    start = time.perf_counter()
    analysis = run_pipeline(step.gm, step.hints, allocator_rounding=True)
    result["passes_s"] = time.perf_counter() - start
    result["simulated_peak_bytes"] = int(analysis.memory.peak_bytes)
    result["graph_kernel_ms"] = gpu_time_ms(step, inputs, targets)

    for timer in ("cupti", "cuda-events"):
        start = time.perf_counter()
        report = profile_train_step(zoo_train_step(spec), model, optimizer, inputs, targets,
                                    timer=timer, model_name=name).to_dict()
        result[f"{timer}_profile_s"] = time.perf_counter() - start
        result[f"{timer}_node_sum_ms"] = report["meta"]["iteration_time_ms"]
        if timer == "cupti":
            cupti_report = report
    result["measured_peak_bytes"] = cupti_report["memory"]["measured_peak_bytes"]

    node_ms = {n["name"]: n["run_time_ms"] for n in cupti_report["nodes"]}
    chosen = {n for n, ms in node_ms.items() if ms >= 0.1}
    rerun = RerunInterpreter(step.gm, chosen)
    with torch.no_grad():
        rerun.run(*step.graph_inputs(inputs, targets))
    errors = {n: abs(node_ms[n] - rerun.alone_ms[n]) / rerun.alone_ms[n] for n in chosen}
    result["nodes_over_0.1ms"] = len(chosen)
    result["nodes_within_10pct"] = sum(e <= 0.10 for e in errors.values())
    result["worst_nodes"] = sorted(((e, n, node_ms[n], rerun.alone_ms[n]) for n, e in errors.items()),
                                   reverse=True)[:10]

    swap_report = profile_train_step(zoo_train_step(spec), model, optimizer, inputs, targets,
                                     swap="measure", model_name=name).to_dict()
    relative = []
    for a in swap_report["activations"]:
        if a["memory_bytes"] >= 2 ** 20 and a["swap_out_measured_ms"] and a["swap_in_measured_ms"]:
            relative.append(abs(a["swap_out_ms"] - a["swap_out_measured_ms"]) / a["swap_out_measured_ms"])
            relative.append(abs(a["swap_in_ms"] - a["swap_in_measured_ms"]) / a["swap_in_measured_ms"])
    result["swap_median_relative_error"] = float(np.median(relative)) if relative else None
    result["swap_model"] = swap_report["meta"]["swap_model"]
    return result


def goals(r: dict) -> list[tuple[str, str, str, bool]]:
    """(goal, measured, target, passed) rows."""
    node_err = (r["cupti_node_sum_ms"] - r["graph_kernel_ms"]) / r["graph_kernel_ms"]
    peak_err = (r["measured_peak_bytes"] - r["eager_peak_bytes"]) / r["eager_peak_bytes"]
    sim_err = (r["simulated_peak_bytes"] - r["eager_peak_bytes"]) / r["eager_peak_bytes"]
    share = r["nodes_within_10pct"] / max(r["nodes_over_0.1ms"], 1)
    swap = r["swap_median_relative_error"]
    return [
        ("sum of node times vs kernel time", f"{100 * node_err:+.1f}%", "within 5%", abs(node_err) <= 0.05),
        ("nodes >= 0.1 ms within 10% of re-run alone", f"{100 * share:.1f}%", ">= 90%", share >= 0.90),
        ("profiled peak vs eager peak", f"{100 * peak_err:+.2f}%", "within 1%", abs(peak_err) <= 0.01),
        ("simulated peak vs eager peak", f"{100 * sim_err:+.2f}%", "within 3%", abs(sim_err) <= 0.03),
        ("swap model vs measured (median rel. error)", "n/a" if swap is None else f"{100 * swap:.1f}%",
         "within 10%", swap is not None and swap <= 0.10),
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet152:64", "bert:16"],
                        help="model:batch pairs from the zoo (default: resnet152:64 bert:16)")
    parser.add_argument("--out", default="benchmarks/results", help="directory for validate_gpu.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    if not torch.cuda.is_available():
        parser.error("validate_gpu.py needs a CUDA GPU")
    results, all_passed = [], True
    for pair in args.models:
        name, batch = pair.split(":")
        r = validate(name, int(batch), None)
        r["goals"] = goals(r)
        results.append(r)
        print(f"\n{name} batch {batch} on {r['device_name']} (torch {r['torch_version']})")
        print(f"  eager step {r['eager_step_ms']:.1f} ms, eager kernel time {r['eager_kernel_ms']:.1f} ms, "
              f"graph kernel time {r['graph_kernel_ms']:.1f} ms, node sums: cupti "
              f"{r['cupti_node_sum_ms']:.1f} ms, cuda-events {r['cuda-events_node_sum_ms']:.1f} ms")
        for goal, measured, target, passed in r["goals"]:
            all_passed &= passed
            print(f"  {'PASS' if passed else 'FAIL'}  {goal}: {measured} (goal {target})")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "validate_gpu.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    failed = sum(not g[3] for r in results for g in r["goals"])
    total = sum(len(r["goals"]) for r in results)
    print(f"\nSUMMARY: {total - failed}/{total} goals met" + ("" if all_passed else f", {failed} missed"))


if __name__ == "__main__":
    main()
