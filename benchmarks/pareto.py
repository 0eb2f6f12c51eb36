"""Peak memory against step time: mutwo beside PyTorch's own tools, in one
process per model (issue 20).

Every tool trains a fresh model (same seed, fp32, Adam(fused=True)) on the
same batch and is measured the same way: the allocator's peak over steady
steps (max_memory_allocated; a CUDA graph's, over its capture) and the
median of 7 step times (CUDA events).

  eager                  the zoo's train step
  checkpoint_blocks      torch.utils.checkpoint (non-reentrant) on every block
                         (ResNet's Bottlenecks; BERT: HF's gradient_checkpointing_enable)
  checkpoint_stages      on each of ResNet's four stages
  save_on_cpu            torch.autograd.graph.save_on_cpu(pin_memory=True) around forward and loss
  inductor_<b>           torch.compile with activation_memory_budget b (1.0, 0.5, 0.1)
  mutwo_<b>              optimize_train_step at budget b (0.3 to 0.9), and at each
                         anchor's measured peak (mutwo_at_<anchor>)
  mutwo_compile_<b>      torch.compile(backend="mutwo") at budget b

Writes pareto_<model>.json and pareto_<model>.png under --out and prints
the issue's goals as PASS/FAIL lines.

    python benchmarks/pareto.py --models resnet152:64 bert:16 --out benchmarks/results
    python benchmarks/pareto.py --models mlp:256 --device cpu --tools eager save_on_cpu mutwo --out /tmp/p
"""

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
import traceback

import torch

from mutwo_backend import BudgetError, OptimizedStep, get_plan, plan_memory
from mutwo_backend.device_memory import free_device_memory
from mutwo_backend.models import fresh_setup, zoo_train_step
from mutwo_backend.profiler import profile_captured_step
from mutwo_backend.runtime.step import step_times_ms

GIB = 2 ** 30
MUTWO_BUDGETS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
INDUCTOR_BUDGETS = (1.0, 0.5, 0.1)
TOOLS = ("eager", "checkpoint_blocks", "checkpoint_stages", "save_on_cpu", "inductor", "mutwo", "mutwo_compile")
ANCHORS = ("eager", "checkpoint_blocks", "checkpoint_stages", "save_on_cpu", "inductor")


def measured(step, device: torch.device, steps: int = 7) -> dict:
    """Peak (bytes, the allocator's over the timed steps; None on the CPU)
    and median step time (ms) after two warm-up steps."""
    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = step_times_ms(step, device, steps)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"peak_bytes": peak, "step_ms": statistics.median(times)}


def blocks(model, name: str, stages: bool) -> list[torch.nn.Module] | None:
    """The modules checkpointing wraps: ResNet's Bottlenecks (or its four
    stages); None where the model has no such blocks."""
    if name.startswith("resnet"):
        layers = [model.layer1, model.layer2, model.layer3, model.layer4]
        return layers if stages else [block for layer in layers for block in layer]
    return None


@contextlib.contextmanager
def checkpointed(modules):
    """Each module's forward run through torch.utils.checkpoint (non-reentrant)."""
    originals = [m.forward for m in modules]
    for module, forward in zip(modules, originals):
        module.forward = lambda *a, _f=forward, **k: torch.utils.checkpoint.checkpoint(_f, *a, use_reentrant=False,
                                                                                      **k)
    try:
        yield
    finally:
        for module, forward in zip(modules, originals):
            module.forward = forward


def eager_tool(name, batch, device, wrap=None):
    spec, model, optimizer, inputs, targets = fresh_setup(name, batch, device)
    step = zoo_train_step(spec)
    with wrap(spec, model) if wrap else contextlib.nullcontext():
        return measured(lambda: step(model, optimizer, inputs, targets), device)


def checkpoint_tool(stages: bool):
    def wrap(spec, model):
        if spec.name.startswith("bert") and not stages:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            return contextlib.nullcontext()
        modules = blocks(model, spec.name, stages)
        if modules is None:
            raise NotImplementedError(f"no {'stages' if stages else 'blocks'} known for {spec.name}")
        return checkpointed(modules)
    return wrap


def save_on_cpu_tool(name, batch, device):
    spec, model, optimizer, inputs, targets = fresh_setup(name, batch, device)

    def step():
        with torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda"):
            loss = spec.loss(spec.forward(model, inputs), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return measured(step, device)


def compiled_tool(name, batch, device, backend, options=None, budget=None):
    """A training loop over torch.compile(model): inductor at an activation
    memory budget, or backend "mutwo" (its first steps profile)."""
    import torch._functorch.config as functorch_config

    torch._dynamo.reset()
    spec, model, optimizer, inputs, targets = fresh_setup(name, batch, device)
    kwargs = {"backend": backend} if options is None else {"backend": backend, "options": options(optimizer)}
    compiled = torch.compile(model, **kwargs)

    def step():
        loss = spec.loss(spec.forward(compiled, inputs), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    began = time.perf_counter()
    with (functorch_config.patch(activation_memory_budget=budget) if budget is not None
          else contextlib.nullcontext()):
        first = None
        for index in range(6):  # mutwo: warm-up 1, 3 measured, then the plan; inductor: compiled and warm
            step()
            if index == 0:
                first = time.perf_counter() - began
        to_plan = time.perf_counter() - began
        result = measured(step, device)
    result.update(first_step_s=first, six_steps_s=to_plan)
    if backend == "mutwo":
        plan = get_plan(compiled)
        result["plans"] = len(plan) if isinstance(plan, list) else 1
    return result


def mutwo_tools(name, batch, device, budgets, anchors: dict) -> dict:
    """optimize_train_step's rewrite of one profile, at each budget and at
    each anchor's measured peak (bytes)."""
    spec, model, optimizer, inputs, targets = fresh_setup(name, batch, device)
    train_step = zoo_train_step(spec)
    report, _, step = profile_captured_step(train_step, model, optimizer, (inputs, targets), None, 3, None, "model",
                                            name, 2)
    targets_of = {f"mutwo_{b}": b for b in budgets}
    targets_of.update({f"mutwo_at_{tool}": r["peak_bytes"] for tool, r in anchors.items()
                       if tool != "eager" and r.get("peak_bytes")})
    results = {}
    for label, budget in targets_of.items():
        try:
            plan = plan_memory(report, budget)
        except BudgetError as error:
            results[label] = {"error": str(error), "lowest_peak_bytes": error.lowest_peak_bytes}
            continue
        optimized = OptimizedStep(step, plan, report, train_step)
        m = optimized.measure(inputs, targets, iters=7)
        results[label] = {"peak_bytes": m["measured_peak_bytes"], "step_ms": m["measured_step_ms"],
                          "pool_bytes": m["pool_bytes"], "runtime": m["runtime"], "budget_bytes": plan.budget_bytes,
                          "predicted_peak_bytes": plan.predicted_peak_bytes,
                          "predicted_step_ms": plan.predicted_iteration_ms, "recompute": plan.count("recompute"),
                          "swap": plan.count("swap")}
        del optimized
        free_device_memory(device)
    return results


def run_tools(name: str, batch: int, device: torch.device, tools, budgets) -> dict:
    runs = {}

    def attempt(label, fn, *args, **kwargs):
        try:
            runs[label] = fn(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - one tool's failure is recorded, the others run
            runs[label] = {"error": f"{type(error).__name__}: {error}"[:2000], "traceback": traceback.format_exc()}
        free_device_memory(device)
        print(f"{name} {label}: {describe(runs[label])}", flush=True)

    if "eager" in tools:
        attempt("eager", eager_tool, name, batch, device)
    if "checkpoint_blocks" in tools:
        attempt("checkpoint_blocks", eager_tool, name, batch, device, checkpoint_tool(stages=False))
    if "checkpoint_stages" in tools and name.startswith("resnet"):
        attempt("checkpoint_stages", eager_tool, name, batch, device, checkpoint_tool(stages=True))
    if "save_on_cpu" in tools:
        attempt("save_on_cpu", save_on_cpu_tool, name, batch, device)
    if "inductor" in tools:
        for b in INDUCTOR_BUDGETS:
            attempt(f"inductor_{b}", compiled_tool, name, batch, device, "inductor", budget=b)
    if "mutwo" in tools:
        anchors = {k: v for k, v in runs.items() if "error" not in v}
        try:
            for label, result in mutwo_tools(name, batch, device, budgets, anchors).items():
                runs[label] = result
                print(f"{name} {label}: {describe(result)}", flush=True)
        except Exception as error:  # noqa: BLE001
            runs["mutwo"] = {"error": f"{type(error).__name__}: {error}"[:2000], "traceback": traceback.format_exc()}
        free_device_memory(device)
    if "mutwo_compile" in tools:
        for b in (0.5, 0.8):
            attempt(f"mutwo_compile_{b}", compiled_tool, name, batch, device, "mutwo",
                    options=lambda opt, _b=b: {"memory_budget": _b, "optimizer": opt, "warmup": 1, "iters": 3})
        attempt("aot_eager", compiled_tool, name, batch, device, "aot_eager")
    return runs


def describe(result: dict) -> str:
    if "error" in result:
        return "error: " + result["error"].splitlines()[0][:200]
    peak = f"{result['peak_bytes'] / GIB:.2f} GiB" if result.get("peak_bytes") else "peak -"
    return f"{peak}, {result['step_ms']:.1f} ms"


def goals(model: str, runs: dict) -> list[tuple[str, bool]]:
    out = []
    ok = {k: v for k, v in runs.items() if "error" not in v and v.get("peak_bytes")}
    mutwo = {k: v for k, v in ok.items() if k.startswith("mutwo_") and not k.startswith("mutwo_compile")}
    anchors = {k: v for k, v in ok.items() if k.split("_")[0] in ("eager", "checkpoint", "save", "inductor")}
    for label, m in mutwo.items():
        dominating = [a for a, r in anchors.items() if r["peak_bytes"] < m["peak_bytes"] and r["step_ms"] < m["step_ms"]]
        out.append((f"{label} on the front: no anchor both lower in peak and faster ({', '.join(dominating) or 'none'})",
                    not dominating))
    eager = ok.get("eager")
    target = {"resnet152": ("checkpoint_blocks", 1.20), "bert": ("checkpoint_blocks", 1.10)}.get(model)
    if eager and target and f"mutwo_at_{target[0]}" in ok:
        m = ok[f"mutwo_at_{target[0]}"]
        ratio = m["step_ms"] / eager["step_ms"]
        out.append((f"at {target[0]}'s peak ({ok[target[0]]['peak_bytes'] / GIB:.2f} GiB) mutwo's step time "
                    f"<= {target[1]}x eager ({ratio:.2f}x, peak {m['peak_bytes'] / GIB:.2f} GiB)",
                    ratio <= target[1] and m["peak_bytes"] <= ok[target[0]]["peak_bytes"] * 1.02))
    compiled, aot = runs.get("mutwo_compile_0.5", {}), runs.get("aot_eager", {})
    if "six_steps_s" in compiled and "first_step_s" in aot:
        ratio = compiled["six_steps_s"] / aot["first_step_s"]
        out.append((f"backend mutwo: first call to running the plan <= 1.25x aot_eager's first step ({ratio:.2f}x)",
                    ratio <= 1.25))
    return out


def plot(model: str, runs: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    ok = {k: v for k, v in runs.items() if "error" not in v and v.get("peak_bytes")}
    line = sorted(((v["step_ms"], v["peak_bytes"] / GIB) for k, v in ok.items()
                   if k.startswith("mutwo_") and not k.startswith("mutwo_compile")))
    if line:
        ax.plot([t for t, _ in line], [p for _, p in line], "o-", label="mutwo (optimize_train_step)")
    for label, v in ok.items():
        if not label.startswith("mutwo_") or label.startswith("mutwo_compile"):
            ax.plot(v["step_ms"], v["peak_bytes"] / GIB, "s" if "mutwo" in label else "^", label=label)
    ax.set_xlabel("step time (ms, median of 7)")
    ax.set_ylabel("peak memory (GiB, max_memory_allocated)")
    ax.set_title(f"{model}: peak memory against step time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet152:64", "bert:16"], help="name:batch")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tools", nargs="+", default=list(TOOLS), choices=TOOLS)
    parser.add_argument("--budgets", nargs="+", type=float, default=list(MUTWO_BUDGETS))
    parser.add_argument("--out", required=True)
    parser.add_argument("--one", action="store_true", help="(internal) run the first model in this process")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if not args.one:
        for model in args.models:
            subprocess.run([sys.executable, __file__, "--one", "--models", model, "--device", args.device, "--out",
                            args.out, "--tools", *args.tools, "--budgets", *map(str, args.budgets)], check=True)
        return
    name, _, batch = args.models[0].partition(":")
    device = torch.device(args.device)
    runs = run_tools(name, int(batch), device, args.tools, args.budgets)
    result = {"model": name, "batch": int(batch), "device": str(device), "torch": torch.__version__,
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "command": " ".join(sys.argv), "runs": runs,
              "goals": [{"goal": g, "met": m} for g, m in goals(name, runs)]}
    for goal in result["goals"]:
        print(f"  {'PASS' if goal['met'] else 'FAIL'}  {name}: {goal['goal']}")
    path = os.path.join(args.out, f"pareto_{name}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    if any(v.get("peak_bytes") for v in runs.values()):
        plot(name, runs, os.path.join(args.out, f"pareto_{name}.png"))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
