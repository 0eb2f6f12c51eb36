"""Where a rewritten step's time goes on a GPU: one profile, plans at 1.0
(nothing dropped), 0.5 without swaps, 0.5 and 0.8 with, each as one CUDA
graph and as the graph's code, beside eager measured before and after.

    python benchmarks/time_breakdown.py resnet152 64
"""
import gc
import statistics
import sys

import torch

from mutwo_backend import OptimizedStep, plan_memory
from mutwo_backend.models import fresh_setup, zoo_train_step
from mutwo_backend.profiler import profile_captured_step
from mutwo_backend.runtime.step import step_times_ms
name, batch = sys.argv[1], int(sys.argv[2])
dev = torch.device("cuda")
spec, model, opt, x, y = fresh_setup(name, batch, dev)
ts = zoo_train_step(spec)
report, _, step = profile_captured_step(ts, model, opt, (x, y), None, 3, None, "model", name, 2)
print("profile iteration ms", report.to_dict()["meta"]["iteration_time_ms"], flush=True)
for _ in range(2): ts(model, opt, x, y)
torch.cuda.synchronize()
print("eager ms", [round(t, 1) for t in step_times_ms(lambda: ts(model, opt, x, y), dev, 7)], flush=True)


def timed(plan, graph) -> tuple[str, float]:
    """(runtime, median ms) of 7 steps of ``plan``'s step after two."""
    optimized = OptimizedStep(step, plan, report, ts, graph)
    optimized(x, y)
    optimized(x, y)
    return optimized.runtime, statistics.median(step_times_ms(lambda: optimized(x, y), dev, 7))


for budget, swap in ((1.0, False), (0.5, False), (0.5, True), (0.8, True)):
    plan = plan_memory(report, budget, allow_swap=swap)
    for graph in (None, False):
        runtime, ms = timed(plan, graph)
        print(f"budget {budget} swap {swap} {runtime}: median {ms:.1f} ms (predicted {plan.predicted_iteration_ms:.1f}); "
              f"recompute {plan.count('recompute')} swap {plan.count('swap')}", flush=True)
        gc.collect()
        torch.cuda.empty_cache()
print("eager ms again", [round(t, 1) for t in step_times_ms(lambda: ts(model, opt, x, y), dev, 7)], flush=True)
