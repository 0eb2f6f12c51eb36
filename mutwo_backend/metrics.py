"""μ-TWO's derived metrics per activation, from the static analysis, the
median node times and the swap cost model."""

from dataclasses import asdict, dataclass

import numpy as np

from passes import GraphAnalysis

from .swap import SwapModel


@dataclass(frozen=True)
class ActivationMetrics:
    """One activation's costs and liveness; field names are the report's."""

    name: str
    memory_bytes: int
    creation_rank: int
    last_fw_rank: int
    first_bw_rank: int
    last_bw_rank: int
    inactive_time_ms: float  # nodes strictly between last forward and first backward access
    swap_out_ms: float  # from the swap model
    swap_in_ms: float
    swap_out_measured_ms: float | None  # real copies, swap="measure" only
    swap_in_measured_ms: float | None
    swap_hidden: bool  # swap out + in fit inside the inactive time
    recompute_srcs: list[str]
    recompute_nodes: list[str]
    recompute_time_ms: float
    recompute_peak_bytes: int  # most extra memory alive while recomputing it
    recompute_ratio: float | None  # memory_bytes / recompute_time_ms, bytes per ms
    recomputable: bool
    recompute_reason: str | None

    def to_dict(self) -> dict:
        return asdict(self)


def activation_metrics(analysis: GraphAnalysis, run_time_ms: np.ndarray, swap: SwapModel,
                       swap_out_measured_ms: dict[str, float] | None = None,
                       swap_in_measured_ms: dict[str, float] | None = None) -> list[ActivationMetrics]:
    """``run_time_ms`` holds the median time of each node, indexed by rank."""
    before = np.concatenate([[0.0], np.cumsum(run_time_ms)])  # before[r] = time of ranks < r
    measured_out, measured_in = swap_out_measured_ms or {}, swap_in_measured_ms or {}
    metrics = []
    for node, info in sorted(analysis.activations.items(), key=lambda item: item[1].creation_rank):
        recompute = analysis.recompute[node]
        inactive_ms = float(before[info.first_bw_rank] - before[info.last_fw_rank + 1])
        out_ms, in_ms = swap.swap_out_ms(info.memory_bytes), swap.swap_in_ms(info.memory_bytes)
        recompute_ms = float(sum(run_time_ms[analysis.rank[n]] for n in recompute.nodes))
        metrics.append(ActivationMetrics(
            name=node.name, memory_bytes=info.memory_bytes, creation_rank=info.creation_rank,
            last_fw_rank=info.last_fw_rank, first_bw_rank=info.first_bw_rank,
            last_bw_rank=info.last_bw_rank, inactive_time_ms=inactive_ms,
            swap_out_ms=out_ms, swap_in_ms=in_ms,
            swap_out_measured_ms=measured_out.get(node.name),
            swap_in_measured_ms=measured_in.get(node.name),
            swap_hidden=bool(out_ms + in_ms <= inactive_ms),
            recompute_srcs=[n.name for n in recompute.srcs],
            recompute_nodes=[n.name for n in recompute.nodes],
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
