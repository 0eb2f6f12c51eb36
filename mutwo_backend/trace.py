"""A report as a Chrome trace (JSON trace event format), to open in Perfetto
(https://ui.perfetto.dev) or chrome://tracing.

One process per graph (one for a train-step capture), with:

- track "nodes": a complete event ("ph": "X") per node, named by its module
  and node name (``layer1.0.conv1: convolution``), laid end to end in graph
  order with its median run time; args hold the node's name, rank, module,
  source line, parameter, op, target, region, kind and sizes;
- counters ("ph": "C") "live memory (bytes)" (simulated total, and on a GPU
  the allocator's measured bytes) and "live memory by kind (bytes)": the
  bytes live after each node, from the moment it ends;
- tracks "swap out (device to host)" and "swap in (host to device)": each
  activation's modelled copy. A swap-out starts when its last forward access
  ends, a swap-in ends when its first backward access starts; copies of one
  direction share one copy stream, so they queue (swap-outs are pushed later,
  swap-ins pulled earlier). ``args.hidden`` says whether the activation's
  swap fits in its inactive time.

Timestamps are in microseconds, as the format requires."""

import json

from .report import KINDS, _ordered

NODE_TID, SWAP_OUT_TID, SWAP_IN_TID = 1, 2, 3


def chrome_trace(data: dict) -> dict:
    """The trace of a report dict (schema "mutwo.report/2")."""
    graphs = data.get("graphs") or [data]
    model = data["meta"].get("model") or "model"
    events, offset_us = [], 0.0
    for index, graph in enumerate(graphs):
        pid = index + 1
        name = f"mutwo: {model}" + (f" graph {index}" if len(graphs) > 1 else "")
        events += _metadata(pid, name)
        graph_events, offset_us = _graph_events(graph, pid, offset_us)
        events += graph_events
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"schema": data.get("schema"), "model": model,
                          "device": data["meta"].get("device_name"), "timer": data["meta"].get("timer"),
                          "note": "node times are medians over the measured iterations, laid end to end"}}


def write_trace(data: dict, path: str) -> None:
    with open(path, "w") as f:
        f.write(json.dumps(chrome_trace(data)))  # json.dump writes piece by piece, 3x slower


def _metadata(pid: int, name: str) -> list[dict]:
    events = [{"ph": "M", "name": "process_name", "pid": pid, "args": {"name": name}}]
    for tid, thread in ((NODE_TID, "nodes"), (SWAP_OUT_TID, "swap out (device to host)"),
                        (SWAP_IN_TID, "swap in (host to device)")):
        events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": thread}})
        events.append({"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": tid, "args": {"sort_index": tid}})
    return events


def _graph_events(graph: dict, pid: int, offset_us: float) -> tuple[list[dict], float]:
    nodes, memory = graph["nodes"], graph["memory"]
    # whole nanoseconds, so that a node ends exactly where the next begins
    # (viewers nest slices of one track and would otherwise see overlaps)
    start_ns, t = [], round(offset_us * 1000)
    for n in nodes:
        start_ns.append(t)
        t += _ns(n["run_time_ms"])
    start, end_us = [s / 1000 for s in start_ns], t / 1000
    events = []
    for n, ts in zip(nodes, start):
        events.append({"ph": "X", "name": slice_name(n), "cat": n["region"], "pid": pid, "tid": NODE_TID,
                       "ts": ts, "dur": _ns(n["run_time_ms"]) / 1000,
                       "args": {"node": n["name"], "rank": n["rank"], "module": n.get("module"),
                                "source": n.get("source"), "param": n.get("param"), "op": n["op"],
                                "target": n["target"], "region": n["region"], "kind": n["kind"],
                                "run_time_ms": n["run_time_ms"], "output_bytes": n["output_bytes"],
                                "peak_bytes": n["peak_bytes"]}})
    timeline = memory["timeline"]
    kinds = [k for k in _ordered(timeline, KINDS) if any(timeline[k])]
    length = min([len(nodes)] + [len(v) for v in timeline.values()])
    measured = memory.get("measured_allocated_after_bytes")

    def counters(ts, rank):
        by_kind = {kind: timeline[kind][rank] for kind in kinds}
        yield {"ph": "C", "name": "live memory by kind (bytes)", "pid": pid, "ts": ts, "args": by_kind}
        yield {"ph": "C", "name": "live memory (bytes)", "pid": pid, "ts": ts,
               "args": {"simulated": sum(by_kind.values()), **({"measured": measured[rank]} if measured else {})}}

    if length:
        events += counters(start[0], 0)
    for rank in range(length):  # the value after node r, from the moment it ends
        # a counter holds its value until the next sample: samples that repeat
        # the previous one (views, getitems: half the nodes) are left out
        if rank and all(timeline[k][rank] == timeline[k][rank - 1] for k in kinds) \
                and not (measured and measured[rank] != measured[rank - 1]):
            continue
        events += counters(start[rank + 1] if rank + 1 < len(start) else end_us, rank)
    events += _swap_events(graph["activations"], nodes, start_ns, pid)
    return events, end_us


def slice_name(node: dict) -> str:
    """"layer1.0.conv1: convolution" where the node's module is known, else its name."""
    return f"{node['module']}: {node['name']}" if node.get("module") else node["name"]


def _ns(ms: float) -> int:
    return round(ms * 1e6)


def _swap_events(activations: list[dict], nodes: list[dict], start_ns: list[int], pid: int) -> list[dict]:
    events = []
    free_at = None  # swap-outs queue on one stream, in order of readiness
    for a in sorted(activations, key=lambda a: (a["last_fw_rank"], a["creation_rank"])):
        rank = a["last_fw_rank"]
        ts = start_ns[rank] + _ns(nodes[rank]["run_time_ms"])
        ts = ts if free_at is None else max(ts, free_at)
        dur = _ns(a["swap_out_ms"])
        free_at = ts + dur
        events.append(_swap_event(a, "swap out", SWAP_OUT_TID, pid, ts, dur, a["swap_out_ms"],
                                  a.get("swap_out_measured_ms")))
    busy_from = None  # swap-ins queue backwards from when they are needed
    for a in sorted(activations, key=lambda a: (-a["first_bw_rank"], -a["creation_rank"])):
        finish = start_ns[a["first_bw_rank"]]
        finish = finish if busy_from is None else min(finish, busy_from)
        dur = _ns(a["swap_in_ms"])
        busy_from = finish - dur
        events.append(_swap_event(a, "swap in", SWAP_IN_TID, pid, busy_from, dur, a["swap_in_ms"],
                                  a.get("swap_in_measured_ms")))
    return events


def _swap_event(a: dict, what: str, tid: int, pid: int, ts_ns: int, dur_ns: int, model_ms: float,
                measured_ms: float | None) -> dict:
    return {"ph": "X", "name": f"{what} {a['name']}", "cat": what, "pid": pid, "tid": tid,
            "ts": ts_ns / 1000, "dur": dur_ns / 1000,
            "args": {"activation": a["name"], "module": a.get("module"), "memory_bytes": a["memory_bytes"], "model_ms": model_ms,
                     "measured_ms": measured_ms, "inactive_time_ms": a["inactive_time_ms"],
                     "hidden": a["swap_hidden"], "last_fw_rank": a["last_fw_rank"],
                     "first_bw_rank": a["first_bw_rank"]}}
