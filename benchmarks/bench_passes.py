"""Time of each analysis pass on whole train-step graphs (issue 3).

Captures ResNet-152 and BERT-base train steps on the CPU (batch 1, BERT at
sequence length 128), then times each pass and prints a line per pass with
node counts, and the total.

    python benchmarks/bench_passes.py
"""

import argparse
import time

import torch

from mutwo_backend import capture_train_step
from mutwo_backend.models import get_model, zoo_train_step
from passes.boundary import find_boundary
from passes.kinds import classify
from passes.liveness import activation_liveness
from passes.memory import rounded, simulate_memory
from passes.pipeline import run_pipeline
from passes.recompute import recompute_subgraphs
from passes.storage import map_storages


def timed(label, fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, label, (time.perf_counter() - start) * 1e3


def bench(name: str, batch: int, seq_len: int) -> None:
    spec = get_model(name)
    model = spec.build()
    optimizer = torch.optim.Adam(model.parameters(), fused=True)
    inputs, targets = spec.make_batch(batch, seq_len, torch.device("cpu"))
    step = capture_train_step(zoo_train_step(spec), model, optimizer, inputs, targets)
    nodes = tuple(step.gm.graph.nodes)
    rank = {n: i for i, n in enumerate(nodes)}
    rows = []
    boundary, *row = timed("boundary", find_boundary, nodes)
    rows.append(row)
    storages, *row = timed("storages", map_storages, nodes)
    rows.append(row)
    kinds, *row = timed("node kinds", classify, nodes, boundary, storages, step.hints)
    rows.append(row)
    size = lambda key: rounded(storages.nbytes[key], False)  # noqa: E731
    acts, *row = timed("liveness", activation_liveness, nodes, rank, boundary, kinds.kinds, storages, size)
    rows.append(row)
    _, *row = timed("recompute", recompute_subgraphs, nodes, acts, kinds.kinds, boundary.regions, rank)
    rows.append(row)
    _, *row = timed("memory simulation", simulate_memory, nodes, rank, kinds.kinds, storages)
    rows.append(row)
    _, label, total_ms = timed("run_pipeline", run_pipeline, step.gm, step.hints)
    print(f"{name} batch {batch}: {len(nodes)} nodes, {len(acts)} activations, "
          f"{len(storages.nbytes)} storages")
    for label, ms in rows:
        print(f"  {label:<18} {ms:8.1f} ms")
    print(f"  {'run_pipeline total':<18} {total_ms:8.1f} ms (goal for ResNet-152: at most 1500 ms)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args()
    bench("resnet152", 1, 0)
    bench("bert", 1, 128)


if __name__ == "__main__":
    main()
