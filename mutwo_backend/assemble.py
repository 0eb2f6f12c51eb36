"""Report assembly: the one place that builds a report's records, from a
graph's analysis, the statistics of its measured iterations and what the
capture knows (placeholder names, module attribution), and that merges the
reports of a compiled model's several graphs into one."""

import copy

import torch
from torch import fx

from passes import GraphAnalysis, GraphHints, NodeType, Region
from passes.memory import rounded

from .attribution import MODULE_KEY, SOURCE_KEY
from .metrics import activation_records
from .records import (SCHEMA, WORKLESS_OPS, MemoryRecord, Meta, NodeRecord, ReportRecords, StorageRecord,
                      as_dict)
from .report import Report, module_records
from .statistics import NodeStatistics
from .swap import SwapModel

DEFAULT_MODULE_DEPTH = 2


def assemble_report(analysis: GraphAnalysis, stats: NodeStatistics, *, device: torch.device, timer: str,
                    swap: str, swap_model: SwapModel, meta: dict, hints: GraphHints | None = None,
                    root_module: str | None = None, module_depth: int = DEFAULT_MODULE_DEPTH) -> Report:
    """The report of one graph. ``stats`` are indexed by the analysis' ranks;
    ``meta`` holds what the caller knows (model, capture, capture_method,
    warmup, and any extra field); ``hints`` name the placeholders;
    ``root_module`` is the label of ops issued by the model's own forward."""
    labels = NodeLabels(analysis, hints, root_module)
    storage_ids = {key: index for index, key in enumerate(analysis.storages.creator)}
    measured_swaps = swap == "measure"
    activations = activation_records(analysis, stats.run_time_ms, swap_model, storage_ids, labels.module_and_source,
                                     stats.swap_out_measured_ms if measured_swaps else None,
                                     stats.swap_in_measured_ms if measured_swaps else None)
    memory, measured = analysis.memory, stats.peak_bytes is not None
    nodes = []
    for rank, node in enumerate(analysis.nodes):
        module, source = labels.module_and_source(node)
        nodes.append(NodeRecord(
            name=node.name, rank=rank, op=node.op, target=target_name(node),
            region=analysis.regions[node].value, kind=analysis.kinds[node].value,
            module=module, source=source, param=labels.param(node),
            inputs=[n.name for n in node.all_input_nodes],
            storages=[storage_ids[key] for key in analysis.storages.refs.get(node, ())],
            run_time_ms=float(stats.run_time_ms[rank]), run_time_min_ms=float(stats.run_time_min_ms[rank]),
            run_time_max_ms=float(stats.run_time_max_ms[rank]),
            peak_bytes=int(stats.peak_bytes[rank] if measured else memory.peak_during_bytes[rank]),
            active_bytes=int(stats.allocated_after_bytes[rank] if measured else memory.live_bytes[rank]),
            output_bytes=int(analysis.output_bytes[node]),
            simulated_live_bytes=int(memory.live_bytes[rank]),
            simulated_during_bytes=int(memory.peak_during_bytes[rank])))
    storages = [StorageRecord(
        id=storage_ids[key], memory_bytes=rounded(analysis.storages.nbytes[key], memory.allocator_rounding),
        kind=memory.storage_kind[key].value, creator=creator.name, resident=creator.op == "placeholder",
        allocated_rank=memory.allocated_rank[key], freed_rank=memory.freed_rank[key],
        last_use_rank=memory.last_use_rank[key])
        for key, creator in analysis.storages.creator.items()]
    graph_peak = int(stats.peak_bytes.max()) if measured else None
    outside = {where: int(b) for where, b in stats.outside_peak_bytes.items()}
    notes = list(meta.get("notes", [])) + outside_peak_notes(graph_peak, outside)
    if swap_model.estimated:
        notes.append("swap times are estimated (no GPU): a default model of "
                     f"{swap_model.device_to_host.bytes_per_ms / 1e6:.0f} GB/s each way")
    known = {f: meta[f] for f in ("model", "capture", "capture_method", "warmup") if f in meta}
    record_meta = Meta(
        model=known.get("model"), capture=known["capture"], capture_method=known.get("capture_method"),
        warmup=known["warmup"], iters=stats.iterations, device=str(device), device_name=device_name(device),
        torch_version=str(torch.__version__), timer=timer, iteration_time_ms=stats.iteration_ms,
        node_time_sum_ms=float(sum(r.run_time_ms for r in nodes if r.op not in WORKLESS_OPS)),
        instrumented_wall_ms=stats.wall_ms, swap=swap, swap_model=swap_model.to_dict(), module_depth=module_depth,
        inputs=labels.step_inputs(), notes=notes)
    extra = {k: v for k, v in meta.items() if k not in known and k != "notes"}
    records = ReportRecords(record_meta, nodes, activations, storages, MemoryRecord(
        peak_bytes=int(memory.peak_bytes), peak_rank=int(memory.peak_rank),
        breakdown_at_peak={k.value: int(v) for k, v in memory.breakdown_at_peak.items()},
        timeline={kind.value: [int(b) for b in memory.timeline_of(kind)] for kind in memory.kinds},
        measured_peak_bytes=max([graph_peak, *outside.values()]) if measured else None,
        measured_graph_peak_bytes=graph_peak, outside_graphs_peak_bytes=outside or None,
        measured_allocated_after_bytes=[int(b) for b in stats.allocated_after_bytes] if measured else None),
        extra_meta=extra)
    data = records.to_json()
    data["modules"] = [as_dict(m) for m in module_records(data, module_depth)]
    return Report(data)


class NodeLabels:
    """The names a report gives a graph's nodes: module, source and parameter."""

    def __init__(self, analysis: GraphAnalysis, hints: GraphHints | None, root_module: str | None):
        self.analysis, self.root_module = analysis, root_module
        self.names = dict(hints.names) if hints is not None else {}
        self.param_of_grad = {grad: param for param, grad in analysis.grads.items()}

    def param(self, node: fx.Node) -> str | None:
        """The parameter a PARAM, GRAD or OPT_STATE node belongs to."""
        kind = self.analysis.kinds[node]
        if kind is NodeType.PARAM:
            return self.names.get(node.name)
        if kind is NodeType.GRAD and node in self.param_of_grad:
            return self.names.get(self.param_of_grad[node].name)
        if kind is NodeType.OPT_STATE and node.name in self.names:
            return self.names[node.name].rpartition(".")[0]  # "<parameter>.<state key>"
        return None

    def module_and_source(self, node: fx.Node) -> tuple[str | None, str | None]:
        source = node.meta.get(SOURCE_KEY)  # (nodes made after the capture have none)
        region = self.analysis.regions[node]
        if region is Region.LOSS:
            return "loss", source
        if region is Region.OPTIMIZER:
            return "optimizer", source
        if node.op == "placeholder":
            kind = self.analysis.kinds[node]
            if kind in (NodeType.PARAM, NodeType.BUFFER) and node.name in self.names:
                return self.names[node.name].rpartition(".")[0] or self.root_module, None
            return ("optimizer" if kind is NodeType.OPT_STATE else None), None
        return node.meta.get(MODULE_KEY), source

    def step_inputs(self) -> list[dict]:
        """Name, shape and dtype of each tensor the step takes besides the
        model's and the optimizer's state (the batch)."""
        inputs = []
        for node in self.analysis.nodes:
            value = node.meta.get("val")
            if node.op == "placeholder" and self.analysis.kinds[node] is NodeType.INPUT \
                    and self.analysis.regions[node] is Region.FORWARD and isinstance(value, torch.Tensor):
                inputs.append({"name": self.names.get(node.name, node.name),
                               "shape": [int(s) for s in value.shape],
                               "dtype": str(value.dtype).removeprefix("torch.")})
        return inputs


def target_name(node: fx.Node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))


def device_name(device: torch.device) -> str:
    """The GPU's name, or "cpu"."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


_OUTSIDE = {
    "before_backward": "between the forward and backward graphs (eager code such as the loss and its backward)",
    "before_forward": "between iterations (eager code such as the optimizer step, zero_grad or data loading)",
}


def outside_peak_notes(graph_peak: int | None, outside: dict[str, int]) -> list[str]:
    """A note when the allocator peaked outside the compiled graphs, where
    no node can show what was allocated."""
    if graph_peak is None or not outside:
        return []
    where, peak = max(outside.items(), key=lambda item: item[1])
    if peak <= graph_peak:
        return []
    return [f"the allocator's peak, {peak:,} B, came outside the compiled graphs, {_OUTSIDE[where]}; "
            f"inside them it reached {graph_peak:,} B. To see that memory node by node, compile the "
            "loss with the model (one torch.compile'd function) or capture the whole step with "
            "capture_train_step."]


def combine_graph_reports(graphs: list[dict], optimizer_state_bytes: int | None, notes: list[str],
                          model: str | None) -> Report:
    """One report for the graphs of a compiled model (report dicts, in the
    order they first ran): nodes and activations of all, tagged with their
    graph's index; top-level memory is the graph with the highest simulated
    peak, plus the optimizer's state when the optimizer is known (it runs
    outside the graphs)."""
    main_index, main = max(enumerate(graphs), key=lambda item: item[1]["memory"]["peak_bytes"])
    notes = list(main["meta"].get("notes", [])) + notes
    if len(graphs) > 1:
        notes.append(f"the model had {len(graphs) - 1} graph break(s): {len(graphs)} graphs, shown in "
                     "execution order under 'graphs'; top-level memory is the graph with the highest peak")
    memory = copy.deepcopy(main["memory"])
    if memory["measured_peak_bytes"] is not None:  # the allocator's peak is the step's, in any graph
        memory["measured_peak_bytes"] = max(g["memory"]["measured_peak_bytes"] for g in graphs)
    if optimizer_state_bytes is None:
        notes.append("optimizer state was not seen: the optimizer runs outside the compiled graph; "
                     "pass options={'optimizer': opt} to count its state as OPT_STATE")
    else:
        kind = NodeType.OPT_STATE.value
        memory["peak_bytes"] += optimizer_state_bytes
        memory["breakdown_at_peak"][kind] = memory["breakdown_at_peak"].get(kind, 0) + optimizer_state_bytes
        length = len(next(iter(memory["timeline"].values()), []))
        memory["timeline"][kind] = [b + optimizer_state_bytes for b in memory["timeline"].get(kind, [0] * length)]
    meta = {**main["meta"], "model": model or main["meta"].get("model"), "graphs": len(graphs),
            "graph_breaks": len(graphs) - 1, "notes": notes,
            "memory_graph": main_index,  # the graph whose memory is at the top level
            "iteration_time_ms": sum(g["meta"]["iteration_time_ms"] for g in graphs),
            "node_time_sum_ms": sum(g["meta"]["node_time_sum_ms"] for g in graphs)}
    data = {"schema": SCHEMA, "meta": meta,
            "nodes": [dict(n, graph=i) for i, g in enumerate(graphs) for n in g["nodes"]],
            "activations": [dict(a, graph=i) for i, g in enumerate(graphs) for a in g["activations"]],
            "storages": [dict(s, graph=i) for i, g in enumerate(graphs) for s in g["storages"]],
            "modules": [], "memory": memory, "graphs": graphs}
    data["modules"] = [as_dict(m) for m in module_records(data, meta["module_depth"])]
    return Report(data)
