"""The planning problem read off a report's records (schema mutwo.report/2):
node times, storage lifetimes and the activations a plan may drop. Plain
data: the planner never sees fx or torch.

Memory is counted per storage, as the report's ``storages`` give it: every
activation that views a storage shares its bytes, so a storage is dropped
(recomputed or swapped) whole, with every activation on it, or kept. A
*candidate* is such a storage, made in forward and read in backward.

The step a plan runs frees every value at its last use in the graph
(``last_use_rank``), not where eager drops its references; the measured
peak's excess over the simulated one (cuDNN workspaces and the like) is
carried as ``offset_bytes``, so that predictions are of the kind
``max_memory_allocated`` reports."""

import dataclasses
import functools
import hashlib
from dataclasses import dataclass

import numpy as np

from .errors import PlanningError


@dataclass(frozen=True)
class CopyCost:
    """One copy direction: a fixed latency plus bytes over bandwidth (the
    swap model's form: mutwo_backend/swap.py fits it on the GPU)."""

    latency_ms: float
    bytes_per_ms: float

    def time_ms(self, nbytes: int) -> float:
        return self.latency_ms + nbytes / self.bytes_per_ms


@dataclass
class Candidate:
    """A storage a plan may drop. ``recompute_nodes`` / ``recompute_srcs``
    are node names (the nodes that rebuild every activation on the storage,
    in graph order, and the values they read); ``recompute_ms`` their
    summed median times. Mutable: choosing other candidates changes how
    this one is rebuilt (μ-TWO's Algorithms E and F)."""

    index: int
    storage: int
    memory_bytes: int
    activations: tuple[str, ...]  # every activation on the storage, in creation order
    creation_rank: int
    last_fw_rank: int  # the last access before backward: from here to first_bw_rank it can be away
    first_bw_rank: int
    last_use_rank: int
    inactive_time_ms: float
    recomputable: bool
    recompute_reason: str | None  # why not, when not (the report's)
    recompute_nodes: tuple[str, ...]
    recompute_srcs: tuple[str, ...]
    recompute_ms: float
    swap_out_ms: float
    swap_in_ms: float
    recompute_count: int = 1

    @property
    def total_recompute_ms(self) -> float:
        return self.recompute_count * self.recompute_ms

    @property
    def recompute_ratio(self) -> float:
        """Bytes freed per ms of recomputation (μ-TWO's recompute_ratio)."""
        return self.memory_bytes / max(self.total_recompute_ms, 1e-9)


@dataclass(frozen=True)
class PlanningProblem:
    """Everything the solvers read. Arrays are indexed by rank or by
    storage id; ``node_start_ms[r]`` is when node r starts if the nodes run
    end to end at their median times."""

    node_names: tuple[str, ...]
    node_storages: tuple[tuple[int, ...], ...]  # the storages each node's value refers to
    node_inputs: tuple[tuple[int, ...], ...]  # the ranks of the values each node reads
    node_in_place: np.ndarray  # bool: an in-place op (a replay runs it out of place, on a new storage)
    node_ms: np.ndarray
    node_start_ms: np.ndarray
    storage_bytes: np.ndarray
    storage_alloc_rank: np.ndarray
    storage_free_rank: np.ndarray  # last use; the last rank for storages that outlive the step
    storage_kind: tuple[str, ...]
    candidates: tuple[Candidate, ...]
    offset_bytes: int  # measured peak minus simulated peak of the profiled run (0 on the CPU)
    baseline_peak_bytes: int  # the profile's peak: measured on a GPU, simulated on the CPU
    baseline_iteration_ms: float  # sum of the ops' median times
    device_to_host: CopyCost
    host_to_device: CopyCost
    on_gpu: bool
    fingerprint: str

    @functools.cached_property
    def rank_of(self) -> dict[str, int]:
        return {name: rank for rank, name in enumerate(self.node_names)}

    def holders(self) -> dict[str, int]:
        """Activation name -> index of the candidate holding its storage
        (the values recompute lists name as sources)."""
        return {name: c.index for c in self.candidates for name in c.activations}


def graph_fingerprint(nodes: list[dict]) -> str:
    """A digest of the graph's nodes (names and targets, in order): a plan
    applies to the graph its report came from and to no other."""
    digest = hashlib.sha256()
    for node in nodes:
        digest.update(f"{node['name']}\t{node['target']}\n".encode())
    return digest.hexdigest()[:16]


def planning_problem(data: dict) -> PlanningProblem:
    """The problem of one graph's report (a report dict, or one graph of a
    compile report's ``graphs``)."""
    if data.get("schema", "mutwo.report/2") != "mutwo.report/2" or "storages" not in data:
        raise PlanningError(
            f"this report is of schema {data.get('schema')!r}, which lacks what the planner reads (storages, "
            "each node's storages and inputs): profile the step again with this version of mutwo, which "
            "writes schema mutwo.report/2.")
    nodes, memory = data["nodes"], data["memory"]
    count = len(nodes)
    node_ms = np.array([n["run_time_ms"] if n["op"] not in ("placeholder", "output") else 0.0 for n in nodes])
    start_ms = np.concatenate([[0.0], np.cumsum(node_ms)[:-1]])
    storages = data["storages"]
    size = len(storages)
    storage_bytes = np.zeros(size, dtype=np.int64)
    alloc = np.zeros(size, dtype=np.int64)
    free = np.zeros(size, dtype=np.int64)
    kinds = [""] * size
    for s in storages:
        storage_bytes[s["id"]] = s["memory_bytes"]
        alloc[s["id"]] = s["allocated_rank"]
        outlives = s["resident"] or s["freed_rank"] is None
        free[s["id"]] = count - 1 if outlives else s["last_use_rank"]
        kinds[s["id"]] = s["kind"]
    measured = memory.get("measured_peak_bytes")
    swap = data["meta"]["swap_model"]
    problem = PlanningProblem(
        node_names=tuple(n["name"] for n in nodes), node_storages=tuple(tuple(n["storages"]) for n in nodes),
        node_inputs=_input_ranks(nodes), node_in_place=np.array([_in_place(n["target"]) for n in nodes]),
        node_ms=node_ms, node_start_ms=start_ms,
        storage_bytes=storage_bytes, storage_alloc_rank=alloc, storage_free_rank=free, storage_kind=tuple(kinds),
        candidates=(), offset_bytes=max(0, measured - memory["peak_bytes"]) if measured is not None else 0,
        baseline_peak_bytes=measured if measured is not None else memory["peak_bytes"],
        baseline_iteration_ms=float(node_ms.sum()),
        device_to_host=CopyCost(swap["d2h_latency_ms"], swap["d2h_bandwidth_gb_s"] * 1e6),
        host_to_device=CopyCost(swap["h2d_latency_ms"], swap["h2d_bandwidth_gb_s"] * 1e6),
        on_gpu=measured is not None, fingerprint=graph_fingerprint(nodes))
    return _with_candidates(problem, data)


def _input_ranks(nodes: list[dict]) -> tuple[tuple[int, ...], ...]:
    rank = {n["name"]: n["rank"] for n in nodes}
    return tuple(tuple(rank[i] for i in n["inputs"]) for n in nodes)


def _in_place(target: str) -> bool:
    """An aten in-place op, by its name: ``relu_.default``, ``add_.Tensor``
    (the report's target; the schema name ends with an underscore)."""
    packet = target.split(".")[-2] if target.count(".") >= 1 else target
    return packet.endswith("_") and not packet.startswith("_")


def storage_accesses(nodes: list[dict]) -> dict[int, list[int]]:
    """Storage id -> ranks of the nodes that make a value on it or read one."""
    storages_of = {n["name"]: n["storages"] for n in nodes}
    accesses: dict[int, set[int]] = {}
    for node in nodes:
        touched = set(node["storages"]).union(*(storages_of[i] for i in node["inputs"]))
        for storage in touched:
            accesses.setdefault(storage, set()).add(node["rank"])
    return {storage: sorted(ranks) for storage, ranks in accesses.items()}


def _with_candidates(problem: PlanningProblem, data: dict) -> PlanningProblem:
    """One candidate per activation storage made in forward (not a graph
    input's, not one the graph returns) that holds bytes."""
    by_storage: dict[int, list[dict]] = {}
    for act in data["activations"]:
        by_storage.setdefault(act["storage"], []).append(act)
    rank = problem.rank_of
    accesses = storage_accesses(data["nodes"])
    candidates = []
    returned = {n["rank"] for n in data["nodes"] if n["op"] == "output"}
    for storage_id, acts in by_storage.items():
        nbytes = int(problem.storage_bytes[storage_id])
        if nbytes == 0 or data["storages"][storage_id]["resident"] or returned & set(accesses[storage_id]):
            continue  # (a value the graph returns stays alive for its caller: dropping it frees nothing)
        nodes = {name for a in acts for name in a["recompute_nodes"]}
        made_inside = nodes | {a["name"] for a in acts}
        srcs = {name for a in acts for name in a["recompute_srcs"]} - made_inside
        first_bw = min(a["first_bw_rank"] for a in acts)
        # the last touch before backward: a forward read, or one by a value that is no activation
        # (the loss's detach of log_softmax's output)
        last_fw = max(r for r in accesses[storage_id] if r < first_bw)
        ordered = tuple(sorted(nodes, key=rank.__getitem__))
        recompute_ms = float(sum(problem.node_ms[rank[n]] for n in ordered))
        candidates.append(Candidate(
            index=len(candidates), storage=storage_id, memory_bytes=nbytes,
            activations=tuple(a["name"] for a in sorted(acts, key=lambda a: a["creation_rank"])),
            creation_rank=min(a["creation_rank"] for a in acts), last_fw_rank=last_fw, first_bw_rank=first_bw,
            last_use_rank=int(problem.storage_free_rank[storage_id]),
            inactive_time_ms=float(problem.node_start_ms[first_bw] - problem.node_start_ms[last_fw]
                                   - problem.node_ms[last_fw]),
            recomputable=all(a["recomputable"] for a in acts) and bool(ordered),
            recompute_reason=next((a["recompute_reason"] for a in acts if a["recompute_reason"]), None),
            recompute_nodes=ordered, recompute_srcs=tuple(sorted(srcs, key=rank.__getitem__)),
            recompute_ms=recompute_ms,
            swap_out_ms=problem.device_to_host.time_ms(nbytes), swap_in_ms=problem.host_to_device.time_ms(nbytes)))
    return dataclasses.replace(problem, candidates=tuple(candidates))
