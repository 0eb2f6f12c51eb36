"""Report files from real CPU profiles: report.json against the schema of
DESIGN.md, CSV row counts, non-blank PNGs, a Chrome trace with every node,
the printed tables, and saving without matplotlib."""

import bisect
import copy
import csv
import json
import os

import numpy as np
import pytest
import torch

import mutwo_backend
from mutwo_backend import plots
from mutwo_backend.models import get_model, zoo_train_step
from mutwo_backend.profiler import profile_train_step
from mutwo_backend.report import PLOT_HINT, Report, validate
from report_versions import schema_1_report  # (tests/)

FILES = ["report.json", "nodes.csv", "activations.csv", "modules.csv", "trace.json", "memory_breakdown.png",
         "memory_timeline.png"]
KINDS = {"PARAM", "BUFFER", "INPUT", "ACT", "GRAD", "OPT_STATE", "OTHER"}
REGIONS = {"forward", "loss", "backward", "optimizer"}

# The schema "mutwo.report/2" (DESIGN.md's /1 fields and issue #17's
# additions), written out here on its own so that the test does not check
# the code against itself.
NUMBER, OPTIONAL_NUMBER = (int, float), (int, float, type(None))
OPTIONAL_STR, OPTIONAL_INT = (str, type(None)), (int, type(None))
SCHEMA = {
    "meta": {"model": str, "capture": str, "warmup": int, "iters": int, "device": str, "device_name": str,
             "torch_version": str, "timer": str, "iteration_time_ms": NUMBER, "swap": str, "notes": list,
             "node_time_sum_ms": NUMBER, "module_depth": int, "inputs": list},
    "node": {"name": str, "rank": int, "op": str, "target": str, "region": str, "kind": str,
             "run_time_ms": NUMBER, "peak_bytes": int, "active_bytes": int, "output_bytes": int,
             "module": OPTIONAL_STR, "source": OPTIONAL_STR, "param": OPTIONAL_STR, "inputs": list,
             "storages": list,
             "simulated_during_bytes": int, "simulated_live_bytes": int},
    "activation": {"name": str, "memory_bytes": int, "creation_rank": int, "last_fw_rank": int,
                   "first_bw_rank": int, "last_bw_rank": int, "inactive_time_ms": NUMBER,
                   "swap_out_ms": NUMBER, "swap_in_ms": NUMBER, "swap_out_measured_ms": OPTIONAL_NUMBER,
                   "swap_in_measured_ms": OPTIONAL_NUMBER, "swap_hidden": bool, "recompute_srcs": list,
                   "recompute_nodes": list, "recompute_time_ms": NUMBER, "recompute_peak_bytes": int,
                   "recompute_ratio": OPTIONAL_NUMBER, "recomputable": bool, "module": OPTIONAL_STR,
                   "source": OPTIONAL_STR, "storage": int, "base": OPTIONAL_STR, "recompute_replays_sep": bool},
    "storage": {"id": int, "memory_bytes": int, "kind": str, "creator": str, "resident": bool,
                "allocated_rank": int, "freed_rank": OPTIONAL_INT, "last_use_rank": int},
    "module": {"module": str, "nodes": int, "time_ms": NUMBER, "forward_ms": NUMBER, "backward_ms": NUMBER,
               "activations": int, "activation_bytes": int, "activation_bytes_at_peak": int,
               "recompute_candidates": int, "recompute_candidate_bytes": int},
    "memory": {"peak_bytes": int, "peak_rank": int, "breakdown_at_peak": dict, "timeline": dict,
               "measured_peak_bytes": (int, type(None))},
}


def check_fields(record: dict, fields: dict, where: str) -> None:
    for name, types in fields.items():
        assert name in record, f"{where} lacks {name}"
        value = record[name]
        assert isinstance(value, types), f"{where}.{name} = {value!r} is not {types}"
        if types in (int, NUMBER):
            assert not isinstance(value, bool), f"{where}.{name} is a bool"


@pytest.fixture(scope="module")
def report():
    spec = get_model("bert-tiny")
    torch.manual_seed(0)
    model = spec.build()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    inputs, targets = spec.make_batch(2, 32, torch.device("cpu"))
    return profile_train_step(zoo_train_step(spec), model, optimizer, inputs, targets, warmup=1, iters=2,
                              model_name=spec.name).add_meta(batch_size=2, seq_len=32)


@pytest.fixture(scope="module")
def saved(report, tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("report"))
    assert report.save(directory) == os.path.join(directory, "report.json")
    return directory


def test_save_writes_every_file(saved):
    assert sorted(os.listdir(saved)) == sorted(FILES)


def test_report_json_has_every_schema_field_with_the_right_type(saved):
    with open(os.path.join(saved, "report.json")) as f:
        data = json.load(f)
    assert data["schema"] == "mutwo.report/2"
    check_fields(data["meta"], SCHEMA["meta"], "meta")
    assert data["meta"]["model"] == "bert-tiny" and data["meta"]["batch_size"] == 2
    assert data["meta"]["capture"] == "train-step" and data["meta"]["timer"] == "cpu"
    assert (data["meta"]["warmup"], data["meta"]["iters"]) == (1, 2)
    assert data["nodes"] and data["activations"]
    for i, node in enumerate(data["nodes"]):
        check_fields(node, SCHEMA["node"], f"nodes[{i}]")
        assert node["rank"] == i and node["region"] in REGIONS and node["kind"] in KINDS
    names = {n["name"] for n in data["nodes"]}
    for i, act in enumerate(data["activations"]):
        check_fields(act, SCHEMA["activation"], f"activations[{i}]")
        assert act["creation_rank"] <= act["last_fw_rank"] < act["first_bw_rank"] <= act["last_bw_rank"]
        assert set(act["recompute_nodes"]) <= names and set(act["recompute_srcs"]) <= names
    for section, record in (("storages", "storage"), ("modules", "module")):
        assert data[section]
        for i, item in enumerate(data[section]):
            check_fields(item, SCHEMA[record], f"{section}[{i}]")
    memory = data["memory"]
    check_fields(memory, SCHEMA["memory"], "memory")
    assert memory["measured_peak_bytes"] is None  # no allocator on the CPU
    assert set(memory["breakdown_at_peak"]) <= KINDS and set(memory["timeline"]) <= KINDS
    assert sum(memory["breakdown_at_peak"].values()) == memory["peak_bytes"]
    for kind, series in memory["timeline"].items():
        assert len(series) == len(data["nodes"]) and all(isinstance(b, int) for b in series), kind
    assert validate(data) == []  # the module's own check agrees


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_csv_rows_equal_nodes_and_activations(saved, report):
    data = report.to_dict()
    nodes = read_csv(os.path.join(saved, "nodes.csv"))
    activations = read_csv(os.path.join(saved, "activations.csv"))
    assert len(nodes) == len(data["nodes"]) and len(activations) == len(data["activations"])
    assert [r["name"] for r in nodes] == [n["name"] for n in data["nodes"]]
    # exact numbers in files: bytes as integers, times unrounded
    assert int(nodes[5]["output_bytes"]) == data["nodes"][5]["output_bytes"]
    assert float(nodes[5]["run_time_ms"]) == data["nodes"][5]["run_time_ms"]
    assert int(activations[0]["memory_bytes"]) == data["activations"][0]["memory_bytes"]
    assert activations[0]["recompute_nodes"].split() == data["activations"][0]["recompute_nodes"]


@pytest.mark.parametrize("name", ["memory_breakdown.png", "memory_timeline.png"])
def test_pngs_open_and_are_not_blank(saved, name):
    image = pytest.importorskip("matplotlib.image").imread(os.path.join(saved, name))
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    pixels = np.ascontiguousarray((image[..., :3] * 255).astype(np.uint8))
    colours = np.unique(pixels.reshape(-1, 3).view([("r", np.uint8), ("g", np.uint8), ("b", np.uint8)]))
    assert len(colours) > 1


def test_trace_has_a_complete_event_per_node_and_counters(saved, report):
    with open(os.path.join(saved, "trace.json")) as f:
        trace = json.load(f)
    events = trace["traceEvents"]
    data = report.to_dict()
    thread = {e["tid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    node_tid = next(t for t, name in thread.items() if name == "nodes")
    complete = [e for e in events if e["ph"] == "X" and e["tid"] == node_tid]
    assert [e["args"]["node"] for e in complete] == [n["name"] for n in data["nodes"]]
    for event, node in zip(complete, data["nodes"]):
        assert event["args"]["region"] == node["region"] and event["args"]["op"] == node["op"]
        assert event["args"]["module"] == node["module"] and event["args"]["source"] == node["source"]
        assert event["name"] == (f"{node['module']}: {node['name']}" if node["module"] else node["name"])
        assert event["dur"] == pytest.approx(node["run_time_ms"] * 1000, abs=1e-3)
    # one track: each node starts where the one before ends
    for before, after in zip(complete, complete[1:]):
        assert round((before["ts"] + before["dur"]) * 1000) == round(after["ts"] * 1000)
    # the counter, read as a step function, gives every node's simulated bytes
    # as it ends (samples that repeat the previous one are left out)
    # (nodes of 0 ms end together: the last of them is the value from then on)
    samples = [(e["ts"], e["args"]["simulated"]) for e in events
               if e["ph"] == "C" and e["name"] == "live memory (bytes)"]
    times = [ts for ts, _ in samples]
    ends = [e["ts"] + e["dur"] for e in complete]
    for rank, end in enumerate(ends):
        if rank + 1 < len(ends) and ends[rank + 1] <= end + 1e-6:
            continue
        expected = sum(series[rank] for series in data["memory"]["timeline"].values())
        assert samples[bisect.bisect_right(times, end + 1e-6) - 1][1] == expected
    assert len(samples) < len(complete)
    swaps = [e for e in events if e["ph"] == "X" and thread[e["tid"]].startswith("swap")]
    assert len(swaps) == 2 * len(data["activations"])
    start = {e["args"]["node"]: e["ts"] for e in complete}
    for event in swaps:  # a swap-out begins after its last forward access, a swap-in ends before its first backward
        node = data["nodes"][event["args"]["last_fw_rank" if event["cat"] == "swap out" else "first_bw_rank"]]
        if event["cat"] == "swap out":
            assert event["ts"] >= start[node["name"]]
        else:
            assert event["ts"] + event["dur"] <= start[node["name"]] + 1e-3


def test_print_shows_summary_regions_top_nodes_and_activations(report, capsys):
    report.print(top=5)
    out = capsys.readouterr().out
    for text in ["bert-tiny", "iteration time", "simulated peak memory", "ACT at peak", "region", "forward",
                 "backward", "optimizer", "top 5 nodes by time", "time (ms)", "share", "activations by size",
                 "inactive (ms)", "swap out (ms)", "recompute ratio (MiB/ms)", "recomputable", "swap hidden"]:
        assert text in out, text
    assert "MiB" in out or "KiB" in out  # human-readable sizes in tables


def test_load_reads_back_what_save_wrote(saved, report):
    assert Report.load(saved).to_dict() == json.loads(json.dumps(report.to_dict()))


def test_storages_rebuild_the_timeline_and_what_is_live_while_each_node_runs(report):
    """A planner rebuilds memory from the storage records: live after rank r
    when allocated_rank <= r < freed_rank, while r runs when <= freed_rank.
    That must give the report's own timeline, per kind, and its peak."""
    data = report.to_dict()
    count = len(data["nodes"])
    after = {kind: np.zeros(count, dtype=np.int64) for kind in data["memory"]["timeline"]}
    during = np.zeros(count, dtype=np.int64)
    for storage in data["storages"]:
        freed = count if storage["freed_rank"] is None else storage["freed_rank"]
        after[storage["kind"]][storage["allocated_rank"]:freed] += storage["memory_bytes"]
        during[storage["allocated_rank"]:freed + 1] += storage["memory_bytes"]
        assert storage["allocated_rank"] <= storage["last_use_rank"] <= freed
        assert storage["resident"] == (data["nodes"][[n["name"] for n in data["nodes"]].index(storage["creator"])]
                                       ["op"] == "placeholder")
    for kind, series in data["memory"]["timeline"].items():
        assert after[kind].tolist() == series, kind
    assert during.tolist() == [n["simulated_during_bytes"] for n in data["nodes"]]
    assert during.max() == data["memory"]["peak_bytes"] and during.argmax() == data["memory"]["peak_rank"]
    # eager's references (the model output kept by the step) hold some storage past its last use
    assert any(s["freed_rank"] is not None and s["freed_rank"] > s["last_use_rank"] for s in data["storages"])


def test_activations_name_the_storage_they_hold_and_its_base(report):
    data = report.to_dict()
    storages = {s["id"]: s for s in data["storages"]}
    rank = {n["name"]: n["rank"] for n in data["nodes"]}
    owners = {}
    for act in data["activations"]:
        storage = storages[act["storage"]]
        owners.setdefault(act["storage"], []).append(act)
        if act["base"] is not None:  # a view or in-place result: of an earlier node
            assert rank[act["base"]] < rank[act["name"]]
    for storage_id, acts in owners.items():
        storage = storages[storage_id]
        counted = [a["memory_bytes"] for a in acts if a["memory_bytes"]]
        # the bytes of a storage are counted once, on one of its activations, unless it is an input's
        assert counted == ([] if storage["resident"] else [storage["memory_bytes"]])
    assert any(len(acts) > 1 for acts in owners.values())  # views of one storage share its id
    by_name = {n["name"]: n for n in data["nodes"]}
    for act in data["activations"]:
        assert act["storage"] == by_name[act["name"]]["storages"][0]
    for storage in data["storages"]:  # a storage's creator refers to it
        assert storage["id"] in by_name[storage["creator"]]["storages"]


def test_output_bytes_is_what_a_node_newly_allocates(report):
    data = report.to_dict()
    nodes = [n for n in data["nodes"] if n["op"] != "placeholder"]
    assert sum(n["output_bytes"] for n in nodes) == sum(s["memory_bytes"] for s in data["storages"]
                                                       if not s["resident"])
    views = [n for n in nodes if n["target"] in ("detach.default", "t.default", "view.default", "expand.default")]
    assert views and all(n["output_bytes"] == 0 for n in views)
    assert all(n["output_bytes"] > 0 for n in nodes if n["target"] in ("addmm.default", "mm.default"))
    names = [n["name"] for n in data["nodes"]]
    for node in data["nodes"]:  # inputs are earlier nodes
        assert all(names.index(i) < node["rank"] for i in node["inputs"])
    assert len(next(n for n in nodes if n["target"] == "addmm.default")["inputs"]) == 3


def test_parameters_gradients_and_state_carry_the_parameter_name(report):
    data = report.to_dict()
    spec = get_model("bert-tiny")
    params = {name for name, p in spec.build().named_parameters()}
    by_kind = {}
    for node in data["nodes"]:
        by_kind.setdefault(node["kind"], []).append(node)
    assert {n["param"] for n in by_kind["PARAM"]} == params
    assert {n["param"] for n in by_kind["GRAD"]} == params  # every parameter is trained
    assert {n["param"] for n in by_kind["OPT_STATE"]} == params
    assert all(n["param"] is None for kind in ("ACT", "INPUT", "OTHER") for n in by_kind.get(kind, []))
    assert {n["module"] for n in by_kind["OPT_STATE"]} == {"optimizer"}
    # a parameter's module is the one that owns it
    assert all(n["module"] == n["param"].rpartition(".")[0] for n in by_kind["PARAM"])


def test_modules_add_up_to_the_report(report):
    data = report.to_dict()
    modules = data["modules"]
    assert data["meta"]["module_depth"] == 2
    assert sum(m["time_ms"] for m in modules) == pytest.approx(data["meta"]["node_time_sum_ms"])
    assert sum(m["activations"] for m in modules) == len(data["activations"])
    assert sum(m["activation_bytes_at_peak"] for m in modules) == data["memory"]["breakdown_at_peak"]["ACT"]
    assert {"loss", "optimizer"} <= {m["module"] for m in modules}
    assert all(m["module"].count(".") <= 1 for m in modules)
    deeper = report.modules(depth=4)
    assert len(deeper) > len(modules)
    assert sum(m.time_ms for m in deeper) == pytest.approx(data["meta"]["node_time_sum_ms"])
    # forward and backward time of a module are its nodes' in those regions
    encoder = next(m for m in modules if m["module"] == "bert.encoder")
    assert encoder["forward_ms"] == pytest.approx(sum(
        n["run_time_ms"] for n in data["nodes"]
        if n["region"] == "forward" and (n["module"] or "").startswith("bert.encoder") and n["op"] != "placeholder"))


def test_region_shares_add_up_and_leave_graph_inputs_out(report):
    rows = report.region_rows()
    assert sum(r["share"] for r in rows) == pytest.approx(1.0)
    forward = next(r for r in rows if r["region"] == "forward")
    data = report.to_dict()
    assert forward["nodes"] == sum(n["region"] == "forward" and n["op"] != "placeholder" for n in data["nodes"])
    assert sum(r["nodes"] for r in rows) == len(data["nodes"]) - sum(
        n["op"] in ("placeholder", "output") for n in data["nodes"])


def test_summary_shows_the_inputs_and_the_modules(report, capsys):
    report.print(top=5, module_depth=1)
    out = capsys.readouterr().out
    assert "input args[0]" in out and "int64[2, 32]" in out  # bert-tiny's token ids at batch 2, seq 32
    assert "modules (depth 1) by time" in out and "bert " in out
    assert "iteration time (median of per-iteration node sums)" in out


def test_a_version_1_report_loads_and_says_what_it_lacks(report, tmp_path, caplog):
    old = copy.deepcopy(report.to_dict())
    old["schema"] = "mutwo.report/1"
    for section in ("storages", "modules"):
        del old[section]
    for node in old["nodes"]:
        for field in ("module", "source", "param", "inputs", "simulated_during_bytes"):
            del node[field]
    for act in old["activations"]:
        for field in ("module", "source", "storage", "base", "recompute_replays_sep"):
            del act[field]
    with open(tmp_path / "report.json", "w") as f:
        json.dump(old, f)
    loaded = Report.load(str(tmp_path))
    assert {"storages", "modules", "nodes.module", "activations.storage"} <= set(loaded.missing_fields)
    assert "nodes.name" not in loaded.missing_fields
    assert "lacks" in caplog.text and "nodes.module" in caplog.text
    assert "top 5 nodes by time" in loaded.format(top=5)  # the tables still print
    assert validate(old)  # and it is not a valid /2 report


@pytest.mark.parametrize("x_axis", ["time", "rank"])
def test_timeline_x_axis(report, tmp_path, x_axis):
    path = str(tmp_path / f"{x_axis}.png")
    plots.memory_timeline(report.to_dict(), path, x_axis=x_axis)
    assert os.path.getsize(path) > 10_000
    with pytest.raises(ValueError, match="x_axis"):
        plots.memory_timeline(report.to_dict(), path, x_axis="seconds")


def test_without_matplotlib_everything_else_is_written(report, tmp_path, monkeypatch):
    monkeypatch.setattr(plots, "available", lambda: False)
    report.save(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted(f for f in FILES if not f.endswith(".png"))
    with open(tmp_path / "report.json") as f:
        assert PLOT_HINT in json.load(f)["meta"]["notes"]
    assert "pip install 'mutwo[plot]'" in PLOT_HINT
    assert PLOT_HINT not in report.to_dict()["meta"]["notes"]  # the report itself is unchanged


class BreakingMLP(torch.nn.Module):
    """A graph break in forward: two dynamo graphs."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.fc1(x))
        torch._dynamo.graph_break()
        return self.fc2(x)


def test_compile_report_with_graph_break_saves_one_trace_process_per_graph(tmp_path):
    torch.manual_seed(0)
    model = BreakingMLP()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    compiled = torch.compile(model, backend="mutwo_profile", options={"warmup": 1, "iters": 1})
    x, y = torch.randn(4, 8), torch.randint(0, 4, (4,))
    for _ in range(2):
        torch.nn.functional.cross_entropy(compiled(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    report = mutwo_backend.get_report(compiled)
    assert report is not None and len(report.to_dict()["graphs"]) == 2
    assert validate(report.to_dict()) == [] and all(validate(g) == [] for g in report.to_dict()["graphs"])
    assert report.to_dict()["meta"]["model"] == "BreakingMLP"
    assert {m["module"] for m in report.to_dict()["modules"]} >= {"fc1", "fc2"}
    report.save(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted(FILES)
    with open(tmp_path / "trace.json") as f:
        events = json.load(f)["traceEvents"]
    processes = {e["pid"] for e in events if e["ph"] == "X"}
    assert processes == {1, 2}
    assert len([e for e in events if e["ph"] == "X" and e["tid"] == 1]) == len(report.to_dict()["nodes"])


def test_recompute_lists_through_the_separator_say_so(report):
    """A loss-region activation (log_softmax's output) recomputes from the
    model output through separator.sep; its replay is a plain view."""
    data = report.to_dict()
    seps = {n["name"] for n in data["nodes"] if n["target"] == "sep.default"}
    assert len(seps) == 1
    flagged = [a for a in data["activations"] if a["recompute_replays_sep"]]
    assert flagged and all(a["module"] == "loss" for a in flagged)
    assert all(a["recompute_replays_sep"] == bool(seps & set(a["recompute_nodes"])) for a in data["activations"])


def test_a_version_1_h200_report_loads(caplog, tmp_path):
    """BERT-base's H200 report as an older mutwo wrote it, in schema /1."""
    (tmp_path / "report.json").write_text(json.dumps(schema_1_report()))
    loaded = Report.load(str(tmp_path))
    assert loaded.data["schema"] == "mutwo.report/1"
    assert {"storages", "modules", "nodes.module", "nodes.inputs", "activations.base"} <= set(loaded.missing_fields)
    text = loaded.format(top=3)
    assert "NVIDIA H200" in text and "top 3 nodes by time" in text
