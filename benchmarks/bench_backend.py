"""The compile backend in an ordinary training loop against eager (issue 5).

Measures, on one device: the eager loop's max_memory_allocated and median
iteration time, then the same loop under torch.compile(backend=
"mutwo_profile") (warm-up 1, 3 measured iterations, after="run"): the
report's measured peak, and the median iteration time once measurement is
over. Prints both ratios and writes JSON.

    python benchmarks/bench_backend.py --model resnet152 --batch-size 64 --out DIR
"""

import argparse
import json
import os
import time

import numpy as np
import torch

import mutwo_backend
from mutwo_backend.models import get_model


def loop_ms(model, spec, optimizer, inputs, targets, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss = spec.loss(spec.forward(model, inputs), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet152", help="zoo model (default: resnet152)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="timed iterations after measurement")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("bench_backend.py needs a CUDA GPU")
    spec = get_model(args.model)
    device = torch.device("cuda")
    inputs, targets = spec.make_batch(args.batch_size, spec.default_seq_len, device)

    torch.manual_seed(0)
    model = spec.build().to(device)
    optimizer = torch.optim.Adam(model.parameters(), fused=True)
    loop_ms(model, spec, optimizer, inputs, targets, 2)
    torch.cuda.reset_peak_memory_stats()
    eager_ms = loop_ms(model, spec, optimizer, inputs, targets, args.steps)
    eager_peak = torch.cuda.max_memory_allocated()
    del model, optimizer
    torch.cuda.empty_cache()

    torch.manual_seed(0)
    model = spec.build().to(device)
    optimizer = torch.optim.Adam(model.parameters(), fused=True)
    compiled = torch.compile(model, backend="mutwo_profile",
                             options={"warmup": 1, "iters": 3, "optimizer": optimizer, "after": "run"})
    start = time.perf_counter()
    loop_ms(compiled, spec, optimizer, inputs, targets, 4)
    to_report_s = time.perf_counter() - start
    report = mutwo_backend.get_report(compiled).to_dict()
    loop_ms(compiled, spec, optimizer, inputs, targets, 2)
    compiled_ms = loop_ms(compiled, spec, optimizer, inputs, targets, args.steps)

    result = {
        "model": args.model, "batch_size": args.batch_size, "device_name": torch.cuda.get_device_name(),
        "torch_version": torch.__version__, "eager_peak_bytes": eager_peak,
        "report_measured_peak_bytes": report["memory"]["measured_peak_bytes"],
        "report_simulated_peak_bytes": report["memory"]["peak_bytes"],
        "eager_iteration_ms": float(np.median(eager_ms)),
        "after_run_iteration_ms": float(np.median(compiled_ms)),
        "compile_to_report_s": to_report_s,
    }
    peak_error = (result["report_measured_peak_bytes"] - eager_peak) / eager_peak
    slowdown = result["after_run_iteration_ms"] / result["eager_iteration_ms"]
    result["goals"] = {"peak_within_1pct": abs(peak_error) <= 0.01, "after_run_within_1.5x": slowdown <= 1.5}
    print(f"{args.model} batch {args.batch_size} on {result['device_name']} (torch {result['torch_version']})")
    print(f"  eager peak {eager_peak / 2**30:.3f} GiB, report's measured peak "
          f"{result['report_measured_peak_bytes'] / 2**30:.3f} GiB ({100 * peak_error:+.2f}%, goal within 1%)")
    print(f"  eager {result['eager_iteration_ms']:.1f} ms/iteration, after measurement "
          f"{result['after_run_iteration_ms']:.1f} ms ({slowdown:.2f}x, goal at most 1.5x)")
    print(f"SUMMARY: {sum(result['goals'].values())}/2 goals met")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"bench_backend_{args.model}.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
