"""Run model specs through mutwo's two entry points on a GPU (or the CPU) and
compare with eager PyTorch.

    PYTHONPATH=$PWD python3 benchmarks/unseen_models/run_all.py --device cuda [--only NAME ...]

Per spec, in one worker process (restarted after a timeout or crash):
  eager    reference: warm-up step, peak of one step, GPU time of
           optimizer.step() alone and of one whole step (torch.profiler),
           parameters after 3 and 4 steps, and the noise of a second eager run
  ts       profile_train_step(warmup=1, iters=2) vs eager (3 steps)
  compile  torch.compile(backend="mutwo_profile") 4 steps + get_report, vs
           eager (4 steps) and vs backend="aot_eager_default_partitioner"
Peaks are of each path's own memory: the allocator's peak less what was
allocated when the path began (what earlier specs left behind).
Writes $OUT/gpu_results.jsonl (one line per spec and path), $OUT/gpu_log.txt,
$OUT/reports/*.json.gz and prints a table at the end.
"""
import argparse
import fnmatch
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
import specs as SPECS  # noqa: E402  (no torch import at module level)

SEED = 0
WARMUP, ITERS = 1, 2
N_TS = WARMUP + ITERS          # steps the train-step path trains
N_COMPILE = WARMUP + ITERS + 1  # steps the compile path trains


def log(*a):
    print(*a, flush=True)


# --------------------------------------------------------------------------- worker

def worker(args):
    import contextlib
    import copy  # noqa: F401
    import gc
    import gzip
    import traceback
    import weakref
    import torch
    import mutwo_backend
    from mutwo_backend import sep

    gc.freeze()  # imports are long-lived
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    if cuda:  # cuBLAS allocates its workspaces at its first matmul and keeps them: before any path measures
        torch.nn.Linear(8, 8, device=dev)(torch.ones(2, 8, device=dev)).sum().backward()
    big = cuda if args.size == "auto" else args.size == "big"
    out = args.out
    os.makedirs(os.path.join(out, "reports"), exist_ok=True)
    results = os.path.join(out, "gpu_results.jsonl")
    log(f"[worker] torch {torch.__version__} device {dev}"
        + (f" ({torch.cuda.get_device_name()})" if cuda else "") + f" sizes {'big' if big else 'small'}")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def alloc():
        return torch.cuda.memory_allocated() if cuda else None

    def own(peak, before):
        """A peak less what was allocated before the path built its model (what
        earlier specs left): each path's error is then of its own memory."""
        return None if peak is None or before is None else peak - before

    cleanup_s = [0.0]

    def cleanup():
        t = time.perf_counter()
        gc.collect()
        cleanup_s[0] += time.perf_counter() - t
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    def to_dev(x):
        if isinstance(x, torch.Tensor):
            return x.to(dev)
        if isinstance(x, dict):
            return {k: to_dev(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(to_dev(v) for v in x)
        return x

    def gpu_time_ms(fn):
        """Sum of GPU activity (kernels, memcpy, memset) of one call; None on the CPU."""
        if not cuda:
            fn()
            return None
        from torch.profiler import ProfilerActivity, profile
        sync()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            sync()
        events = prof.profiler.kineto_results.events()
        return sum(e.duration_ns() for e in events if e.device_type() != torch.autograd.DeviceType.CPU) / 1e6

    def build(spec):
        torch.manual_seed(SEED)
        model = spec["build"]().to(dev)
        model.train()
        params = list(model.parameters()) if spec.get("all_params") else [p for p in model.parameters() if p.requires_grad]
        opt = spec["opt"](params)
        g = torch.Generator().manual_seed(SEED + 7)
        inputs = to_dev(spec["inputs"](g))
        return model, opt, inputs

    def ac_ctx(spec):
        return torch.autocast(dev.type, dtype=torch.bfloat16) if spec.get("autocast") else contextlib.nullcontext()

    def fwd_bwd(spec, model, opt, *a, use_sep=False):
        with ac_ctx(spec):
            out_ = spec["forward"](model, *a)
            if use_sep:
                out_ = sep(out_)
            loss = spec["loss"](out_, *a)
        loss.backward()
        if spec.get("clip"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), spec["clip"])
        return loss

    def eager_step(spec):
        def step(model, opt, *a):
            loss = fwd_bwd(spec, model, opt, *a)
            opt.step()
            opt.zero_grad()
            return loss
        return step

    def train_step_fn(spec):
        def train_step(model, optimizer, *a):
            loss = fwd_bwd(spec, model, optimizer, *a, use_sep=True)
            optimizer.step()
            optimizer.zero_grad()
            return loss
        return train_step

    def snapshot(model):
        return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items() if v.is_floating_point()}

    def maxdiff(model, snap):
        if snap is None:
            return None
        d = 0.0
        for k, v in model.state_dict().items():
            if k in snap:
                d = max(d, (v.detach().cpu().double() - snap[k].double()).abs().max().item())
        return d

    def pct(a, b):
        return None if a is None or not b else round(100.0 * (a - b) / b, 2)

    def err_info(e):
        tb = traceback.extract_tb(e.__traceback__)
        ours = [f for f in tb if f.filename.startswith(os.path.join(REPO, "mutwo_backend"))
                or f.filename.startswith(os.path.join(REPO, "passes"))]
        last = ours[-1] if ours else None
        return {"error_type": type(e).__name__, "error": str(e)[:300],
                "mutwo_frame": f"{os.path.relpath(last.filename, REPO)}:{last.lineno}" if last else None,
                "last_frame": f"{tb[-1].filename}:{tb[-1].lineno}" if tb else None}

    def write(rec):
        with open(results, "a") as f:
            f.write(json.dumps(rec, default=str) + "\n")

    def save_report(name, path, report):
        try:
            with gzip.open(os.path.join(out, "reports", f"{name}.{path}.json.gz"), "wt") as f:
                json.dump(report.to_dict(), f, default=str)
        except Exception as e:  # never fail a spec over this
            log(f"[worker] could not save report {name}.{path}: {e!r}")

    def run_path(name, path, fn, *a):
        """Run fn(holder, *a) -> dict; add ok/error, model_freed, leftover memory."""
        holder = {}  # the previous path cleaned up after itself
        rec = {"spec": name, "path": path, "device": str(dev), "allocated_before_bytes": alloc()}
        t0 = time.perf_counter()
        try:
            rec.update(fn(holder, *a))
            rec.setdefault("ok", True)
        except Exception as e:
            rec.update(ok=False, **err_info(e))
            e = None  # drop the traceback and the frames that hold the model
        rec["path_wall_s"] = round(time.perf_counter() - t0, 2)
        refs = holder.pop("refs", [])
        holder.clear()
        extra = holder  # noqa: F841
        cleanup()
        rec["model_freed"] = all(r() is None for r in refs) if refs else None
        rec["allocated_after_cleanup_bytes"] = alloc()
        return rec

    # ---- the three paths

    def eager_path(holder, name, spec):
        before = alloc()
        model, opt, inputs = build(spec)
        holder["refs"] = [weakref.ref(model)]
        step = eager_step(spec)
        torch.manual_seed(SEED + 1)
        step(model, opt, *inputs)                      # 1: warm-up
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        step(model, opt, *inputs)                      # 2: peak and wall time
        sync()
        step_ms = (time.perf_counter() - t0) * 1e3
        peak = own(torch.cuda.max_memory_allocated() if cuda else None, before)
        fwd_bwd(spec, model, opt, *inputs)             # 3: optimizer.step() alone under the profiler
        t0 = time.perf_counter()
        opt_ms = gpu_time_ms(opt.step)
        opt_host_ms = (time.perf_counter() - t0) * 1e3
        opt.zero_grad()
        snap3 = snapshot(model)
        kernel_ms = gpu_time_ms(lambda: step(model, opt, *inputs))  # 4: whole step under the profiler
        snap4 = snapshot(model)
        n_params = sum(p.numel() for p in model.parameters())
        del model, opt, step
        cleanup()
        # noise floor: a second eager run, same seeds
        model, opt, inputs = build(spec)
        holder["refs"].append(weakref.ref(model))
        step = eager_step(spec)
        torch.manual_seed(SEED + 1)
        for _ in range(N_COMPILE):
            step(model, opt, *inputs)
        noise = maxdiff(model, snap4)
        holder["ref"] = dict(peak=peak, kernel_ms=kernel_ms, opt_ms=opt_ms, snap3=snap3, snap4=snap4, noise=noise)
        return dict(eager_peak_bytes=peak, eager_step_ms=round(step_ms, 3), eager_kernel_ms=kernel_ms,
                    eager_opt_kernel_ms=opt_ms, eager_opt_host_ms=round(opt_host_ms, 3),
                    eager_rerun_param_max_diff=noise, n_params=n_params)

    def ts_path(holder, name, spec, ref):
        before = alloc()
        model, opt, inputs = build(spec)
        holder["refs"] = [weakref.ref(model)]
        torch.manual_seed(SEED + 1)
        t0 = time.perf_counter()
        report = mutwo_backend.profile_train_step(train_step_fn(spec), model, opt, *inputs, warmup=WARMUP, iters=ITERS,
                                                  model_name=name)
        t_report = time.perf_counter() - t0
        d = report.to_dict()
        save_report(name, "ts", report)
        meta, mem, nodes = d["meta"], d["memory"], d["nodes"]
        opt_region = sum(n["run_time_ms"] for n in nodes if n["region"] == "optimizer")
        ref = ref or {}
        eager_peak = ref.get("peak")
        measured_peak = own(mem.get("measured_peak_bytes"), before)
        return dict(
            time_to_report_s=round(t_report, 2), phase_seconds=meta.get("phase_seconds"), timer=meta.get("timer"),
            capture_method=meta.get("capture_method"),
            iteration_time_ms=meta.get("iteration_time_ms"), instrumented_wall_ms=meta.get("instrumented_wall_ms"),
            node_time_sum_ms=round(sum(n["run_time_ms"] for n in nodes), 3),
            eager_kernel_ms=ref.get("kernel_ms"), iter_err_pct=pct(meta.get("iteration_time_ms"), ref.get("kernel_ms")),
            optimizer_region_ms=round(opt_region, 4), eager_opt_kernel_ms=ref.get("opt_ms"),
            opt_err_pct=pct(opt_region, ref.get("opt_ms")),
            measured_peak_bytes=measured_peak, simulated_peak_bytes=mem.get("peak_bytes"),
            eager_peak_bytes=eager_peak, peak_err_pct=pct(measured_peak, eager_peak),
            sim_peak_err_pct=pct(mem.get("peak_bytes"), eager_peak),
            peak_region=nodes[mem["peak_rank"]]["region"] if nodes else None,
            breakdown_at_peak=mem.get("breakdown_at_peak"), outside_graphs_peak_bytes=mem.get("outside_graphs_peak_bytes"),
            param_max_diff=maxdiff(model, ref.get("snap3")), eager_rerun_param_max_diff=ref.get("noise"),
            n_nodes=len(nodes), n_activations=len(d["activations"]), notes=meta.get("notes"))

    def compile_path(holder, name, spec, ref, spec_t0):
        ref = ref or {}
        torch._dynamo.reset()
        before = alloc()
        model, opt, inputs = build(spec)
        holder["refs"] = [weakref.ref(model)]
        compiled = torch.compile(model, backend="mutwo_profile",
                                 options={"warmup": WARMUP, "iters": ITERS, "optimizer": opt})
        step = eager_step(spec)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        torch.manual_seed(SEED + 1)
        t0 = time.perf_counter()
        for _ in range(N_COMPILE):
            step(compiled, opt, *inputs)
        sync()
        report = mutwo_backend.get_report(compiled)
        t_report = time.perf_counter() - t0
        rec = dict(time_to_report_s=round(t_report, 2), process_peak_bytes=own(torch.cuda.max_memory_allocated() if cuda else None, before),
                   param_max_diff=maxdiff(model, ref.get("snap4")), eager_rerun_param_max_diff=ref.get("noise"))
        fb_kernel = (ref["kernel_ms"] - ref["opt_ms"]) if ref.get("kernel_ms") is not None else None
        if report is None:
            rec.update(ok=False, error_type="NoReport", error="get_report(compiled) returned None after "
                       f"{N_COMPILE} steps")
        else:
            d = report.to_dict()
            save_report(name, "compile", report)
            meta, mem = d["meta"], d["memory"]
            rec.update(iteration_time_ms=meta.get("iteration_time_ms"), eager_fwd_bwd_kernel_ms=fb_kernel,
                       iter_err_pct=pct(meta.get("iteration_time_ms"), fb_kernel),
                       measured_peak_bytes=own(mem.get("measured_peak_bytes"), before),
                       simulated_peak_bytes=mem.get("peak_bytes"), eager_peak_bytes=ref.get("peak"),
                       peak_vs_eager_pct=pct(own(mem.get("measured_peak_bytes"), before), ref.get("peak")),
                       graphs=meta.get("graphs"), graph_breaks=meta.get("graph_breaks"),
                       n_graph_reports=len(d.get("graphs") or []), n_nodes=len(d["nodes"]), notes=meta.get("notes"),
                       timer=meta.get("timer"))
        del compiled, model, opt, step, report
        torch._dynamo.reset()
        cleanup()
        # baseline: PyTorch's own AOT eager, same steps; peak of steps 3-4
        used = time.perf_counter() - spec_t0
        if used > 0.8 * args.spec_budget:
            rec["aot_baseline"] = f"skipped: spec budget ({used:.0f} of {args.spec_budget:.0f} s used)"
            return rec
        try:
            t0 = time.perf_counter()
            before = alloc()
            model, opt, inputs = build(spec)
            holder["refs"].append(weakref.ref(model))
            compiled = torch.compile(model, backend="aot_eager_default_partitioner")
            torch.manual_seed(SEED + 1)
            for _ in range(2):
                step = eager_step(spec)
                step(compiled, opt, *inputs)
            sync()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            for _ in range(N_COMPILE - 2):
                step(compiled, opt, *inputs)
            sync()
            aot_peak = own(torch.cuda.max_memory_allocated() if cuda else None, before)
            rec.update(aot_peak_bytes=aot_peak, aot_allocated_before_bytes=before,
                       aot_param_max_diff=maxdiff(model, ref.get("snap4")), aot_wall_s=round(time.perf_counter() - t0, 2))
            if rec.get("measured_peak_bytes") is not None:
                rec["peak_err_pct"] = pct(rec["measured_peak_bytes"], aot_peak)
        except Exception as e:
            info = err_info(e)
            e = None
            rec["aot_baseline"] = "failed: " + json.dumps(info)
        torch._dynamo.reset()
        return rec

    def brief(rec):
        keys = ["ok", "capture_method", "time_to_report_s", "peak_err_pct", "sim_peak_err_pct", "iter_err_pct", "opt_err_pct",
                "param_max_diff", "eager_peak_bytes", "eager_kernel_ms", "eager_opt_kernel_ms", "graphs",
                "error_type", "error", "mutwo_frame", "aot_baseline", "model_freed"]
        return json.dumps({k: rec[k] for k in keys if rec.get(k) is not None}, default=str)[:600]

    for name in args.names.split(","):
        if not name:
            continue
        budget = SPECS.BUDGET.get(name, 60) * args.budget_scale
        args.spec_budget = budget
        left = args.deadline - time.time()
        if left < min(0.5 * budget, 30):
            for path in ("eager", "ts", "compile"):
                write({"spec": name, "path": path, "ok": None, "skipped": f"total budget: {left:.0f} s left"})
            log(f"@@SKIP {name} ({left:.0f} s left)")
            continue
        log(f"@@BEGIN {name}")
        spec_t0 = time.perf_counter()
        cleanup_s[0] = 0.0
        try:
            spec = SPECS.get(name, big)
        except Exception as e:
            write({"spec": name, "path": "build", "ok": False, **err_info(e)})
            e = None
            log(f"@@END {name}")
            continue
        holder_ref = {}

        def eager_wrapped(holder, name, spec):
            r = eager_path(holder, name, spec)
            holder_ref["ref"] = holder.get("ref")
            return r
        rec = run_path(name, "eager", eager_wrapped, name, spec)
        write(rec)
        log(f"[{name}] eager {brief(rec)}")
        ref = holder_ref.get("ref")
        rec = run_path(name, "ts", ts_path, name, spec, ref)
        write(rec)
        log(f"[{name}] ts {brief(rec)}")
        rec = run_path(name, "compile", compile_path, name, spec, ref, spec_t0)
        write(rec)
        log(f"[{name}] compile {brief(rec)}")
        del ref, holder_ref
        cleanup()
        gc.freeze()  # what survives a spec is long-lived (modules, caches): keep later collections fast
        log(f"@@END {name} {time.perf_counter() - spec_t0:.1f}s (gc {cleanup_s[0]:.1f}s)")


# --------------------------------------------------------------------------- parent

def select(only):
    if not only:
        return list(SPECS.NAMES)
    names = []
    for pat in only:
        hits = [n for n in SPECS.NAMES if fnmatch.fnmatch(n, pat)]
        if not hits:
            sys.exit(f"no spec matches {pat!r}; specs: {', '.join(SPECS.NAMES)}")
        names += [n for n in hits if n not in names]
    return names


def parent(args):
    t_start = time.time()
    deadline = t_start + args.total_budget
    out = args.out
    os.makedirs(out, exist_ok=True)
    results = os.path.join(out, "gpu_results.jsonl")
    open(results, "w").close()
    logf = open(os.path.join(out, "gpu_log.txt"), "w")

    def say(line):
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()

    def write(rec):
        with open(results, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def paths_written(name):
        done = set()
        with open(results) as f:
            for line in f:
                r = json.loads(line)
                if r.get("spec") == name:
                    done.add(r.get("path"))
        return done

    names = select(args.only)
    say(f"[run_all] device {args.device}, {len(names)} specs, total budget {args.total_budget:.0f} s, out {out}")
    remaining = list(names)
    while remaining:
        if time.time() > deadline - 5:
            break
        cmd = [sys.executable, "-u", os.path.abspath(__file__), "--worker", "--device", args.device, "--names",
               ",".join(remaining), "--out", out, "--deadline", str(deadline), "--budget-scale", str(args.budget_scale),
               "--size", args.size]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                start_new_session=True)
        q = queue.Queue()

        def reader(p=proc, q=q):
            for line in p.stdout:
                q.put(line.rstrip("\n"))
            q.put(None)
        threading.Thread(target=reader, daemon=True).start()
        current, spec_deadline, finished, killed = None, None, False, None
        while not finished:
            try:
                line = q.get(timeout=0.5)
            except queue.Empty:
                line = ""
            if line is None:
                finished = True
            elif line:
                say(line)
                if line.startswith("@@BEGIN "):
                    current = line.split()[1]
                    b = SPECS.BUDGET.get(current, 60) * args.budget_scale
                    spec_deadline = min(time.time() + b, deadline)
                elif line.startswith("@@END ") or line.startswith("@@SKIP "):
                    n = line.split()[1]
                    if n in remaining:
                        remaining.remove(n)
                    current = None
            now = time.time()
            if not finished and (now > deadline or (current and now > spec_deadline)):
                killed = "total budget" if now > deadline else "spec budget"
                os.killpg(proc.pid, signal.SIGKILL)  # the worker's own process group, started above
                proc.wait()
                while q.get() is not None:
                    pass
                finished = True
        rc = proc.wait()
        if current:
            why = (f"timeout ({killed}, {SPECS.BUDGET.get(current, 60) * args.budget_scale:.0f} s spec budget)"
                   if killed else f"worker died (exit code {rc})")
            for path in ("eager", "ts", "compile"):
                if path not in paths_written(current):
                    write({"spec": current, "path": path, "ok": False, "error_type": "Timeout" if killed else "Crash",
                           "error": why})
            say(f"@@END {current} ({why})")
            remaining.remove(current)
        elif rc != 0 and not killed and remaining:
            say(f"[run_all] worker exited with {rc} outside a spec; stopping")
            break
    for n in remaining:
        for path in ("eager", "ts", "compile"):
            if path not in paths_written(n):
                write({"spec": n, "path": path, "ok": None, "skipped": "total budget ran out"})
    say(table(results, names))
    say(f"[run_all] done in {time.time() - t_start:.0f} s; results {results}")
    logf.close()


def table(results, names):
    def gib(b):
        return f"{b / 2**30:.3f}" if isinstance(b, (int, float)) else "-"

    def f(x, fmt):
        return format(x, fmt) if isinstance(x, (int, float)) else "-"
    rows = [json.loads(l) for l in open(results)]
    order = {n: i for i, n in enumerate(names)}
    rows.sort(key=lambda r: (order.get(r["spec"], 999), ["eager", "build", "ts", "compile"].index(r["path"])
                             if r["path"] in ("eager", "build", "ts", "compile") else 9))
    hdr = f"{'spec':<26} {'path':<7} {'ok':<4} {'peak err%':>9} {'it err%':>8} {'param diff':>10} {'noise':>8} {'t s':>6}  error/notes"
    lines = ["", hdr, "-" * len(hdr)]
    for r in rows:
        ok = "skip" if r.get("skipped") else ("ok" if r.get("ok") else "FAIL")
        err = r.get("skipped") or ""
        if r.get("error_type"):
            err = f"{r['error_type']}: {r.get('error', '')}".replace("\n", " ")[:110]
            if r.get("mutwo_frame"):
                err += f" @{r['mutwo_frame']}"
        elif r.get("aot_baseline"):
            err = "aot " + r["aot_baseline"][:100]
        if r["path"] == "eager":
            if r.get("ok") and not r.get("skipped"):
                err = (f"peak {gib(r.get('eager_peak_bytes'))} GiB, step {f(r.get('eager_step_ms'), '.1f')} ms, "
                       f"kernels {f(r.get('eager_kernel_ms'), '.2f')} ms, opt {f(r.get('eager_opt_kernel_ms'), '.3f')} ms")
            lines.append(f"{r['spec']:<26} {'eager':<7} {ok:<4} {'':>9} {'':>8} {'':>10} "
                         f"{f(r.get('eager_rerun_param_max_diff'), '.1e'):>8} {f(r.get('path_wall_s'), '.1f'):>6}  {err}")
            continue
        if r["path"] == "ts" and r.get("ok") and r.get("optimizer_region_ms") is not None and not err:
            err = (f"opt region {f(r['optimizer_region_ms'], '.3f')} ms vs eager {f(r.get('eager_opt_kernel_ms'), '.3f')} ms"
                   f" ({f(r.get('opt_err_pct'), '+.1f')}%), peak in {r.get('peak_region')}")
        if r["path"] == "compile" and r.get("ok") and not err:
            err = f"graphs {r.get('graphs')}, vs eager peak {f(r.get('peak_vs_eager_pct'), '+.2f')}%"
            if r.get("notes"):
                err += f", {len(r['notes'])} notes"
        lines.append(f"{r['spec']:<26} {r['path']:<7} {ok:<4} {f(r.get('peak_err_pct'), '+.2f'):>9} "
                     f"{f(r.get('iter_err_pct'), '+.1f'):>8} {f(r.get('param_max_diff'), '.1e'):>10} "
                     f"{f(r.get('eager_rerun_param_max_diff'), '.1e'):>8} {f(r.get('time_to_report_s'), '.1f'):>6}  {err}")
    lines.append("peak err%: ts = measured vs eager max_memory_allocated; compile = measured vs aot_eager_default_partitioner."
                 " it err%: iteration_time_ms vs eager GPU kernel sum (compile: fwd+bwd only)."
                 " noise: param diff between two eager runs.")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--only", nargs="+", metavar="NAME", help="spec names or glob patterns (default: all)")
    p.add_argument("--total-budget", type=float, default=390.0, help="seconds for the whole run (default 390)")
    p.add_argument("--budget-scale", type=float, default=1.0, help="multiply every spec's budget")
    p.add_argument("--size", default="auto", choices=["auto", "big", "small"], help="auto: big on cuda, small on cpu")
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(HERE, "out"))
    p.add_argument("--list", action="store_true", help="print the specs in run order with their budgets")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--names", help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.list:
        for n, b in SPECS.ORDER:
            print(f"{n:<28} {b:>4} s")
        return
    if args.worker:
        worker(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
