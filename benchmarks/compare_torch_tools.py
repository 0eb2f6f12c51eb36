"""mutwo side by side with PyTorch's own memory tools on one training step (issue 7).

For each model (fresh model and fused Adam per tool, same seed, fp32) it measures

  ground truth     an eager step after a warm-up: the allocator's peak
                   (torch.cuda.max_memory_allocated), its wall time, the GPU
                   kernel time of one step (torch.profiler, sum of device-side
                   events) and the exact sizes of params, grads, optimizer state
  ground truth     the same numbers for the step mutwo_compile profiles:
  (compiled)       torch.compile(model, backend="aot_eager_default_partitioner"),
                   PyTorch running the same AOTAutograd graphs (default
                   partition) without mutwo. A model can behave differently
                   under torch.compile (HF BERT passes SDPA an explicit mask,
                   which sends attention to the math kernels), so the compile
                   path is held to the program it profiles; its error vs the
                   eager step is printed beside it
  mutwo_train_step profile_train_step(..., report_dir=...): time to the saved
                   report, simulated peak, breakdown at the peak, node-time sum
  mutwo_compile    torch.compile(model, backend="mutwo_profile", options=...),
                   warm-up + measured steps, get_report(): the same numbers
  torch_profiler   torch.profiler(profile_memory=True, record_shapes=True,
                   with_stack=True) around a step, export_memory_timeline():
                   time to the exported file, peak and categories at the peak
  mem_tracker      torch.distributed._tools.mem_tracker.MemTracker around a
                   step: time, peak snapshot and its categories

then prints a table (time to result, peak, error vs ground truth, bytes per
category at each tool's own peak), the category mapping, the issue's goals as
PASS/FAIL/SKIP lines and a summary line, and writes
``<out>/compare_torch_tools_<model>.json`` (rewritten after every tool, so a
later failure or timeout keeps the earlier results). A failing tool (missing
feature, OOM, ...) is recorded as {"error": ...} and the others still run.

On the H200 (one device call per model; through the device tool, write under
$OUT so the JSON comes back, then copy it to benchmarks/results/):

    python benchmarks/compare_torch_tools.py --models resnet152:64 --out $OUT
    python benchmarks/compare_torch_tools.py --models bert:16 --out $OUT   # seq 512

On a CPU, for development (no allocator peak there: the ground-truth peak is
an estimate from the live tensors before the step plus the profiler's CPU
allocation events, and the kernel-time goal is skipped):

    python benchmarks/compare_torch_tools.py --models mlp:8 resnet18:2 bert-tiny:2:64 --device cpu

A model is NAME:BATCH or NAME:BATCH:SEQ_LEN (zoo names: mlp, resnet18,
resnet152, bert-tiny, bert); --tools picks a subset of the tools.
"""

import argparse
import gc
import importlib
import importlib.util
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import types
import warnings
from dataclasses import dataclass

import torch
from tabulate import tabulate
from torch.profiler import ProfilerActivity, profile

GIB = 2 ** 30
CUDA_BLOCK = 512  # the CUDA caching allocator rounds every block up to this
# mutwo's measured iterations, and the compile backend's warm-up; profile_train_step
# keeps its default warm-up (none after a recorded capture, which ran the step)
WARMUP, ITERS = 1, 3
TOOLS = ("mutwo_train_step", "mutwo_compile", "torch_profiler", "mem_tracker")
CATEGORIES = ("params", "grads", "optimizer state", "activations", "other")

# Each tool's own categories -> the five columns of the table (anything else: other).
CATEGORY_MAPPING = {
    "mutwo": {"PARAM": "params", "GRAD": "grads", "OPT_STATE": "optimizer state", "ACT": "activations",
              "BUFFER": "other", "INPUT": "other", "OTHER": "other"},
    "torch_profiler": {"PARAMETER": "params", "GRADIENT": "grads", "OPTIMIZER_STATE": "optimizer state",
                       "ACTIVATION": "activations", "INPUT": "other", "TEMPORARY": "other",
                       "AUTOGRAD_DETAIL": "other", "UNKNOWN": "other"},
    "mem_tracker": {"Parameter": "params", "Gradient": "grads", "Optstate": "optimizer state",
                    "Activation": "activations", "Buffer": "other", "Temp": "other", "Other": "other"},
}
MAPPING_OF_TOOL = {"mutwo_train_step": "mutwo", "mutwo_compile": "mutwo",
                   "torch_profiler": "torch_profiler", "mem_tracker": "mem_tracker"}


# --- the zoo, fresh models --------------------------------------------------------

_ZOO = None


def load_zoo():
    """``(get_model, zoo_train_step, import_error)``. If the mutwo package
    itself does not import (work in progress elsewhere), its zoo module is
    loaded alone so the torch tools still run; the mutwo tools then report
    ``import_error``."""
    global _ZOO
    if _ZOO is None:
        try:
            from mutwo_backend.models import get_model, zoo_train_step
            _ZOO = (get_model, zoo_train_step, None)
        except ImportError as e:
            error = f"mutwo_backend does not import: {type(e).__name__}: {e}"
            print(f"warning: {error}; loading its model zoo alone", flush=True)
            # Submodules imported before the failure stay in sys.modules (their
            # torch.library ops are registered once); a bare package object
            # stands in for the package whose __init__ failed.
            spec = importlib.util.find_spec("mutwo_backend")
            package = types.ModuleType("mutwo_backend")
            package.__path__ = list(spec.submodule_search_locations)
            sys.modules["mutwo_backend"] = package
            models = importlib.import_module("mutwo_backend.models")
            _ZOO = (models.get_model, models.zoo_train_step, error)
    return _ZOO


@dataclass(frozen=True)
class Case:
    name: str
    batch: int
    seq_len: int
    device: torch.device
    seed: int = 0


@dataclass
class Setup:
    spec: object
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    inputs: torch.Tensor
    targets: torch.Tensor
    step_fn: object

    def step(self):
        return self.step_fn(self.model, self.optimizer, self.inputs, self.targets)


def fresh(case: Case) -> Setup:
    """A new model, Adam(fused=True) and batch, from the same seed every time."""
    get_model, zoo_train_step, _ = load_zoo()
    spec = get_model(case.name)
    torch.manual_seed(case.seed)
    model = spec.build().to(case.device)
    optimizer = torch.optim.Adam(model.parameters(), fused=True)
    inputs, targets = spec.make_batch(case.batch, case.seq_len, case.device)
    return Setup(spec, model, optimizer, inputs, targets, zoo_train_step(spec))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def device_str(device: torch.device) -> str:
    """'cuda:N' or 'cpu', as the profiler's timeline and MemTracker key devices."""
    if device.type == "cuda":
        return f"cuda:{device.index if device.index is not None else torch.cuda.current_device()}"
    return device.type


def storage_bytes(tensors, device: torch.device) -> tuple[int, int]:
    """(nbytes, allocated bytes) of the distinct storages of ``tensors``;
    allocated rounds each up to the CUDA allocator's block on a GPU."""
    seen, nbytes, allocated = set(), 0, 0
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() == 0:
            continue
        seen.add(storage.data_ptr())
        nbytes += storage.nbytes()
        allocated += (math.ceil(storage.nbytes() / CUDA_BLOCK) * CUDA_BLOCK
                      if device.type == "cuda" else storage.nbytes())
    return nbytes, allocated


def tensor_sizes(s: Setup, device: torch.device) -> dict:
    """Exact sizes of what lives across steps (grads: one per trainable param)."""
    params = list(s.model.parameters())
    groups = {
        "params": params,
        "grads": [p for p in params if p.requires_grad],
        "optimizer_state": [v for state in s.optimizer.state.values() for v in state.values()
                            if isinstance(v, torch.Tensor)],
        "buffers": list(s.model.buffers()),
        "inputs": [s.inputs, s.targets],
    }
    sizes = {}
    for name, tensors in groups.items():
        sizes[f"{name}_bytes"], sizes[f"{name}_alloc_bytes"] = storage_bytes(tensors, device)
    return sizes


def kernel_time_ms(fn, device: torch.device) -> float | None:
    """GPU time of one call: the sum of device-side profiler events (kernels,
    memcpy, memset). None on a CPU."""
    if device.type != "cuda":
        return None
    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        sync(device)
    return sum(e.duration_ns() for e in prof.profiler.kineto_results.events()
               if e.device_type() != torch.autograd.DeviceType.CPU) / 1e6


def cpu_peak_estimate(s: Setup) -> int:
    """No allocator peak exists on a CPU: live tensors before the step plus
    the running sum of the profiler's CPU allocation events during it."""
    device = torch.device("cpu")
    before = storage_bytes([*s.model.parameters(), *s.model.buffers(), s.inputs, s.targets,
                            *[p.grad for p in s.model.parameters() if p.grad is not None],
                            *[v for st in s.optimizer.state.values() for v in st.values()
                              if isinstance(v, torch.Tensor)]], device)[0]
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        s.step()
    events = sorted((e for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU),
                    key=lambda e: e.start_ns())
    live = high = 0
    for e in events:
        live += e.nbytes()
        high = max(high, live)
    return before + high


# --- the tools, one function each -------------------------------------------------

def measure_step(s: Setup, device: torch.device, warmup_steps: int, timed_steps: int = 5) -> dict:
    """After ``warmup_steps``: the allocator's peak of one step, the median
    wall time of ``timed_steps`` and the kernel time of one."""
    for _ in range(warmup_steps):
        s.step()
    sync(device)
    result = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        result["allocated_before_step_bytes"] = torch.cuda.memory_allocated(device)
        s.step()
        sync(device)
        result["peak_bytes"] = torch.cuda.max_memory_allocated(device)
        result["peak_source"] = "torch.cuda.max_memory_allocated"
    else:
        result["peak_bytes"] = cpu_peak_estimate(s)
        result["peak_source"] = "cpu estimate: live tensors + profiler allocation events"
    step_ms = []
    for _ in range(timed_steps):
        start = time.perf_counter()
        s.step()
        sync(device)
        step_ms.append((time.perf_counter() - start) * 1e3)
    result["step_ms"] = statistics.median(step_ms)
    result["step_ms_all"] = step_ms
    result["kernel_time_ms"] = kernel_time_ms(s.step, device)
    return result


def ground_truth(case: Case) -> dict:
    """Eager step after a warm-up (it creates the optimizer state and picks
    kernels): allocator peak, wall time, kernel time, tensor sizes."""
    s = fresh(case)
    s.step()
    return {**tensor_sizes(s, case.device), **measure_step(s, case.device, warmup_steps=0)}


def ground_truth_compiled(case: Case) -> dict:
    """The step mutwo_compile profiles, run by PyTorch alone: the model
    compiled with aot_eager_default_partitioner (AOTAutograd, default
    partition, graphs run as they are), loss and optimizer eager. Two
    warm-up steps: compilation (timed: ``first_step_s``, what torch.compile
    costs any backend before it runs), then the optimizer state."""
    torch._dynamo.reset()
    s = fresh(case)
    compiled = torch.compile(s.model, backend="aot_eager_default_partitioner")
    setup = Setup(s.spec, compiled, s.optimizer, s.inputs, s.targets, s.step_fn)
    try:
        start = time.perf_counter()
        setup.step()
        sync(case.device)
        first_step_s = time.perf_counter() - start
        return {"first_step_s": first_step_s, **measure_step(setup, case.device, warmup_steps=1)}
    finally:
        torch._dynamo.reset()


def _from_report(report, time_s: float, path: str) -> dict:
    data = report.to_dict()
    memory, meta = data["memory"], data["meta"]
    timeline = memory.get("timeline") or {}
    return {
        "time_s": time_s,
        # mutwo's peak is the allocator's on a GPU, the simulation's on the CPU
        "peak_bytes": memory.get("measured_peak_bytes") or memory["peak_bytes"],
        "measured_peak_bytes": memory.get("measured_peak_bytes"),
        "simulated_peak_bytes": memory["peak_bytes"],
        "breakdown": dict(memory["breakdown_at_peak"]),
        # largest value over the whole iteration per kind (all grads live at once before the step)
        "max_over_iteration": {kind: max(values) for kind, values in timeline.items() if values},
        "node_time_sum_ms": meta.get("iteration_time_ms"),
        "nodes": len(data.get("nodes", [])),
        "timer": meta.get("timer"),
        "notes": meta.get("notes", []),
        "report_path": path,
        "report_file_bytes": os.path.getsize(path) if path and os.path.exists(path) else None,
    }


def mutwo_train_step(case: Case, artifacts: str) -> dict:
    """profile_train_step, timed from the call to the saved report."""
    error = load_zoo()[2]
    if error:
        raise RuntimeError(error)
    from mutwo_backend.profiler import profile_train_step
    s = fresh(case)
    directory = os.path.join(artifacts, f"mutwo_train_step_{case.name}")
    start = time.perf_counter()
    report = profile_train_step(s.step_fn, s.model, s.optimizer, s.inputs, s.targets,
                                iters=ITERS, model_name=case.name, report_dir=directory)
    result = _from_report(report, time.perf_counter() - start, os.path.join(directory, "report.json"))
    # where the time to a report goes: profile_train_step's phases, the saving included
    result["phase_seconds"] = report.to_dict()["meta"]["phase_seconds"]
    result["warmup"] = report.to_dict()["meta"]["warmup"]
    result["capture_method"] = report.to_dict()["meta"].get("capture_method")
    return result


def mutwo_compile(case: Case, artifacts: str) -> dict:
    """torch.compile(backend="mutwo_profile"), timed from torch.compile to the saved report."""
    error = load_zoo()[2]
    if error:
        raise RuntimeError(error)
    import mutwo_backend
    if not hasattr(mutwo_backend, "get_report"):
        raise RuntimeError("mutwo_backend.get_report does not exist: the compile backend is not there yet")
    torch._dynamo.reset()
    s = fresh(case)
    directory = os.path.join(artifacts, f"mutwo_compile_{case.name}")
    try:
        start = time.perf_counter()
        compiled = torch.compile(s.model, backend="mutwo_profile",
                                 options={"optimizer": s.optimizer, "report_dir": directory,
                                          "warmup": WARMUP, "iters": ITERS})
        for _ in range(WARMUP + ITERS):
            s.step_fn(compiled, s.optimizer, s.inputs, s.targets)
        sync(case.device)
        report = mutwo_backend.get_report(compiled)
        if report is None:
            raise RuntimeError(f"get_report(compiled) is None after {WARMUP + ITERS} training steps")
        path = os.path.join(directory, "report.json")
        if not os.path.exists(path):  # the backend saves it itself when given report_dir
            path = report.save(directory)
        result = _from_report(report, time.perf_counter() - start, path)
        result["graphs"] = report.to_dict()["meta"].get("graphs")
        return result
    finally:
        torch._dynamo.reset()


def torch_profiler(case: Case, artifacts: str) -> dict:
    """torch.profiler memory timeline of one step, timed from entering the
    profiler to the exported timeline (the warm-up step is not timed)."""
    from torch.profiler import _memory_profiler as mp
    device = case.device
    s = fresh(case)
    s.step()
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    dev = device_str(device)
    path = os.path.join(artifacts, f"torch_profiler_memory_timeline_{case.name}.json")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # export_memory_timeline is deprecated
        start = time.perf_counter()
        with profile(activities=activities, profile_memory=True, record_shapes=True, with_stack=True) as prof:
            s.step()
            sync(device)
        profiled_s = time.perf_counter() - start
        prof.export_memory_timeline(path, device=dev)
        time_s = time.perf_counter() - start
        timeline = getattr(prof, "mem_tl", None) or mp.MemoryProfileTimeline(prof._memory_profile())
    times, sizes = timeline._coalesce_timeline(dev)
    if not sizes:
        raise RuntimeError(f"the memory timeline holds no event on {dev}")
    totals = [sum(row) for row in sizes]
    at = max(range(len(totals)), key=totals.__getitem__)
    breakdown = {(category.name if category is not None else "UNKNOWN"): int(sizes[at][index + 1])
                 for category, index in mp._CATEGORY_TO_INDEX.items()}
    return {"time_s": time_s, "profiled_step_s": profiled_s, "export_s": time_s - profiled_s,
            "peak_bytes": int(totals[at]), "breakdown": breakdown, "timeline_points": len(times),
            "timeline_path": path, "timeline_file_bytes": os.path.getsize(path)}


def mem_tracker(case: Case) -> dict:
    """MemTracker around one step (after an untimed warm-up), with the model,
    optimizer and batch registered through track_external."""
    from torch.distributed._tools.mem_tracker import MemTracker
    device = case.device
    s = fresh(case)
    s.step()
    sync(device)
    start = time.perf_counter()
    tracker = MemTracker()
    tracker.track_external(s.model, s.optimizer, s.inputs, s.targets)
    with tracker:
        s.step()
    sync(device)
    snapshot = tracker.get_tracker_snapshot("peak")
    time_s = time.perf_counter() - start
    dev = device_str(device)
    per_device = {str(d): snap for d, snap in snapshot.items()}
    if dev not in per_device:
        raise RuntimeError(f"MemTracker's peak snapshot has no {dev}: it has {sorted(per_device)}")
    snap = {getattr(k, "value", str(k)): int(v) for k, v in per_device[dev].items()}
    peak = snap.pop("Total")
    return {"time_s": time_s, "peak_bytes": peak, "breakdown": snap,
            "other_devices": sorted(d for d in per_device if d != dev)}


# --- running, comparing, reporting ------------------------------------------------

def run_tool(name: str, fn, *args) -> dict:
    """Run one tool; any failure becomes {"error": ...}; memory is freed after."""
    device = args[0].device
    print(f"[{args[0].name}] {name} ...", flush=True)
    start = time.perf_counter()
    try:
        result = fn(*args)
    except Exception as e:  # one tool's failure (OOM, missing feature) must not lose the others
        result = {"error": f"{type(e).__name__}: {e}".strip()[:2000],
                  "traceback": traceback.format_exc()[-4000:]}
        print(f"[{args[0].name}] {name} failed: {result['error'].splitlines()[0]}", flush=True)
    result["total_s"] = time.perf_counter() - start
    free_memory(device)
    return result


def mapped(tool: str, breakdown: dict) -> dict:
    """The tool's categories summed into the five columns."""
    mapping = CATEGORY_MAPPING[MAPPING_OF_TOOL[tool]]
    columns = dict.fromkeys(CATEGORIES, 0)
    for category, nbytes in breakdown.items():
        columns[mapping.get(category, "other")] += int(nbytes)
    return columns


def error_pct(value, reference):
    if value is None or not reference:
        return None
    return 100.0 * (value - reference) / reference


def reference_of(result: dict, tool: str) -> tuple[str, dict]:
    """The ground truth a tool is held to: the compiled step for
    mutwo_compile when it was measured, else the eager step."""
    compiled = result.get("ground_truth_compiled") or {}
    if tool == "mutwo_compile" and compiled and "error" not in compiled:
        return "compiled", compiled
    return "eager", result["ground_truth"]


def table_rows(result: dict) -> list[dict]:
    truth, rows = result["ground_truth"], []
    if "error" not in truth:
        rows.append({"tool": "ground truth (eager)", "time_s": truth["step_ms"] / 1e3,
                     "peak_bytes": truth["peak_bytes"], "vs": "eager", "peak_error_pct": 0.0,
                     "params": truth["params_bytes"], "grads": truth["grads_bytes"],
                     "optimizer state": truth["optimizer_state_bytes"], "activations": None, "other": None})
        compiled = result.get("ground_truth_compiled")
        if compiled and "error" not in compiled:
            rows.append({"tool": "ground truth (compiled)", "time_s": compiled["step_ms"] / 1e3,
                         "peak_bytes": compiled["peak_bytes"], "vs": "eager",
                         "peak_error_pct": error_pct(compiled["peak_bytes"], truth["peak_bytes"]),
                         **dict.fromkeys(CATEGORIES)})
    for tool in TOOLS:
        r = result["tools"].get(tool)
        if r is None:
            continue
        if "error" in r:
            rows.append({"tool": tool, "error": r["error"].splitlines()[0][:300]})
            continue
        vs, reference = reference_of(result, tool)
        row = {"tool": tool, "time_s": r["time_s"], "peak_bytes": r["peak_bytes"], "vs": vs,
               "peak_error_pct": error_pct(r["peak_bytes"], reference.get("peak_bytes"))}
        row.update(mapped(tool, r["breakdown"]))
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    def b(v):
        return "-" if v is None else f"{v:,}"
    out, errors = [], []
    for r in rows:
        if "error" in r:
            out.append([r["tool"], "error"] + ["-"] * (4 + len(CATEGORIES)))
            errors.append(f"{r['tool']} failed: {r['error']}")
            continue
        pct = r["peak_error_pct"]
        out.append([r["tool"], f"{r['time_s']:.3f}", b(r["peak_bytes"]), f"{r['peak_bytes'] / GIB:.3f}",
                    "-" if pct is None else f"{pct:+.2f}", r["vs"]] + [b(r[c]) for c in CATEGORIES])
    headers = ["tool", "time to result (s)", "peak (B)", "peak (GiB)", "peak err %", "vs"] + [
        f"{c} (B)" for c in CATEGORIES]
    return "\n".join([tabulate(out, headers=headers, tablefmt="simple", disable_numparse=True), *errors])


def format_mapping() -> str:
    lines = []
    for tool, mapping in CATEGORY_MAPPING.items():
        by_column = {c: [k for k, v in mapping.items() if v == c] for c in CATEGORIES}
        lines.append(f"  {tool}: " + "; ".join(f"{'+'.join(ks)} -> {c}" for c, ks in by_column.items() if ks)
                     + " (anything else -> other)")
    return "\n".join(lines)


def _check(name: str, ok: bool | None, detail: str) -> dict:
    return {"goal": name, "status": "SKIP" if ok is None else ("PASS" if ok else "FAIL"), "detail": detail}


def _exact(value, nbytes: int, alloc: int, unit: str = "") -> tuple[bool, str]:
    if value == nbytes:
        return True, f"{value:,} B{unit} = tensors' nbytes"
    if value == alloc:
        return True, f"{value:,} B{unit} = tensors' allocated size (512 B blocks)"
    return False, f"{value:,} B{unit} vs nbytes {nbytes:,} / allocated {alloc:,} ({value - nbytes:+,} B)"


def _grad_check(tool: str, at_peak: int, most: int | None, truth: dict) -> dict:
    """GRAD at the peak equals the grads' sizes, unless the peak comes before
    every grad exists (mid-backward): then the most GRAD live at any point of
    the iteration must equal them."""
    name = f"{tool}: GRAD exact"
    ok, detail = _exact(at_peak, truth["grads_bytes"], truth["grads_alloc_bytes"], " at peak")
    if ok or at_peak > truth["grads_bytes"] or most is None:
        return _check(name, ok, detail)
    ok, detail = _exact(most, truth["grads_bytes"], truth["grads_alloc_bytes"], " most live at once")
    return _check(name, ok, f"{detail} (at the peak {at_peak:,} B: it comes before every grad exists)")


def goal_checks(result: dict) -> list[dict]:
    """The issue's goals for each mutwo path that produced a report."""
    truth, tools, checks = result["ground_truth"], result["tools"], []
    if "error" in truth:
        return [_check("ground truth", False, truth["error"])]
    estimate = "" if result["device"].startswith("cuda") else " (CPU ground truth is an estimate)"
    tracker = tools.get("mem_tracker") or {}
    prof = tools.get("torch_profiler") or {}
    for tool in ("mutwo_train_step", "mutwo_compile"):
        r = tools.get(tool)
        if r is None:
            continue
        if "error" in r:
            checks.append(_check(f"{tool}: report", False, r["error"].splitlines()[0][:200]))
            continue
        vs, reference = reference_of(result, tool)
        pct = error_pct(r["peak_bytes"], reference["peak_bytes"])
        simulated = r["simulated_peak_bytes"]
        detail = (f"{'allocator during profiling' if r.get('measured_peak_bytes') else 'simulated'} "
                  f"{r['peak_bytes']:,} B vs {vs} ground truth {reference['peak_bytes']:,} B ({pct:+.2f}%)"
                  + (f"; simulation without a GPU {simulated:,} B "
                     f"({error_pct(simulated, reference['peak_bytes']):+.2f}%)"
                     if r.get("measured_peak_bytes") else "")
                  + (f"; vs the eager step {truth['peak_bytes']:,} B "
                     f"({error_pct(r['peak_bytes'], truth['peak_bytes']):+.2f}%)" if vs != "eager" else "")
                  + estimate)
        checks.append(_check(f"{tool}: peak within 1%", abs(pct) <= 1.0, detail))
        bd, whole = r["breakdown"], r.get("max_over_iteration", {})
        for kind, key in (("PARAM", "params"), ("OPT_STATE", "optimizer_state")):
            ok, detail = _exact(bd.get(kind, 0), truth[f"{key}_bytes"], truth[f"{key}_alloc_bytes"], " at peak")
            checks.append(_check(f"{tool}: {kind} exact", ok, detail))
        checks.append(_grad_check(tool, bd.get("GRAD", 0), whole.get("GRAD"), truth))
        if "error" in tracker or not tracker:
            checks.append(_check(f"{tool}: ACT within 5% of MemTracker", None, "no MemTracker result"))
        else:
            act, ref = bd.get("ACT", 0), tracker["breakdown"].get("Activation", 0)
            pct = error_pct(act, ref)
            program = error_pct(reference["peak_bytes"], truth["peak_bytes"]) if vs != "eager" else 0.0
            checks.append(_check(f"{tool}: ACT within 5% of MemTracker", pct is not None and abs(pct) <= 5.0,
                                 f"{act:,} B vs MemTracker Activation {ref:,} B"
                                 + ("" if pct is None else f" ({pct:+.2f}%)")
                                 + (f"; MemTracker tracks the eager step, and the compiled step is another "
                                    f"program: its own peak is {program:+.2f}% off the eager one"
                                    if abs(program) > 1.0 else "")))
        if result["model"] == "resnet152":
            checks.append(_check(f"{tool}: time to report <= 20 s", r["time_s"] <= 20.0,
                                 f"{r['time_s']:.2f} s"))
        if "error" in prof or not prof:
            checks.append(_check(f"{tool}: time <= torch.profiler's", None, "no torch.profiler result"))
        else:
            first = (result.get("ground_truth_compiled") or {}).get("first_step_s") if vs != "eager" else None
            checks.append(_check(f"{tool}: time <= torch.profiler's", r["time_s"] <= prof["time_s"],
                                 f"{r['time_s']:.2f} s vs {prof['time_s']:.2f} s"
                                 + (f"; the first step of torch.compile with aot_eager alone (dynamo, "
                                    f"AOTAutograd) took {first:.2f} s" if first else "")))
        kernel = reference.get("kernel_time_ms")
        if kernel is None:
            checks.append(_check(f"{tool}: node times within 5% of kernel time", None,
                                 f"no GPU kernel time on {result['device']} (sum of node times "
                                 f"{r['node_time_sum_ms']:.2f} ms, {vs} step {reference['step_ms']:.2f} ms)"))
        else:
            pct = error_pct(r["node_time_sum_ms"], kernel)
            eager = truth.get("kernel_time_ms")
            checks.append(_check(f"{tool}: node times within 5% of kernel time", abs(pct) <= 5.0,
                                 f"{r['node_time_sum_ms']:.2f} ms vs {vs} kernel {kernel:.2f} ms ({pct:+.2f}%)"
                                 + (f"; vs the eager step's {eager:.2f} ms "
                                    f"({error_pct(r['node_time_sum_ms'], eager):+.2f}%)"
                                    if vs != "eager" and eager else "")))
    return checks


def summary_line(result: dict) -> str:
    counts = {s: sum(c["status"] == s for c in result["goals"]) for s in ("PASS", "FAIL", "SKIP")}
    failed = [t for t, r in result["tools"].items() if "error" in r]
    for truth in ("ground_truth_compiled", "ground_truth"):
        if "error" in (result.get(truth) or {}):
            failed.insert(0, truth)
    return (f"{result['model']} batch {result['batch']} on {result['device_name']}: "
            f"{counts['PASS']} PASS, {counts['FAIL']} FAIL, {counts['SKIP']} SKIP"
            + (f"; failed: {', '.join(failed)}" if failed else "; every tool ran"))


def save(result: dict, out: str) -> str:
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"compare_torch_tools_{result['model']}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    return path


def compare(case: Case, out: str, artifacts: str, tools=TOOLS) -> dict:
    """All tools on one model; the JSON is rewritten after each one."""
    device = case.device
    result = {
        "schema": "mutwo.compare_torch_tools/1", "model": case.name, "batch": case.batch,
        "seq_len": case.seq_len, "device": device_str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch_version": torch.__version__, "dtype": "float32", "optimizer": "Adam(fused=True)",
        "seed": case.seed, "mutwo_compile_warmup": WARMUP, "mutwo_iters": ITERS,
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "category_mapping": CATEGORY_MAPPING, "ground_truth": {}, "tools": {},
    }
    free_memory(device)
    result["ground_truth"] = run_tool("ground_truth", ground_truth, case)
    if "mutwo_compile" in tools:
        result["ground_truth_compiled"] = run_tool("ground_truth_compiled", ground_truth_compiled, case)
    save(result, out)
    runners = {"mutwo_train_step": lambda: run_tool("mutwo_train_step", mutwo_train_step, case, artifacts),
               "mutwo_compile": lambda: run_tool("mutwo_compile", mutwo_compile, case, artifacts),
               "torch_profiler": lambda: run_tool("torch_profiler", torch_profiler, case, artifacts),
               "mem_tracker": lambda: run_tool("mem_tracker", mem_tracker, case)}
    for tool in tools:
        result["tools"][tool] = runners[tool]()
        save(result, out)
    result["table"] = table_rows(result)
    result["goals"] = goal_checks(result)
    result["summary"] = summary_line(result)
    save(result, out)
    return result


def print_result(result: dict, path: str) -> None:
    print()
    print(f"== {result['model']} batch {result['batch']}"
          + (f" seq {result['seq_len']}" if result["seq_len"] else "")
          + f", {result['device_name']}, torch {result['torch_version']}, fp32, Adam(fused=True)")
    truth = result["ground_truth"]
    if "error" not in truth:
        kernel = truth["kernel_time_ms"]
        print(f"ground truth: peak {truth['peak_bytes']:,} B ({truth['peak_source']}), eager step "
              f"{truth['step_ms']:.2f} ms, kernel time " + ("-" if kernel is None else f"{kernel:.2f} ms"))
    compiled = result.get("ground_truth_compiled") or {}
    if compiled and "error" not in compiled:
        kernel = compiled["kernel_time_ms"]
        print(f"ground truth (compiled, aot_eager_default_partitioner): peak {compiled['peak_bytes']:,} B, "
              f"step {compiled['step_ms']:.2f} ms, kernel time " + ("-" if kernel is None else f"{kernel:.2f} ms"))
    phases = (result["tools"].get("mutwo_train_step") or {}).get("phase_seconds")
    if phases:
        print("mutwo_train_step time to report: " + ", ".join(f"{k} {v:.2f} s" for k, v in phases.items()))
    print(format_table(result["table"]))
    train_step = result["tools"].get("mutwo_train_step") or {}
    print("time to result: ground truth = one eager step; mutwo = capture/compile, analysis, "
          f"warm-up (train-step: {train_step.get('warmup', '-')}, after a {train_step.get('capture_method')} "
          f"capture; compile: {WARMUP}) + {ITERS} measured iterations, saved report; torch.profiler = profiled step + "
          "exported timeline; MemTracker = tracked step + snapshot (warm-up steps not timed)")
    print("bytes per category at each tool's own peak; ground truth row: tensors' exact sizes; "
          "vs: the ground truth of the peak error (mutwo_compile: the compiled step, the program it profiles)")
    print("category mapping:")
    print(format_mapping())
    for check in result["goals"]:
        print(f"{check['status']}  {check['goal']}: {check['detail']}")
    print(result["summary"])
    print(f"saved {path}")


def parse_models(specs: list[str]) -> list[tuple[str, int, int | None]]:
    models = []
    for text in specs:
        parts = text.split(":")
        if len(parts) not in (2, 3) or not all(p.isdigit() for p in parts[1:]):
            raise SystemExit(f"--models takes NAME:BATCH or NAME:BATCH:SEQ_LEN, got {text!r}")
        models.append((parts[0], int(parts[1]), int(parts[2]) if len(parts) == 3 else None))
    return models


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet152:64", "bert:16"],
                        help="NAME:BATCH[:SEQ_LEN] per model (default: resnet152:64 bert:16)")
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--out", default=os.path.join("benchmarks", "results"),
                        help="directory of the JSON results (default benchmarks/results)")
    parser.add_argument("--tools", nargs="+", choices=TOOLS, default=list(TOOLS),
                        help="tools to compare (default: all); the ground truth always runs")
    parser.add_argument("--artifacts", default=None,
                        help="keep the tools' own files (mutwo reports, exported timelines) here; "
                             "default: a temporary directory, removed at the end")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no GPU is visible: use --device cpu with small models")
    artifacts = args.artifacts or tempfile.mkdtemp(prefix="compare_torch_tools_")
    os.makedirs(artifacts, exist_ok=True)
    get_model = load_zoo()[0]
    summaries = []
    try:
        for name, batch, seq_len in parse_models(args.models):
            spec = get_model(name)
            case = Case(name, batch, seq_len if seq_len is not None else spec.default_seq_len, device, args.seed)
            result = compare(case, args.out, artifacts, args.tools)
            print_result(result, save(result, args.out))
            summaries.append(result["summary"])
    finally:
        if args.artifacts is None:
            shutil.rmtree(artifacts, ignore_errors=True)
    if len(summaries) > 1:
        print()
        print("\n".join(summaries))
    return 0


if __name__ == "__main__":
    sys.exit(main())
