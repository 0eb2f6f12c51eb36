"""Time of each analysis pass on whole train-step graphs captured on CPU:
ResNet-152 (batch 1 @224) and BERT-base (batch 2, sequence 128).

    .venv/bin/python benchmarks/bench_passes.py [--repeat N]

Prints one line per pass (best of N runs, with what the pass found) and the
total of run_pipeline. The issue's bound: ResNet-152's total at most 1.5 s on
a 2-core CPU."""

import argparse
import time
from collections import Counter

import torch

from mutwo_backend import capture_train_step
from mutwo_backend.models import get_model, zoo_train_step
from passes import NodeType, Region, run_pipeline

CASES = (("resnet152", 1, 0), ("bert", 2, 128))  # model, batch, sequence length


def found(analysis) -> dict[str, str]:
    """What each pass produced, in a few counts."""
    regions = Counter(analysis.regions.values())
    kinds = Counter(analysis.kinds.values())
    recomputable = sum(r.recomputable for r in analysis.recompute.values())
    return {
        "boundary": ", ".join(f"{r.value} {regions[r]}" for r in Region),
        "storages": f"{len(analysis.storages.nbytes)} storages",
        "kinds": ", ".join(f"{k.value} {kinds[k]}" for k in NodeType),
        "liveness": f"{len(analysis.activations)} activations, "
                    f"{sum(i.memory_bytes for i in analysis.activations.values()) / 2**20:.1f} MiB",
        "recompute": f"{recomputable} recomputable, "
                     f"{sum(len(r.nodes) for r in analysis.recompute.values())} subgraph nodes",
        "memory": f"peak {analysis.memory.peak_bytes / 2**20:.1f} MiB at rank {analysis.memory.peak_rank}",
    }


def bench(name: str, batch: int, seq_len: int, repeat: int) -> float:
    spec = get_model(name)
    model = spec.build()
    inputs, targets = spec.make_batch(batch, seq_len or spec.default_seq_len, torch.device("cpu"))
    start = time.perf_counter()
    step = capture_train_step(zoo_train_step(spec), model, torch.optim.Adam(model.parameters(), fused=True),
                              inputs, targets)
    capture_s = time.perf_counter() - start
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        analysis = run_pipeline(step.gm, step.hints)
        runs.append((time.perf_counter() - start, analysis))
    total_s, analysis = min(runs, key=lambda run: run[0])
    print(f"{name}: batch {batch}{f', sequence {seq_len}' if seq_len else ''}, {len(analysis.nodes)} nodes "
          f"(capture {capture_s:.1f} s), best of {repeat}")
    for pass_name, summary in found(analysis).items():
        print(f"  {pass_name:<10} {analysis.pass_seconds[pass_name] * 1e3:8.1f} ms  {summary}")
    print(f"  {'total':<10} {total_s * 1e3:8.1f} ms  run_pipeline")
    return total_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    for name, batch, seq_len in CASES:
        bench(name, batch, seq_len, args.repeat)


if __name__ == "__main__":
    main()
