"""The report: plain records in the "mutwo.report/1" schema (DESIGN.md), with
printing and saving. It knows only records, not graphs or tensors.

``Report.save(dir)`` writes ``report.json`` (exact numbers: bytes and ms),
``nodes.csv``, ``activations.csv``, ``trace.json`` (Chrome trace events, for
Perfetto) and, when matplotlib is installed, ``memory_breakdown.png`` and
``memory_timeline.png``. Tables printed by ``Report.print()`` show sizes in
KiB/MiB/GiB; files keep exact bytes."""

import contextlib
import csv
import json
import logging
import os

from tabulate import tabulate

SCHEMA = "mutwo.report/1"
KINDS = ("PARAM", "BUFFER", "OPT_STATE", "GRAD", "ACT", "INPUT", "OTHER")
REGIONS = ("forward", "loss", "backward", "optimizer")

# Every field of the schema and its JSON type(s); "graphs" (compile capture
# with several dynamo graphs) and extra meta fields may come on top.
_NUM, _INT, _STR = (int, float), int, str
_OPT_NUM, _OPT_INT = (int, float, type(None)), (int, type(None))
SCHEMA_FIELDS = {
    "meta": {"model": (str, type(None)), "capture": _STR, "warmup": _INT, "iters": _INT,
             "device": _STR, "device_name": _STR, "torch_version": _STR, "timer": _STR,
             "iteration_time_ms": _NUM, "instrumented_wall_ms": _NUM, "swap": _STR,
             "swap_model": dict, "notes": list},
    "nodes": {"name": _STR, "rank": _INT, "op": _STR, "target": _STR, "region": _STR, "kind": _STR,
              "run_time_ms": _NUM, "run_time_min_ms": _NUM, "run_time_max_ms": _NUM,
              "peak_bytes": _INT, "active_bytes": _INT, "output_bytes": _INT,
              "simulated_live_bytes": _INT},
    "activations": {"name": _STR, "memory_bytes": _INT, "creation_rank": _INT, "last_fw_rank": _INT,
                    "first_bw_rank": _INT, "last_bw_rank": _INT, "inactive_time_ms": _NUM,
                    "swap_out_ms": _NUM, "swap_in_ms": _NUM, "swap_out_measured_ms": _OPT_NUM,
                    "swap_in_measured_ms": _OPT_NUM, "swap_hidden": bool, "recompute_srcs": list,
                    "recompute_nodes": list, "recompute_time_ms": _NUM, "recompute_peak_bytes": _INT,
                    "recompute_ratio": _OPT_NUM, "recomputable": bool},
    "memory": {"peak_bytes": _INT, "peak_rank": _INT, "breakdown_at_peak": dict, "timeline": dict,
               "measured_peak_bytes": _OPT_INT, "measured_graph_peak_bytes": _OPT_INT,
               "outside_graphs_peak_bytes": (dict, type(None)),
               "measured_allocated_after_bytes": (list, type(None))},
}

PLOT_HINT = "matplotlib is not installed: pip install 'mutwo[plot]' gets the plots"
log = logging.getLogger("mutwo")


def format_bytes(nbytes: float | None) -> str:
    """Human-readable size (B, KiB, MiB, GiB); "-" for None."""
    if nbytes is None:
        return "-"
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(nbytes) >= size:
            return f"{nbytes / size:.2f} {unit}"
    return f"{int(nbytes)} B"


def format_ms(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def validate(data: dict) -> list[str]:
    """Problems of ``data`` against the "mutwo.report/1" schema (empty: valid)."""
    problems = []
    if data.get("schema") != SCHEMA:
        problems.append(f"schema is {data.get('schema')!r}, not {SCHEMA!r}")
    for section, fields in SCHEMA_FIELDS.items():
        value = data.get(section)
        records = value if isinstance(value, list) else [value]
        if not isinstance(value, list if section in ("nodes", "activations") else dict):
            problems.append(f"{section} is missing or not a {'list' if section in ('nodes', 'activations') else 'dict'}")
            continue
        for index, record in enumerate(records):
            where = f"{section}[{index}]" if isinstance(value, list) else section
            for name, types in fields.items():
                if name not in record:
                    problems.append(f"{where} lacks {name}")
                elif not isinstance(record[name], types) or (types in (_INT, _NUM) and isinstance(record[name], bool)):
                    problems.append(f"{where}.{name} is {type(record[name]).__name__}")
    return problems


def memory_graph(data: dict) -> dict:
    """The report whose nodes the top-level ``memory`` timeline is indexed by:
    the report itself, or for a compile capture with several graphs, the one
    meta["memory_graph"] names (the graph with the highest simulated peak)."""
    graphs = data.get("graphs")
    if not graphs:
        return data
    return graphs[data["meta"]["memory_graph"]]


class Report:
    """A profile of one training iteration (or of several graphs of one)."""

    def __init__(self, data: dict):
        if data.get("schema") != SCHEMA:
            raise ValueError(f"not a {SCHEMA} report")
        self.data = data

    @classmethod
    def load(cls, path: str) -> "Report":
        """Read a report.json (or a directory holding one)."""
        if os.path.isdir(path):
            path = os.path.join(path, "report.json")
        with open(path) as f:
            return cls(json.load(f))

    def to_dict(self) -> dict:
        return self.data

    def add_meta(self, **fields) -> "Report":
        """Record facts the caller knows and the profiler does not (batch size,
        sequence length, optimizer...); returns self."""
        self.data["meta"].update(fields)
        return self

    # --- tables --------------------------------------------------------------

    def summary_rows(self) -> list[tuple[str, str]]:
        meta, memory = self.data["meta"], self.data["memory"]
        rows = [("model", meta.get("model") or "-")]
        for key, label in (("batch_size", "batch size"), ("seq_len", "sequence length"),
                           ("optimizer", "optimizer")):
            if meta.get(key) is not None:
                rows.append((label, str(meta[key])))
        capture = meta.get("capture", "-") + (f" ({meta['capture_method']})" if meta.get("capture_method") else "")
        rows += [("capture", capture),
                 ("device", meta["device_name"]), ("torch", meta["torch_version"]),
                 ("timer", meta["timer"]),
                 ("iterations", _iterations(meta)),
                 ("iteration time (sum of node medians)", f"{meta['iteration_time_ms']:.2f} ms"),
                 ("instrumented wall time per iteration", f"{meta.get('instrumented_wall_ms', 0):.2f} ms"),
                 ("nodes", str(len(self.data["nodes"]))),
                 ("activations", f"{len(self.data['activations'])}, "
                                 f"{format_bytes(sum(a['memory_bytes'] for a in self.data['activations']))}"),
                 ("simulated peak memory", format_bytes(memory["peak_bytes"])),
                 ("measured peak memory", format_bytes(memory["measured_peak_bytes"]))]
        total = memory["peak_bytes"] or 1
        breakdown = memory["breakdown_at_peak"]
        rows += [(f"  {kind} at peak", f"{format_bytes(breakdown[kind])} ({100 * breakdown[kind] / total:.1f}%)")
                 for kind in _ordered(breakdown, KINDS)]
        return rows

    def top_nodes_table(self, top: int = 15) -> str:
        nodes = sorted(self.data["nodes"], key=lambda n: -n["run_time_ms"])[:top]
        total = self.data["meta"]["iteration_time_ms"] or 1.0
        graph = "graph" in (nodes[0] if nodes else {})
        rows = [((n["graph"],) if graph else ()) +
                (n["name"], n["target"], n["region"], n["kind"], format_ms(n["run_time_ms"]),
                 f"{100 * n['run_time_ms'] / total:.1f}%", format_bytes(n["output_bytes"]))
                for n in nodes]
        headers = (["graph"] if graph else []) + [
            f"top {len(nodes)} nodes by time", "target", "region", "kind", "time (ms)", "share",
            "output size"]
        return tabulate(rows, headers=headers, tablefmt="simple", disable_numparse=True)

    def region_rows(self) -> list[dict]:
        total = self.data["meta"]["iteration_time_ms"] or 1.0
        regions = {}
        for n in self.data["nodes"]:
            entry = regions.setdefault(n["region"], {"region": n["region"], "nodes": 0, "time_ms": 0.0})
            entry["nodes"] += 1
            entry["time_ms"] += n["run_time_ms"]
        rows = [regions[r] for r in _ordered(regions, REGIONS)]
        for row in rows:
            row["share"] = row["time_ms"] / total
        return rows

    def regions_table(self) -> str:
        rows = [(r["region"], r["nodes"], format_ms(r["time_ms"], 2), f"{100 * r['share']:.1f}%")
                for r in self.region_rows()]
        return tabulate(rows, headers=["region", "nodes", "time (ms)", "share"], tablefmt="simple",
                        disable_numparse=True)

    def activations_table(self, top: int = 15) -> str:
        acts = sorted(self.data["activations"], key=lambda a: -a["memory_bytes"])[:top]
        rows = []
        for a in acts:
            ratio = a["recompute_ratio"]
            rows.append((a["name"], format_bytes(a["memory_bytes"]), a["creation_rank"], a["last_fw_rank"],
                         a["first_bw_rank"], a["last_bw_rank"], format_ms(a["inactive_time_ms"]),
                         format_ms(a["swap_out_ms"]), format_ms(a["swap_in_ms"]),
                         format_ms(a["recompute_time_ms"]),
                         "-" if ratio is None else f"{ratio / 2 ** 20:.3f}",
                         "yes" if a["recomputable"] else "no", "yes" if a["swap_hidden"] else "no"))
        headers = [f"top {len(acts)} activations by size", "size", "created", "last fw", "first bw",
                   "last bw", "inactive (ms)", "swap out (ms)", "swap in (ms)", "recompute (ms)",
                   "recompute ratio (MiB/ms)", "recomputable", "swap hidden"]
        return tabulate(rows, headers=headers, tablefmt="simple", disable_numparse=True)

    def format(self, top: int = 15) -> str:
        """Everything ``print()`` prints, as one string."""
        data = self.data
        parts = [tabulate(self.summary_rows(), tablefmt="simple", disable_numparse=True)]
        parts += [f"note: {note}" for note in data["meta"].get("notes", [])]
        parts += ["", self.regions_table(), "", self.top_nodes_table(top)]
        if data["activations"]:
            parts += ["", self.activations_table(top)]
            if len(data["activations"]) > top:
                parts.append(f"... and {len(data['activations']) - top} more activations "
                             "(all of them in activations.csv when saved)")
        else:
            parts += ["", "no activations (nothing of the forward pass is kept for the backward pass)"]
        return "\n".join(parts)

    def print(self, top: int = 15) -> None:
        print(self.format(top))

    # --- files -----------------------------------------------------------------

    def save(self, directory: str, plots: bool = True, trace: bool = True, plot_processes=None) -> str:
        """Write report.json, nodes.csv, activations.csv, trace.json and the
        two memory plots under ``directory``; returns report.json's path.

        The plots are drawn by child processes (plot_processes.py) while
        this one writes the other files: ``plot_processes``, started earlier,
        or new ones. Without matplotlib the plots are skipped and
        report.json's notes say how to get them."""
        from . import plots as plots_module
        from .plot_processes import PlotProcesses
        from .trace import write_trace

        os.makedirs(directory, exist_ok=True)
        data = self.data
        if plots and not plots_module.available():
            data = {**data, "meta": {**data["meta"], "notes": [*data["meta"].get("notes", []), PLOT_HINT]}}
            log.warning(PLOT_HINT)
            plots = False
        with contextlib.ExitStack() as stack:
            if plots:
                plot_processes = plot_processes or stack.enter_context(PlotProcesses())
                plot_processes.draw(data, directory)
            path = os.path.join(directory, "report.json")
            with open(path, "w") as f:
                f.write(json.dumps(data))  # one string, json's C encoder: 5x faster than json.dump(indent=)
            write_csv(os.path.join(directory, "nodes.csv"), data["nodes"])
            write_csv(os.path.join(directory, "activations.csv"), data["activations"])
            if trace:
                write_trace(data, os.path.join(directory, "trace.json"))
            if plots:
                plot_processes.wait()
        return path


def _iterations(meta: dict) -> str:
    warmup = f"{meta['warmup']} warm-up"
    if meta["warmup"] == 0 and meta.get("capture_method") == "recorded":
        warmup += " (the recorded capture's real step was one)"
    return f"{warmup}, {meta['iters']} measured"


def write_csv(path: str, records: list[dict]) -> None:
    """One row per record, the columns in the records' field order; lists are
    joined with spaces, None is an empty cell. Exact numbers."""
    columns = []
    for record in records:
        columns += [key for key in record if key not in columns]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for record in records:
            writer.writerow([_cell(record.get(key)) for key in columns])


def _cell(value):
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return value


def _ordered(present, order):
    """Keys of ``present`` in ``order``, unknown keys after them."""
    return [k for k in order if k in present] + [k for k in present if k not in order]
