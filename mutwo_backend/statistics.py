"""Per-iteration records and their median / min / max per node."""

from dataclasses import dataclass

import numpy as np
from tabulate import tabulate

from .interpreter import IterationRecord


@dataclass(frozen=True)
class NodeStatistics:
    """Median, min and max over the measured iterations, per node in graph order."""

    run_time_ms: np.ndarray
    run_time_min_ms: np.ndarray
    run_time_max_ms: np.ndarray
    iteration_ms: float  # median of the per-iteration sums of node times
    wall_ms: float  # median wall time of an instrumented iteration
    iterations: int
    allocated_after_bytes: np.ndarray | None
    peak_bytes: np.ndarray | None
    outside_peak_bytes: dict[str, float]  # allocator peaks outside the graphs (compile capture)
    swap_out_measured_ms: dict[str, float]
    swap_in_measured_ms: dict[str, float]


class Statistics:
    """Collects IterationRecords; warm-up records are dropped with reset().
    Allocator readings (None where an iteration did not read them) are the
    median over the records that hold them."""

    def __init__(self):
        self.records: list[IterationRecord] = []

    def add(self, record: IterationRecord) -> None:
        self.records.append(record)

    def reset(self) -> None:
        self.records.clear()

    def has_memory(self) -> bool:
        """Whether a record holds allocator readings."""
        return any(r.peak_bytes is not None for r in self.records)

    def aggregate(self) -> NodeStatistics:
        if not self.records:
            raise ValueError("no measured iteration to aggregate: run at least one after reset")
        times = np.stack([r.run_time_ms for r in self.records])

        def median_of(attribute):
            arrays = [getattr(r, attribute) for r in self.records if getattr(r, attribute) is not None]
            return np.median(np.stack(arrays), axis=0) if arrays else None

        def median_by_name(attribute):
            names = set().union(*(getattr(r, attribute) for r in self.records))
            return {name: float(np.median([getattr(r, attribute)[name] for r in self.records
                                           if name in getattr(r, attribute)])) for name in names}

        return NodeStatistics(
            run_time_ms=np.median(times, axis=0), run_time_min_ms=times.min(axis=0),
            run_time_max_ms=times.max(axis=0),
            iteration_ms=float(np.median(times.sum(axis=1))),
            wall_ms=float(np.median([r.wall_ms for r in self.records])),
            iterations=len(self.records),
            allocated_after_bytes=median_of("allocated_after_bytes"),
            peak_bytes=median_of("peak_bytes"),
            outside_peak_bytes=median_by_name("outside_peak_bytes"),
            swap_out_measured_ms=median_by_name("swap_out_measured_ms"),
            swap_in_measured_ms=median_by_name("swap_in_measured_ms"))


def format_statistics(names: list[str], stats: NodeStatistics, top: int = 20) -> str:
    """The slowest nodes with median, min and max, and the iteration totals."""
    order = np.argsort(-stats.run_time_ms)[:top]
    rows = [(names[i], f"{stats.run_time_ms[i]:.3f}", f"{stats.run_time_min_ms[i]:.3f}",
             f"{stats.run_time_max_ms[i]:.3f}") for i in order]
    table = tabulate(rows, headers=["node", "median ms", "min ms", "max ms"], tablefmt="simple")
    return (f"{stats.iterations} measured iterations; sum of node medians "
            f"{stats.iteration_ms:.2f} ms, instrumented wall time {stats.wall_ms:.2f} ms\n{table}")
