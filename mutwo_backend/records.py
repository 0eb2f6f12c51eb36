"""The records of a report, schema "mutwo.report/2": one dataclass per
record type, serialized in one place (``to_json``), and the schema's field
list read off the dataclasses (``SCHEMA_FIELDS``). Plain values only, no
torch: the plot processes read reports without importing it.

Units live in the names: ``_ms`` milliseconds, ``_bytes`` bytes; ranks are
positions in graph order. Region and kind names are those of
passes.enums."""

import dataclasses
import types
import typing
from dataclasses import dataclass, field

SCHEMA = "mutwo.report/2"
SCHEMA_V1 = "mutwo.report/1"
WORKLESS_OPS = ("placeholder", "output")  # graph inputs and the output node: no work, whatever their time


@dataclass(frozen=True)
class Meta:
    """What was profiled and how. ``Report.add_meta`` adds fields the caller
    knows (batch_size, seq_len, optimizer, ...)."""

    model: str | None
    capture: str  # "train-step" or "compile"
    capture_method: str | None  # "recorded" or "traced" (train-step), None (compile)
    warmup: int
    iters: int
    device: str
    device_name: str
    torch_version: str
    timer: str
    iteration_time_ms: float  # median over the measured iterations of the sum of node times
    node_time_sum_ms: float  # sum of the median times of the ops (report.is_work): what shares divide
    instrumented_wall_ms: float
    swap: str
    swap_model: dict
    module_depth: int  # depth of the "modules" section
    inputs: list  # [{"name", "shape", "dtype"}] per input of the step (not parameters or state)
    notes: list


@dataclass(frozen=True)
class NodeRecord:
    """One fx node. ``module``: the model module it came from
    (``layer3.4.conv2``; a backward node: the module of the forward op it
    differentiates), ``loss``, ``optimizer``, or None where the capture
    cannot tell; ``source``: ``file:line`` of the code that issued it;
    ``param``: the parameter's name for PARAM, GRAD and OPT_STATE nodes.
    ``inputs``: the nodes it reads; ``storages``: the storages its value
    refers to, so that every read of a storage can be found.
    ``output_bytes``: what the node newly allocates (0 for views and
    in-place ops). ``peak_bytes`` / ``active_bytes``: the allocator's peak
    while it runs and bytes allocated after it (GPU), else the simulation's.
    ``simulated_during_bytes`` / ``simulated_live_bytes``: simulated bytes
    live while it runs / after it."""

    name: str
    rank: int
    op: str
    target: str
    region: str
    kind: str
    module: str | None
    source: str | None
    param: str | None
    inputs: list
    storages: list  # ids of the storages its value refers to (its own, those it views, a tuple's items')
    run_time_ms: float
    run_time_min_ms: float
    run_time_max_ms: float
    peak_bytes: int
    active_bytes: int
    output_bytes: int
    simulated_live_bytes: int
    simulated_during_bytes: int


@dataclass(frozen=True)
class ActivationRecord:
    """One activation: a forward value read in backward. ``memory_bytes`` is
    its storage's size, counted on the first activation of a storage only;
    ``storage`` is that storage's id (the ``storages`` section), shared by
    every value viewing it, and ``base`` the node whose storage it views
    (None when it owns it)."""

    name: str
    module: str | None
    source: str | None
    storage: int
    base: str | None
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
    recompute_srcs: list
    recompute_nodes: list
    recompute_replays_sep: bool  # recompute_nodes run separator.sep (replayed as a plain view)
    recompute_time_ms: float
    recompute_peak_bytes: int  # most extra memory alive while recomputing it
    recompute_ratio: float | None  # memory_bytes / recompute_time_ms, bytes per ms
    recomputable: bool
    recompute_reason: str | None


@dataclass(frozen=True)
class StorageRecord:
    """One storage of the simulation: every value that views it shares its
    ``id``. Live after rank r when ``allocated_rank <= r < freed_rank``;
    ``freed_rank`` is where the profiled run frees it (eager's references
    kept: ``out = model(x)``, ``.grad``), None when it outlives the step
    (graph inputs and outputs); ``last_use_rank`` its last use in the graph."""

    id: int
    memory_bytes: int
    kind: str
    creator: str
    resident: bool  # a graph input: allocated before the step
    allocated_rank: int
    freed_rank: int | None
    last_use_rank: int


@dataclass(frozen=True)
class ModuleRecord:
    """Totals of the nodes of one module path cut to the report's module
    depth. ``activation_bytes_at_peak``: activation storages created by the
    module and live at the simulated peak; ``recompute_candidates``: its
    recomputable activations that hold bytes."""

    module: str
    nodes: int
    time_ms: float
    forward_ms: float
    backward_ms: float
    activations: int
    activation_bytes: int
    activation_bytes_at_peak: int
    recompute_candidates: int
    recompute_candidate_bytes: int


@dataclass(frozen=True)
class MemoryRecord:
    """The simulated peak and timeline (bytes per kind after each node), and
    on a GPU the allocator's measurements (None on the CPU)."""

    peak_bytes: int
    peak_rank: int
    breakdown_at_peak: dict
    timeline: dict
    measured_peak_bytes: int | None
    measured_graph_peak_bytes: int | None
    outside_graphs_peak_bytes: dict | None
    measured_allocated_after_bytes: list | None


@dataclass(frozen=True)
class ReportRecords:
    """A whole report of one graph, but its ``modules`` section, which is
    derived from these records (report.module_records)."""

    meta: Meta
    nodes: list[NodeRecord]
    activations: list[ActivationRecord]
    storages: list[StorageRecord]
    memory: MemoryRecord
    extra_meta: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        """The report as JSON-ready values: the one serialization of records."""
        return {"schema": SCHEMA, "meta": {**as_dict(self.meta), **self.extra_meta},
                "nodes": [as_dict(n) for n in self.nodes],
                "activations": [as_dict(a) for a in self.activations],
                "storages": [as_dict(s) for s in self.storages],
                "memory": as_dict(self.memory)}


def as_dict(record) -> dict:
    """A record's fields as a dict (shallow: its values are plain already).
    A dataclass's instance dict holds exactly its fields, in order, and is
    read without dataclasses.fields' per-call work (ten thousand records a report)."""
    return dict(vars(record))


def _json_types(annotation) -> tuple[type, ...]:
    """The JSON value types an annotation admits (a float field takes ints too)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return tuple(t for arg in typing.get_args(annotation) for t in _json_types(arg))
    if annotation is type(None) or annotation is None:
        return (type(None),)
    origin = typing.get_origin(annotation) or annotation
    return (int, float) if origin is float else (origin,)


def _fields(record_type) -> dict[str, tuple[type, ...]]:
    hints = typing.get_type_hints(record_type)
    return {f.name: _json_types(hints[f.name]) for f in dataclasses.fields(record_type) if f.name in hints}


# section -> {field: JSON types}; list sections hold one such record per item
SCHEMA_FIELDS = {"meta": _fields(Meta), "nodes": _fields(NodeRecord), "activations": _fields(ActivationRecord),
                 "storages": _fields(StorageRecord), "modules": _fields(ModuleRecord),
                 "memory": _fields(MemoryRecord)}
LIST_SECTIONS = ("nodes", "activations", "storages", "modules")
