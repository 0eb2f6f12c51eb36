"""The unseen-model specs through optimize_train_step and backend "mutwo",
against eager from the same state and generator.

    .venv/bin/python benchmarks/unseen_models/optimize_all.py [--device cpu] [--only NAME ...]

Per spec: the train-step path profiles once to find its budget, halfway
between the profiled peak and the lowest peak recomputes reach
(BudgetError.lowest_peak_bytes), then optimize_train_step trains 3 steps
after its profile, against eager; the compile path trains 6 steps through
torch.compile(backend="mutwo", memory_budget=0.95), against the same steps
through "mutwo_profile" (the same compiled program, without a plan). One
line per spec and path: what the plan drops and the largest parameter
difference.
"""
import argparse
import contextlib
import os
import sys
import time
import traceback

import torch

import mutwo_backend
from mutwo_backend import sep

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import specs as SPECS  # noqa: E402

MIB = 2 ** 20


def setup(spec, device):
    def build():
        torch.manual_seed(0)
        model = spec["build"]().to(device)
        model.train()
        params = list(model.parameters()) if spec.get("all_params") else [p for p in model.parameters()
                                                                          if p.requires_grad]
        inputs = spec["inputs"](torch.Generator().manual_seed(7))
        inputs = tuple(t.to(device) if torch.is_tensor(t) else t for t in inputs)
        return model, spec["opt"](params), inputs

    def step(model, optimizer, *args, use_sep=True):
        with torch.autocast(device.type, dtype=torch.bfloat16) if spec.get("autocast") else contextlib.nullcontext():
            out = spec["forward"](model, *args)
            loss = spec["loss"](sep(out) if use_sep else out, *args)
        loss.backward()
        if spec.get("clip"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), spec["clip"])
        optimizer.step()
        optimizer.zero_grad()
        return loss

    return build, step


def max_diff(model, eager) -> float:
    return max(((a.double() - b.double()).abs().max().item() for a, b in
                zip(model.state_dict().values(), eager.state_dict().values()) if a.is_floating_point()), default=0.0)


def train_step_path(spec, device, allow_swap: bool | None = None) -> str:
    build, step = setup(spec, device)
    model, optimizer, inputs = build()
    report = mutwo_backend.profile_train_step(step, model, optimizer, *inputs, iters=1)
    peak = report.to_dict()["memory"]["peak_bytes"]
    try:
        mutwo_backend.plan_memory(report, 1, allow_swap=False)
    except mutwo_backend.BudgetError as error:
        floor = error.lowest_peak_bytes
    budget = int(peak - 0.5 * (peak - floor))
    model, optimizer, inputs = build()
    torch.manual_seed(1)
    optimized = mutwo_backend.optimize_train_step(step, model, optimizer, *inputs, memory_budget=budget, iters=1,
                                                  allow_swap=allow_swap)
    for _ in range(3):
        optimized(*inputs)
    eager, eager_optimizer, inputs = build()
    torch.manual_seed(1)
    for _ in range(optimized.report.to_dict()["meta"]["warmup"] + 1 + 3):
        step(eager, eager_optimizer, *inputs, use_sep=False)
    plan = optimized.plan
    return (f"peak {peak / MIB:.2f} MiB, floor {floor / MIB:.2f}, predicted {plan.predicted_peak_bytes / MIB:.2f}; "
            f"recompute {plan.count('recompute')}, swap {plan.count('swap')}; max diff {max_diff(model, eager):.2e}")


def compiled_training(spec, device, backend: str, options: dict):
    """6 steps through torch.compile(model, backend=...): the model and its compiled form."""
    build, step = setup(spec, device)
    torch._dynamo.reset()
    model, optimizer, inputs = build()
    compiled = torch.compile(model, backend=backend, options={**options, "optimizer": optimizer, "warmup": 1,
                                                              "iters": 1})
    torch.manual_seed(1)
    for _ in range(6):
        step(compiled, optimizer, *inputs, use_sep=False)
    return model, compiled


def compile_path(spec, device) -> str:
    """backend "mutwo" at budget 0.95 (1.0, keeping everything but running
    the split graphs, where 0.95 is out of reach), against "mutwo_profile":
    the same compiled program without a plan."""
    budget = 0.95
    try:
        model, compiled = compiled_training(spec, device, "mutwo", {"memory_budget": budget})
    except mutwo_backend.BudgetError:
        budget = 1.0
        model, compiled = compiled_training(spec, device, "mutwo", {"memory_budget": budget})
    reference, _ = compiled_training(spec, device, "mutwo_profile", {})
    plans = mutwo_backend.get_plan(compiled)
    plans = plans if isinstance(plans, list) else [plans] if plans else []
    return (f"budget {budget}: {len(plans)} graph(s) planned; recompute {sum(p.count('recompute') for p in plans)}, "
            f"swap {sum(p.count('swap') for p in plans)}; max diff from mutwo_profile "
            f"{max_diff(model, reference):.2e}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", nargs="+", default=SPECS.NAMES)
    parser.add_argument("--paths", nargs="+", default=["train-step", "compile"], choices=["train-step", "compile"])
    parser.add_argument("--allow-swap", action="store_true",
                        help="let the train-step path's plans swap (on the CPU, copies to a host slab and back)")
    args = parser.parse_args()
    device = torch.device(args.device)
    for name in args.only:
        spec = SPECS.get(name, device.type == "cuda")
        for path, run in (("train-step", lambda s, d: train_step_path(s, d, args.allow_swap or None)),
                          ("compile", compile_path)):
            if path not in args.paths:
                continue
            began = time.perf_counter()
            try:
                line = run(spec, device)
            except Exception as error:  # noqa: BLE001 - one spec's failure is reported, the others run
                frames = [f for f in traceback.extract_tb(error.__traceback__) if "unseen_models" not in f.filename]
                where = f" at {os.path.relpath(frames[-1].filename)}:{frames[-1].lineno}" if frames else ""
                line = f"ERROR {type(error).__name__}: {str(error)[:240]}{where}".replace("\n", " ")
            print(f"{name:28s} {path:10s} {line} ({time.perf_counter() - began:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
