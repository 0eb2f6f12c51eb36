"""The report: plain records in the "mutwo.report/2" schema (records.py),
with tables, printing and saving. It knows only records, not graphs or
tensors (and imports no torch: plot processes read it).

``Report.save(dir)`` writes ``report.json`` (exact numbers: bytes and ms),
``nodes.csv``, ``activations.csv``, ``modules.csv``, ``trace.json`` (Chrome
trace events, for Perfetto) and, when matplotlib is installed,
``memory_breakdown.png`` and ``memory_timeline.png``. Tables printed by
``Report.print()`` show sizes in KiB/MiB/GiB; files keep exact bytes."""

import contextlib
import csv
import json
import logging
import os
import tempfile

from tabulate import tabulate

from passes.enums import NodeType, Region
from passes.errors import MutwoError

from .records import LIST_SECTIONS, SCHEMA, SCHEMA_FIELDS, SCHEMA_V1, WORKLESS_OPS, ModuleRecord

# kinds in the order plots stack them: what lives all step at the bottom
KINDS = tuple(k.value for k in (NodeType.PARAM, NodeType.BUFFER, NodeType.OPT_STATE, NodeType.GRAD,
                                NodeType.ACT, NodeType.INPUT, NodeType.OTHER))
REGIONS = tuple(r.value for r in Region)
UNATTRIBUTED = "(unattributed)"

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
    """Problems of ``data`` against the "mutwo.report/2" schema (empty: valid)."""
    problems = [] if data.get("schema") == SCHEMA else [f"schema is {data.get('schema')!r}, not {SCHEMA!r}"]
    return problems + _field_problems(data)


def missing_fields(data: dict) -> list[str]:
    """The sections a report lacks, and ``section.field`` for every field of
    the schema that some record of a present section lacks (a report of an
    older schema)."""
    missing = []
    for section, fields in SCHEMA_FIELDS.items():
        value = data.get(section)
        if value is None:
            missing.append(section)
            continue
        records = value if isinstance(value, list) else [value]
        missing += [f"{section}.{name}" for name in fields if any(name not in r for r in records)]
    return missing


def _field_problems(data: dict) -> list[str]:
    problems = []
    for section, fields in SCHEMA_FIELDS.items():
        value, is_list = data.get(section), section in LIST_SECTIONS
        if not isinstance(value, list if is_list else dict):
            problems.append(f"{section} is missing or not a {'list' if is_list else 'dict'}")
            continue
        for index, record in enumerate(value if is_list else [value]):
            where = f"{section}[{index}]" if is_list else section
            for name, types in fields.items():
                if name not in record:
                    problems.append(f"{where} lacks {name}")
                elif not isinstance(record[name], types) or (bool not in types and isinstance(record[name], bool)):
                    problems.append(f"{where}.{name} is {type(record[name]).__name__}")
    return problems


def check_report_dir(directory: str) -> str:
    """Create ``directory`` if needed and check that a file can be written
    there: asked before any work, so that a bad path fails at once rather
    than after the profiling. Returns the directory."""
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".mutwo-write-check-"):
            pass
    except OSError as error:
        raise MutwoError(f"cannot write a report to {directory!r}: {error.strerror or error}. Nothing has "
                         "run: choose a directory you can write to (--out DIR on the command line, "
                         "report_dir=... in Python).") from None
    return directory


class ReportNotSavedError(MutwoError):
    """Saving a report failed after the profiling; the report is kept in
    ``.report``, to save elsewhere."""

    def __init__(self, message: str, report: "Report"):
        super().__init__(message)
        self.report = report


def is_work(node: dict) -> bool:
    """Whether a node record is an op (graph inputs and the output do no
    work, whatever time an interpreter took to pass them)."""
    return node["op"] not in WORKLESS_OPS


def module_path_at_depth(module: str | None, depth: int) -> str:
    """``layer3.4.conv2`` at depth 2 is ``layer3.4``; None is UNATTRIBUTED."""
    return UNATTRIBUTED if module is None else ".".join(module.split(".")[:depth])


def module_records(data: dict, depth: int) -> list[ModuleRecord]:
    """Per module path cut to ``depth``, in order of first appearance: the
    time of its nodes (placeholders and outputs left out), its activations,
    the activation storages it created that are live at the simulated peak
    (each graph's own peak for a compile capture with several graphs), and
    its recompute candidates."""
    totals: dict[str, dict] = {}

    def entry(module):
        key = module_path_at_depth(module, depth)
        return totals.setdefault(key, {"module": key, "nodes": 0, "time_ms": 0.0, "forward_ms": 0.0,
                                       "backward_ms": 0.0, "activations": 0, "activation_bytes": 0,
                                       "activation_bytes_at_peak": 0, "recompute_candidates": 0,
                                       "recompute_candidate_bytes": 0})

    for graph in data.get("graphs") or [data]:
        module_of = {}
        for node in graph["nodes"]:
            module_of[node["name"]] = node.get("module")
            if not is_work(node):
                continue
            total = entry(node.get("module"))
            total["nodes"] += 1
            total["time_ms"] += node["run_time_ms"]
            if node["region"] in (Region.FORWARD.value, Region.BACKWARD.value):
                total[f"{node['region']}_ms"] += node["run_time_ms"]
        for act in graph["activations"]:
            total = entry(act.get("module"))
            total["activations"] += 1
            total["activation_bytes"] += act["memory_bytes"]
            if act["recomputable"] and act["memory_bytes"]:
                total["recompute_candidates"] += 1
                total["recompute_candidate_bytes"] += act["memory_bytes"]
        peak = graph["memory"]["peak_rank"]
        for storage in graph.get("storages", []):
            freed = storage["freed_rank"]
            if storage["kind"] == NodeType.ACT.value and storage["allocated_rank"] <= peak \
                    and (freed is None or peak <= freed):
                entry(module_of.get(storage["creator"]))["activation_bytes_at_peak"] += storage["memory_bytes"]
    return [ModuleRecord(**total) for total in totals.values()]


def memory_graph(data: dict) -> dict:
    """The report whose nodes the top-level ``memory`` timeline is indexed by:
    the report itself, or for a compile capture with several graphs, the one
    meta["memory_graph"] names (the graph with the highest simulated peak)."""
    graphs = data.get("graphs")
    if not graphs:
        return data
    return graphs[data["meta"]["memory_graph"]]


class Report:
    """A profile of one training iteration (or of several graphs of one).

    A report of the older schema "mutwo.report/1" is read too: the fields
    it lacks are listed in ``missing_fields`` (and logged), and the tables
    leave them out."""

    def __init__(self, data: dict):
        if data.get("schema") not in (SCHEMA, SCHEMA_V1):
            raise MutwoError(f"not a mutwo report: schema is {data.get('schema')!r}, not {SCHEMA!r} "
                             f"(or {SCHEMA_V1!r})")
        self.data = data
        self.missing_fields = missing_fields(data) if data["schema"] != SCHEMA else []
        if self.missing_fields:
            log.warning("this report is of schema %s, older than %s: it lacks %s", data["schema"], SCHEMA,
                        ", ".join(self.missing_fields))

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

    def modules(self, depth: int | None = None) -> list[ModuleRecord]:
        """Totals per module path cut to ``depth`` (default: the report's
        ``meta.module_depth``)."""
        return module_records(self.data, depth or self.data["meta"].get("module_depth", 2))

    # --- tables --------------------------------------------------------------

    def summary_rows(self) -> list[tuple[str, str]]:
        meta, memory = self.data["meta"], self.data["memory"]
        rows = [("model", meta.get("model") or "-")]
        for key, label in (("batch_size", "batch size"), ("seq_len", "sequence length"),
                           ("optimizer", "optimizer")):
            if meta.get(key) is not None:
                rows.append((label, str(meta[key])))
        rows += [(f"input {i['name']}", f"{i['dtype']}{list(i['shape'])}") for i in meta.get("inputs", [])]
        capture = meta.get("capture", "-") + (f" ({meta['capture_method']})" if meta.get("capture_method") else "")
        ops = sum(map(is_work, self.data["nodes"]))
        rows += [("capture", capture),
                 ("device", meta["device_name"]), ("torch", meta["torch_version"]),
                 ("timer", meta["timer"]),
                 ("iterations", _iterations(meta)),
                 ("iteration time (median of per-iteration node sums)", f"{meta['iteration_time_ms']:.2f} ms"),
                 ("instrumented wall time per iteration", f"{meta.get('instrumented_wall_ms', 0):.2f} ms"),
                 ("nodes", f"{ops} ops, {len(self.data['nodes']) - ops} graph inputs and output"),
                 ("activations", f"{len(self.data['activations'])}, "
                                 f"{format_bytes(sum(a['memory_bytes'] for a in self.data['activations']))}"),
                 ("simulated peak memory", format_bytes(memory["peak_bytes"])),
                 ("measured peak memory", format_bytes(memory["measured_peak_bytes"]))]
        total = memory["peak_bytes"] or 1
        breakdown = memory["breakdown_at_peak"]
        rows += [(f"  {kind} at peak", f"{format_bytes(breakdown[kind])} ({100 * breakdown[kind] / total:.1f}%)")
                 for kind in _ordered(breakdown, KINDS)]
        return rows

    def _node_time_sum_ms(self) -> float:
        """What node, module and region shares divide: the sum of the median
        times of the nodes that do work (is_work)."""
        return sum(n["run_time_ms"] for n in self.data["nodes"] if is_work(n)) or 1.0

    def top_nodes_table(self, top: int = 15) -> str:
        nodes = sorted(self.data["nodes"], key=lambda n: -n["run_time_ms"])[:top]
        total = self._node_time_sum_ms()
        graph = "graph" in (nodes[0] if nodes else {})
        rows = [((n["graph"],) if graph else ()) +
                (n["name"], n.get("module") or "-", n["target"], n["region"], n["kind"],
                 format_ms(n["run_time_ms"]), f"{100 * n['run_time_ms'] / total:.1f}%",
                 format_bytes(n["output_bytes"]))
                for n in nodes]
        headers = (["graph"] if graph else []) + [
            f"top {len(nodes)} nodes by time", "module", "target", "region", "kind", "time (ms)", "share",
            "allocates"]
        return tabulate(rows, headers=headers, tablefmt="simple", disable_numparse=True)

    def region_rows(self) -> list[dict]:
        """Time and node count per region of the nodes that do work (graph
        inputs and output left out); shares add to 100%."""
        total = self._node_time_sum_ms()
        regions = {}
        for n in self.data["nodes"]:
            if not is_work(n):
                continue
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
        rows.append(("all", sum(r["nodes"] for r in self.region_rows()),
                     format_ms(sum(r["time_ms"] for r in self.region_rows()), 2), "100.0%"))
        return tabulate(rows, headers=["region", "nodes", "time (ms, sum of node medians)", "share"],
                        tablefmt="simple", disable_numparse=True)

    def activations_table(self, top: int = 15) -> str:
        acts = sorted(self.data["activations"], key=lambda a: -a["memory_bytes"])[:top]
        rows = []
        for a in acts:
            ratio = a["recompute_ratio"]
            rows.append((a["name"], a.get("module") or "-", format_bytes(a["memory_bytes"]), a["creation_rank"],
                         a["last_fw_rank"], a["first_bw_rank"], a["last_bw_rank"],
                         format_ms(a["inactive_time_ms"]), format_ms(a["swap_out_ms"]), format_ms(a["swap_in_ms"]),
                         format_ms(a["recompute_time_ms"]),
                         "-" if ratio is None else f"{ratio / 2 ** 20:.3f}",
                         "yes" if a["recomputable"] else "no", "yes" if a["swap_hidden"] else "no"))
        headers = [f"top {len(acts)} activations by size", "module", "size", "created", "last fw", "first bw",
                   "last bw", "inactive (ms)", "swap out (ms)", "swap in (ms)", "recompute (ms)",
                   "recompute ratio (MiB/ms)", "recomputable", "swap hidden"]
        return tabulate(rows, headers=headers, tablefmt="simple", disable_numparse=True)

    def modules_table(self, depth: int | None = None, top: int = 15) -> str:
        """The modules with the most time, at ``depth``."""
        records = self.modules(depth)
        total = self._node_time_sum_ms()
        shown = sorted(records, key=lambda m: -m.time_ms)[:top]
        rows = [(m.module, m.nodes, format_ms(m.time_ms, 2), f"{100 * m.time_ms / total:.1f}%",
                 format_ms(m.forward_ms, 2), format_ms(m.backward_ms, 2), m.activations,
                 format_bytes(m.activation_bytes_at_peak),
                 f"{m.recompute_candidates} ({format_bytes(m.recompute_candidate_bytes)})")
                for m in shown]
        depth = depth or self.data["meta"].get("module_depth", 2)
        headers = [f"top {len(shown)} of {len(records)} modules (depth {depth}) by time", "nodes", "time (ms)",
                   "share", "forward (ms)", "backward (ms)", "activations", "activations at peak",
                   "recompute candidates"]
        return tabulate(rows, headers=headers, tablefmt="simple", disable_numparse=True)

    def format(self, top: int = 15, module_depth: int | None = None) -> str:
        """Everything ``print()`` prints, as one string."""
        data = self.data
        parts = [tabulate(self.summary_rows(), tablefmt="simple", disable_numparse=True)]
        parts += [f"note: {note}" for note in data["meta"].get("notes", [])]
        parts += ["", self.regions_table(), "", self.modules_table(module_depth, top), "",
                  self.top_nodes_table(top)]
        if data["activations"]:
            parts += ["", self.activations_table(top)]
            if len(data["activations"]) > top:
                parts.append(f"... and {len(data['activations']) - top} more activations "
                             "(all of them in activations.csv when saved)")
        else:
            parts += ["", "no activations (nothing of the forward pass is kept for the backward pass)"]
        return "\n".join(parts)

    def print(self, top: int = 15, module_depth: int | None = None) -> None:
        print(self.format(top, module_depth))

    # --- files -----------------------------------------------------------------

    def save(self, directory: str, plots: bool = True, trace: bool = True, plot_processes=None,
             timeline_x: str = "time") -> str:
        """Write report.json, nodes.csv, activations.csv, modules.csv,
        trace.json and the two memory plots under ``directory``; returns
        report.json's path. ``timeline_x`` is the memory timeline's x axis:
        "time" (the step's time, from the node times) or "rank" (graph order).

        The plots are drawn by child processes (plot_processes.py) while
        this one writes the other files: ``plot_processes``, started earlier,
        or new ones. Without matplotlib the plots are skipped and
        report.json's notes say how to get them. If writing fails, the
        ReportNotSavedError raised holds this report."""
        try:
            return self._save(directory, plots, trace, plot_processes, timeline_x)
        except OSError as error:
            raise ReportNotSavedError(
                f"could not save the report to {directory!r}: {error.strerror or error}. The profile is not "
                "lost: it is this error's .report; save it elsewhere with error.report.save(DIR).",
                self) from error

    def _save(self, directory, plots, trace, plot_processes, timeline_x) -> str:
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
                plot_processes.draw(data, directory, {"memory_timeline": {"x_axis": timeline_x}})
            path = os.path.join(directory, "report.json")
            with open(path, "w") as f:
                f.write(json.dumps(data))  # one string, json's C encoder: 5x faster than json.dump(indent=)
            write_csv(os.path.join(directory, "nodes.csv"), data["nodes"])
            write_csv(os.path.join(directory, "activations.csv"), data["activations"])
            write_csv(os.path.join(directory, "modules.csv"), data.get("modules", []))
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
