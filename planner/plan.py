"""A plan: keep, recompute or swap, per activation, with what it predicts
(schema "mutwo.plan/1"), saved and loaded as JSON, printed as a table."""

import json
from dataclasses import asdict, dataclass

from tabulate import tabulate

from .errors import PlanningError

PLAN_SCHEMA = "mutwo.plan/1"
ACTIONS = ("keep", "recompute", "swap")


@dataclass(frozen=True)
class Decision:
    """One activation's fate. ``recompute_nodes``: the report's node names
    replayed, in order, to rebuild it; ``swap_out_after`` / ``prefetch_at``:
    the node after which its copy out starts, and the node at which its
    copy back starts; ``swap_free_at``: the node before which its device
    storage is released (where the copy out is expected to have ended). ``recompute_ms`` / ``exposed_ms`` are counted on the
    activation that holds its storage's bytes (0 on views of it)."""

    activation: str
    memory_bytes: int
    action: str
    recompute_nodes: list
    swap_out_after: str | None
    prefetch_at: str | None
    recompute_ms: float
    exposed_ms: float
    swap_free_at: str | None = None


@dataclass(frozen=True)
class Plan:
    """What a solver decided for one graph and what it predicts: the peak
    as ``max_memory_allocated`` would see it, and the step's time as the
    GPU's kernel time plus recompute and exposed swap time."""

    budget_bytes: int
    baseline_peak_bytes: int
    predicted_peak_bytes: int
    baseline_iteration_ms: float
    predicted_iteration_ms: float
    decisions: list[Decision]
    graph_fingerprint: str
    solver: str
    notes: list

    def to_dict(self) -> dict:
        return {"schema": PLAN_SCHEMA, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        if data.get("schema") != PLAN_SCHEMA:
            raise PlanningError(f"not a plan: schema is {data.get('schema')!r}, not {PLAN_SCHEMA!r}")
        fields = {k: v for k, v in data.items() if k != "schema"}
        fields["decisions"] = [Decision(**d) for d in fields["decisions"]]
        return cls(**fields)

    def save(self, path: str) -> str:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
        return path

    @classmethod
    def load(cls, path: str) -> "Plan":
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def count(self, action: str) -> int:
        return sum(d.action == action for d in self.decisions)

    def saved_bytes(self, action: str) -> int:
        return sum(d.memory_bytes for d in self.decisions if d.action == action)

    def format(self, top: int = 15) -> str:
        """What was decided, what it saves and what it costs, largest first."""
        rows = [("budget", size_text(self.budget_bytes)),
                ("peak", f"{size_text(self.baseline_peak_bytes)} -> {size_text(self.predicted_peak_bytes)} (predicted)"),
                ("iteration time", f"{self.baseline_iteration_ms:.2f} ms -> {self.predicted_iteration_ms:.2f} ms "
                                   f"(predicted, +{self._overhead_percent():.1f}%)"),
                ("solver", self.solver)]
        rows += [(f"{action}", f"{self.count(action)} activations, {size_text(self.saved_bytes(action))}")
                 for action in ACTIONS]
        dropped = sorted((d for d in self.decisions if d.action != "keep"), key=lambda d: -d.memory_bytes)
        table = tabulate([(d.activation, d.action, size_text(d.memory_bytes), f"{d.recompute_ms:.3f}",
                           f"{d.exposed_ms:.3f}", len(d.recompute_nodes) or "-",
                           d.swap_out_after or "-", d.swap_free_at or "-", d.prefetch_at or "-")
                          for d in dropped[:top]],
                         headers=[f"top {min(top, len(dropped))} of {len(dropped)} dropped activations",
                                  "action", "size", "recompute (ms)", "exposed swap (ms)", "replayed nodes",
                                  "swap out after", "freed at", "prefetch at"],
                         tablefmt="simple", disable_numparse=True)
        parts = [tabulate(rows, tablefmt="simple", disable_numparse=True)]
        parts += [f"note: {note}" for note in self.notes]
        return "\n".join(parts + ["", table])

    def print(self, top: int = 15) -> None:
        print(self.format(top))

    def _overhead_percent(self) -> float:
        return 100 * (self.predicted_iteration_ms / self.baseline_iteration_ms - 1) if self.baseline_iteration_ms else 0.0


def size_text(nbytes: float) -> str:
    """Bytes in B/KiB/MiB/GiB, as the report's tables show them."""
    from mutwo_backend.report import format_bytes  # (here: mutwo_backend imports the planner)
    return format_bytes(nbytes)
