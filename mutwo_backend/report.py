"""The report: plain records in the "mutwo.report/1" schema (DESIGN.md), with
printing and saving. It knows only records, not graphs or tensors."""

import json
import os

from tabulate import tabulate

SCHEMA = "mutwo.report/1"


def format_bytes(nbytes: float | None) -> str:
    if nbytes is None:
        return "-"
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(nbytes) >= size:
            return f"{nbytes / size:.2f} {unit}"
    return f"{int(nbytes)} B"


class Report:
    """A profile of one training iteration (or of several graphs of one)."""

    def __init__(self, data: dict):
        if data.get("schema") != SCHEMA:
            raise ValueError(f"not a {SCHEMA} report")
        self.data = data

    def to_dict(self) -> dict:
        return self.data

    def summary_rows(self) -> list[tuple[str, str]]:
        meta, memory = self.data["meta"], self.data["memory"]
        rows = [("model", meta.get("model") or "-"), ("device", meta["device_name"]),
                ("torch", meta["torch_version"]), ("timer", meta["timer"]),
                ("iterations", f"{meta['warmup']} warm-up, {meta['iters']} measured"),
                ("iteration time (sum of node medians)", f"{meta['iteration_time_ms']:.2f} ms"),
                ("simulated peak memory", format_bytes(memory["peak_bytes"])),
                ("measured peak memory", format_bytes(memory["measured_peak_bytes"]))]
        total = memory["peak_bytes"] or 1
        rows += [(f"  {kind} at peak", f"{format_bytes(nbytes)} ({100 * nbytes / total:.1f}%)")
                 for kind, nbytes in memory["breakdown_at_peak"].items()]
        return rows

    def print(self, top: int = 15) -> None:
        print(tabulate(self.summary_rows(), tablefmt="simple"))
        for note in self.data["meta"].get("notes", []):
            print(f"note: {note}")
        nodes = sorted(self.data["nodes"], key=lambda n: -n["run_time_ms"])[:top]
        total = self.data["meta"]["iteration_time_ms"] or 1.0
        print()
        print(tabulate([(n["name"], n["region"], n["kind"], f"{n['run_time_ms']:.3f}",
                         f"{100 * n['run_time_ms'] / total:.1f}%") for n in nodes],
                       headers=["slowest nodes", "region", "kind", "ms", "share"], tablefmt="simple"))

    def save(self, directory: str) -> str:
        """Write report.json under ``directory``; returns its path."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, "report.json")
        with open(path, "w") as f:
            json.dump(self.data, f, indent=1)
        return path
