"""μ-TWO's derived metrics per activation, from the static analysis, the
median node times and the swap cost model."""

from typing import Callable, Mapping

import numpy as np
from torch import fx

from passes import GraphAnalysis

from .records import ActivationRecord
from .swap import SwapModel


def activation_records(analysis: GraphAnalysis, run_time_ms: np.ndarray, swap: SwapModel,
                       storage_ids: Mapping[int, int], label: Callable[[fx.Node], tuple[str | None, str | None]],
                       swap_out_measured_ms: dict[str, float] | None = None,
                       swap_in_measured_ms: dict[str, float] | None = None) -> list[ActivationRecord]:
    """``run_time_ms`` holds the median time of each node, indexed by rank;
    ``storage_ids`` maps StorageMap keys to the report's storage ids;
    ``label(node)`` gives a node's (module, source)."""
    before = np.concatenate([[0.0], np.cumsum(run_time_ms)])  # before[r] = time of ranks < r
    measured_out, measured_in = swap_out_measured_ms or {}, swap_in_measured_ms or {}
    metrics = []
    for node, info in sorted(analysis.activations.items(), key=lambda item: item[1].creation_rank):
        recompute = analysis.recompute[node]
        inactive_ms = float(before[info.first_bw_rank] - before[info.last_fw_rank + 1])
        out_ms, in_ms = swap.swap_out_ms(info.memory_bytes), swap.swap_in_ms(info.memory_bytes)
        recompute_ms = float(sum(run_time_ms[analysis.rank[n]] for n in recompute.nodes))
        module, source = label(node)
        metrics.append(ActivationRecord(
            name=node.name, module=module, source=source,
            storage=storage_ids[analysis.storages.refs[node][0]],
            base=info.base.name if info.base is not None else None,
            memory_bytes=info.memory_bytes, creation_rank=info.creation_rank,
            last_fw_rank=info.last_fw_rank, first_bw_rank=info.first_bw_rank,
            last_bw_rank=info.last_bw_rank, inactive_time_ms=inactive_ms,
            swap_out_ms=out_ms, swap_in_ms=in_ms,
            swap_out_measured_ms=measured_out.get(node.name),
            swap_in_measured_ms=measured_in.get(node.name),
            swap_hidden=bool(out_ms + in_ms <= inactive_ms),
            recompute_srcs=[n.name for n in recompute.srcs],
            recompute_nodes=[n.name for n in recompute.nodes],
            recompute_replays_sep=recompute.replays_sep,
            recompute_time_ms=recompute_ms,
            recompute_peak_bytes=recompute_peak_bytes(recompute.nodes, node, analysis.output_bytes),
            recompute_ratio=info.memory_bytes / recompute_ms if recompute_ms > 0 else None,
            recomputable=recompute.recomputable, recompute_reason=recompute.reason))
    return metrics


def recompute_peak_bytes(nodes, target, output_bytes) -> int:
    """Most bytes alive at once while running ``nodes`` in order: each output
    lives until its last reader inside the subgraph; ``target`` (the
    recomputed activation) stays."""
    inside = set(nodes)
    last_reader = {}
    for n in nodes:
        for source in n.all_input_nodes:
            if source in inside:
                last_reader[source] = n
    alive = peak = 0
    for n in nodes:
        alive += output_bytes.get(n, 0)
        peak = max(peak, alive)
        if n not in last_reader and n is not target:  # read by nothing inside: freed at once
            alive -= output_bytes.get(n, 0)
        for source in n.all_input_nodes:
            if last_reader.get(source) is n and source is not target:
                alive -= output_bytes.get(source, 0)
    return int(peak)
