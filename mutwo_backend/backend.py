"""The torch.compile backend "mutwo_profile".

Dynamo hands each captured graph to ``mutwo_profile``; AOTAutograd traces
the joint forward+backward graph and partitions it with its default
partitioner. The program that makes, the forward graph followed by the
backward graph (partitioned.py), is what ``passes.run_pipeline`` analyses
(parameters and buffers known from dynamo's inputs). The forward and
backward graphs run as they are for ``warmup`` iterations, then through the
profiling interpreter for ``iters``; their nodes map by name onto the
analysed program, so liveness, inactive times and swap points span both.
Afterwards the graphs run uninstrumented (``after="run"``) or keep being
profiled (``"keep"``).

A compiled model's report is reachable through ``get_report(compiled_model)``:
sessions are looked up weakly by the model's parameters, so nothing outlives
the model.
"""

import dataclasses
import logging
import weakref
from collections import deque
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import fx
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.partitioners import default_partition
from torch.utils.weak import WeakIdKeyDictionary

from passes import GraphHints, run_pipeline

from .arguments import SWAP_MODES, check_iterations, check_module_depth
from .assemble import DEFAULT_MODULE_DEPTH, assemble_report, combine_graph_reports
from .attribution import annotate, dynamo_attribution, dynamo_input_names, dynamo_model_name
from .device_memory import AllocatorReadings, check_step_fits, out_of_memory_explained
from .errors import MutwoError
from .interpreter import IterationRecord, ProfilingInterpreter, swap_points
from .partitioned import stitch
from .report import Report, ReportNotSavedError, check_report_dir
from .statistics import Statistics
from .swap import prepare_calibration, start_calibration, swap_model
from .timers import TIMERS, default_timer

log = logging.getLogger("mutwo")
AFTER_MODES = ("run", "keep")


@dataclass(frozen=True)
class BackendOptions:
    """Options of ``torch.compile(model, backend="mutwo_profile", options={...})``."""

    warmup: int = 1
    iters: int = 3
    timer: str | None = None
    swap: str = "model"
    report_dir: str | None = None
    optimizer: torch.optim.Optimizer | None = None
    after: str = "run"
    module_depth: int = DEFAULT_MODULE_DEPTH

    BACKEND = "mutwo_profile"

    @classmethod
    def parse(cls, options: dict | None) -> "BackendOptions":
        options = dict(options or {})
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise MutwoError(f"unknown {cls.BACKEND} option(s) {', '.join(map(repr, unknown))}: "
                             f"valid options are {', '.join(valid)}")
        parsed = cls(**options)
        check_iterations(parsed.warmup, parsed.iters)
        for name, value, allowed in (("after", parsed.after, AFTER_MODES), ("swap", parsed.swap, SWAP_MODES),
                                     ("timer", parsed.timer, (None, *TIMERS))):
            if value not in allowed:
                raise MutwoError(f"option {name}={value!r} is not one of "
                                 f"{', '.join(repr(a) for a in allowed if a is not None)}")
        if parsed.optimizer is not None and not isinstance(parsed.optimizer, torch.optim.Optimizer):
            raise MutwoError(f"option optimizer={parsed.optimizer!r} is a {type(parsed.optimizer).__name__}: it "
                             "takes the optimizer object that trains the model (options={'optimizer': opt}, "
                             "opt = torch.optim.Adam(model.parameters())), so that its state is counted.")
        check_module_depth(parsed.module_depth)
        if parsed.report_dir:
            check_report_dir(parsed.report_dir)
        return parsed


# The backend's state: a compiled model's session, weakly keyed by the
# parameters dynamo passes in, so it dies with the model; and the session
# that compiled last, which graphs without parameters join.
_SESSIONS = WeakIdKeyDictionary()
_LATEST_SESSION: "weakref.ref[ProfileSession] | None" = None
_WARNED_NO_GRAPH: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()  # get_report warns once per model


def mutwo_profile(gm: fx.GraphModule, example_inputs, options: dict | None = None, **kwargs):
    """Backend entry point (registered as "mutwo_profile")."""
    return compile_graph(gm, example_inputs, options, BackendOptions, DynamoGraph)


def compile_graph(gm: fx.GraphModule, example_inputs, options: dict | None, options_type, graph_type):
    """One dynamo graph through AOTAutograd, profiled by a ``graph_type``
    (DynamoGraph or a subclass) of the compiled model's session."""
    opts = options_type.parse(options)
    session = _session_for(example_inputs, options, opts)
    graph = graph_type(session, len(session.graphs), example_inputs, dynamo_input_names(gm), dynamo_model_name(gm))
    session.graphs.append(graph)
    return aot_autograd(fw_compiler=graph.compile_forward, bw_compiler=graph.compile_backward,
                        inference_compiler=graph.compile_inference, partition_fn=graph.partition,
                        keep_inference_input_mutations=True)(gm, example_inputs)


def get_report(compiled_model) -> Report | None:
    """The Report of the last completed measurement of a model compiled with
    backend="mutwo_profile" (or "mutwo"), or None before one completes."""
    module, sessions = sessions_of(compiled_model, "get_report")
    if not sessions:
        if module not in _WARNED_NO_GRAPH:
            _WARNED_NO_GRAPH.add(module)
            log.warning(_no_graph_hint(module))
        return None
    graphs = [g for session in sessions.values() for g in session.graphs]
    session = next(iter(sessions.values()))
    if not any(g.report for g in graphs):
        reason, message = _not_measured_yet(graphs, session.options)
        if reason not in session.warned:  # once per reason: get_report is often called in a training loop
            session.warned.add(reason)
            log.warning(message)
        return None
    return _combine_graphs(graphs, session, type(module).__name__)


def sessions_of(compiled_model, caller: str) -> tuple[torch.nn.Module, dict]:
    """The model and the sessions its parameters and buffers belong to."""
    module = getattr(compiled_model, "_orig_mod", compiled_model)
    if not isinstance(module, torch.nn.Module):
        raise MutwoError(f"{caller} takes the compiled model (or the model itself), not a "
                         f"{type(module).__name__}: for a compiled function, pass the model it "
                         f"calls, {caller}(model).")
    sessions = {}
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor in _SESSIONS:
            sessions[id(_SESSIONS[tensor])] = _SESSIONS[tensor]
    return module, sessions


def _not_measured_yet(graphs: list["DynamoGraph"], options: BackendOptions) -> tuple[str, str]:
    """Why no graph is measured yet: (a key for the reason, the message)."""
    needed = options.warmup + options.iters
    training = [g for g in graphs if g.analysis is not None]
    if not training:
        return "inference", ("no report yet: the model has only run without gradients (torch.no_grad(), "
                             "inference); mutwo measures training steps, forward and backward.")
    done = max(g.iterations for g in training)
    return "steps", (f"no report yet: a graph is measured after {needed} training steps (warmup "
                     f"{options.warmup} + iters {options.iters}), and this model's has run {done}.")


def _no_graph_hint(module: torch.nn.Module) -> str:
    rnns = sorted({type(m).__name__ for m in module.modules() if isinstance(m, torch.nn.RNNBase)})
    why = (f"dynamo does not compile {', '.join(rnns)} unless torch._dynamo.config.allow_rnn = True"
           if rnns else "dynamo ran it without compiling it (see TORCH_LOGS=graph_breaks)")
    return ("no graph of this model has reached the mutwo_profile backend: run training steps "
            f"through the compiled model; if you did, {why}.")


def _session_for(example_inputs, options: dict | None, parsed: BackendOptions) -> "ProfileSession":
    """The session of the compiled model these inputs belong to: found through
    a parameter it already saw, or through the options object of the same
    torch.compile call (a graph after a graph break has other parameters).
    A graph without parameters and without options (code after a graph
    break, a loss inside the model) belongs to the model compiled last."""
    global _LATEST_SESSION
    keys = [t for t in example_inputs if isinstance(t, torch.nn.Parameter)]
    session = next((_SESSIONS[k] for k in keys if k in _SESSIONS), None)
    if session is None and options is not None:
        session = next((s for s in _SESSIONS.values() if s.options_id == id(options)), None)
    if session is None and not keys and options is None and _LATEST_SESSION is not None:
        session = _LATEST_SESSION()
    if session is None:
        session = ProfileSession(id(options))
    session.use(parsed)
    for key in keys:
        _SESSIONS[key] = session
    _LATEST_SESSION = weakref.ref(session)
    return session


class ProfileSession:
    """All dynamo graphs of one compiled model, and its latest report.

    A session lives as long as the model's parameters (it is their value in
    _SESSIONS), so it must not reference them: it holds the optimizer weakly
    and the options dict of torch.compile by id, and its graphs hold no
    example inputs. Otherwise profiling a model would keep its parameters
    and optimizer state in memory after the user dropped them."""

    def __init__(self, options_id: int | None):
        self.options_id = options_id  # id() of the dict given to torch.compile
        self.graphs: list[DynamoGraph] = []
        self._first_runs = 0
        self.warned: set[str] = set()  # the reasons get_report has warned of

    def use(self, options: BackendOptions) -> None:
        """Take the options of the latest compilation."""
        self._optimizer = weakref.ref(options.optimizer) if options.optimizer is not None else None
        self.options = dataclasses.replace(options, optimizer=None)

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        return self._optimizer() if self._optimizer is not None else None

    def next_run_order(self) -> int:
        """Position of a graph's first run among the session's graphs."""
        self._first_runs += 1
        return self._first_runs

    def graph_measured(self) -> None:
        """Called when a graph completes a measurement (inside the user's
        backward): save the report. A failed save is logged, not raised, so
        training goes on; get_report still returns the report."""
        if self.options.report_dir:
            try:
                path = _combine_graphs(self.graphs, self).save(self.options.report_dir)
            except ReportNotSavedError as error:
                log.warning("%s (get_report(compiled_model) returns it)", error)
                return
            log.info("mutwo report saved to %s", path)


class DynamoGraph:
    """One dynamo graph: the analysis of its partitioned program and its profiled fw/bw graphs."""

    def __init__(self, session: ProfileSession, index: int, example_inputs, input_names: list[str | None],
                 model_name: str | None):
        self.session, self.index = session, index
        self.input_names, self.model_name = input_names, model_name  # parameter names, the root's class
        self.options = session.options
        self.device = _device_of(example_inputs)
        prepare_calibration(self.device)  # host buffer touched while compiling, copies queued at the first run
        self.timer = self.options.timer or default_timer(self.device)
        # (is a Parameter, requires grad) per input; not the tensors, which a graph must not keep alive
        self.input_roles = [(isinstance(t, torch.nn.Parameter), bool(getattr(t, "requires_grad", False)))
                            for t in example_inputs]
        param_ids = frozenset(id(t) for t in example_inputs if isinstance(t, torch.nn.Parameter))
        # recompilations of one graph (new shapes, new constants) share its parameters
        self.key = param_ids or id(self)
        self.program = None  # set with the analysis, when AOTAutograd partitions a training graph
        self.analysis = None
        self.report = None
        self.first_run = None
        self.iterations = 0
        self.stats = Statistics()
        # forward records waiting for their backward; bounded in case forwards
        # run without backward
        self.pending_forward: deque[IterationRecord] = deque(maxlen=8)
        self.instrumenting = True

    # --- AOTAutograd hooks ---------------------------------------------------

    def partition(self, joint: fx.GraphModule, joint_inputs, *, num_fwd_outputs, **kwargs):
        """AOTAutograd's default partition, and the analysis of the program it
        makes (partitioned.py): what it saves and recomputes for backward."""
        static = kwargs.get("static_lifetime_input_indices") or []
        forward, backward = default_partition(joint, joint_inputs, num_fwd_outputs=num_fwd_outputs, **kwargs)
        self.program = stitch(forward, backward, num_fwd_outputs)
        graph = self.program.graph
        for node in graph.graph.nodes:  # the module and source line reports show, from dynamo's meta
            annotate(node, dynamo_attribution(node))
        self.hints = self._hints(graph, num_fwd_outputs, static)
        self.analysis = run_pipeline(graph, self.hints, allocator_rounding=self.device.type == "cuda")
        return forward, backward

    def compile_forward(self, gm: fx.GraphModule, example_inputs):
        self.forward_gm = gm
        return self._runner(gm, forward=True)

    def compile_backward(self, gm: fx.GraphModule, example_inputs):
        self.backward_gm = gm
        return self._runner(gm, forward=False)

    def compile_inference(self, gm: fx.GraphModule, example_inputs):
        """No backward: nothing to profile; run the graph as it is."""
        return _boxed(gm)

    # --- running ------------------------------------------------------------

    def _hints(self, program: fx.GraphModule, num_fwd_outputs: int, static_indices) -> GraphHints:
        """Parameters are dynamo inputs of type Parameter; buffers are the other
        inputs AOTAutograd marks static (their lifetime is the model's)."""
        primals = [n for n in program.graph.nodes if n.op == "placeholder" and n.name.startswith("primals")]
        params, buffers, frozen, names = set(), set(), set(), {}
        for index, (node, (is_param, requires_grad), name) in enumerate(zip(primals, self.input_roles,
                                                                            self.input_names)):
            if name is not None:
                names[node.name] = name
            if is_param:
                params.add(node.name)
                if not requires_grad:
                    frozen.add(node.name)
            elif index in static_indices:
                buffers.add(node.name)
        return GraphHints(params=frozenset(params), buffers=frozenset(buffers),
                          frozen_params=frozenset(frozen), num_fwd_outputs=num_fwd_outputs, names=names)

    def _runner(self, gm: fx.GraphModule, forward: bool):
        # this graph's node names -> the analysed program's
        names = self.program.forward_names if forward else self.program.backward_names
        ours = {names[n.name]: n.name for n in gm.graph.nodes if n.name in names}
        rank = {n.name: r for n, r in self.analysis.rank.items()}
        swap_out, swap_in = swap_points(self.analysis, set(ours))
        swaps = {ours[at]: values for at, values in (swap_out if forward else swap_in).items()}
        interpreter = ProfilingInterpreter(gm, self.device, self.timer, swaps if forward else {},
                                           {} if forward else swaps,
                                           measure_swaps=self.options.swap == "measure")
        # rank in the analysed program of each interpreted node that computes something
        ranks = np.array([rank[names[n.name]] if n.op not in ("placeholder", "output") and n.name in names
                          else -1 for n in interpreter.nodes])
        fast = _boxed(gm)
        allocator = AllocatorReadings(self.device) if self.device.type == "cuda" else None

        def open_peak_window(wait_for_calibration: bool) -> None:
            """From here the allocator's peak counts for the measured runs (the
            first one's ``before_forward``). The swap calibration's copies are
            waited for before the last such reset: they do not run beside a
            measured run, and their device buffer is not counted."""
            if wait_for_calibration:
                swap_model(self.device)
            if allocator is not None:
                allocator.reset_peak()

        def run_graph(args):
            if forward and self.first_run is None:
                self.first_run = self.session.next_run_order()
                check_step_fits(self.device, self.analysis)  # before the graphs first run
                # the calibration's copies run beside the warm-up, when the GPU has room
                # (queued here, where tensors are real: partition runs under fake tensors)
                start_calibration(self.device, self.analysis.memory.peak_bytes)
                if self.instrumenting and self.options.warmup == 0:  # no warm-up run opens it
                    open_peak_window(wait_for_calibration=True)
            if not self.instrumenting:
                return self.after_profile(forward, fast)(args)
            if self.iterations < self.options.warmup:  # first-run costs, paid at full speed
                out = fast(args)
                self.iterations += not forward
                open_peak_window(wait_for_calibration=self.iterations == self.options.warmup)
                return out
            # the allocator is read in the forward and backward runs of one
            # iteration: the last before the report (with no warm-up, the
            # first iteration creates the optimizer's state), or a later one
            # once the records that held its readings are dropped ("keep")
            opts = self.options
            read_memory = (self.iterations >= opts.warmup + opts.iters - 1 and not self.stats.has_memory()
                           if forward else
                           bool(self.pending_forward) and self.pending_forward[0][0].peak_bytes is not None)
            out, record = interpreter.run_iteration(args, boxed=True, read_memory=read_memory)
            self._recorded(record, ranks, forward)
            return out

        which = "forward graph" if forward else "backward graph"

        def run(args):
            if not self.instrumenting:  # the user's training after the profile: errors left as they are
                return run_graph(args)
            with out_of_memory_explained(self.device, self.analysis, which):
                return run_graph(args)

        run._boxed_call = True
        return run

    def after_profile(self, forward: bool, fast):
        """What runs the forward or backward graph once the profile is done:
        the graph as it is (a subclass runs its own)."""
        return fast

    def measured(self) -> None:
        """Called once a report is made (a subclass plans from it)."""

    def _recorded(self, record: IterationRecord, ranks: np.ndarray, forward: bool) -> None:
        if forward:
            self.pending_forward.append((record, ranks))
            return
        forward_record, forward_ranks = self.pending_forward.popleft()
        self.stats.add(_joint_record(len(self.analysis.nodes), [(forward_record, forward_ranks), (record, ranks)]))
        self.iterations += 1
        opts = self.options
        if self.iterations >= opts.warmup + opts.iters and len(self.stats.records) >= opts.iters:
            self.stats.records = self.stats.records[-opts.iters:]
            self.report = assemble_report(self.analysis, self.stats.aggregate(), device=self.device,
                                          timer=self.timer, swap=opts.swap, swap_model=swap_model(self.device),
                                          meta={"model": self.model_name, "capture": "compile",
                                                "graph_index": self.index, "warmup": opts.warmup},
                                          hints=self.hints, root_module=self.model_name,
                                          module_depth=opts.module_depth)
            self.session.graph_measured()
            self.measured()
            if opts.after == "run":
                self.instrumenting = False
                self.stats.reset()
                self.pending_forward.clear()


def _joint_record(count: int, parts) -> IterationRecord:
    """Place the per-node records of the forward and backward graphs at their
    ranks in the analysed program; nodes of neither (placeholders) take 0 ms, and the allocator
    readings of the previous executed node."""
    run_time = np.zeros(count)
    memory = None
    if parts[0][0].peak_bytes is not None:
        memory = np.full((2, count), -1, dtype=np.int64)
    for record, ranks in parts:
        mask = ranks >= 0
        run_time[ranks[mask]] += record.run_time_ms[mask]
        if memory is not None:
            for row, values in enumerate((record.allocated_after_bytes, record.peak_bytes)):
                memory[row, ranks[mask]] = values[mask]
    (forward, _), (backward, _) = parts
    outside = {"before_forward": forward.peak_before_bytes, "before_backward": backward.peak_before_bytes}
    joint = IterationRecord(run_time, sum(r.wall_ms for r, _ in parts),
                            outside_peak_bytes={k: v for k, v in outside.items() if v is not None},
                            swap_out_measured_ms={k: v for r, _ in parts for k, v in r.swap_out_measured_ms.items()},
                            swap_in_measured_ms={k: v for r, _ in parts for k, v in r.swap_in_measured_ms.items()})
    if memory is not None:
        joint.allocated_after_bytes, joint.peak_bytes = (_forward_fill(row) for row in memory)
    return joint


def _forward_fill(values: np.ndarray) -> np.ndarray:
    known = np.where(values >= 0, np.arange(len(values)), 0)
    np.maximum.accumulate(known, out=known)
    filled = values[known]
    return np.where(filled >= 0, filled, 0)


def _combine_graphs(graphs: list["DynamoGraph"], session: ProfileSession, model: str | None = None) -> Report:
    """One report for all measured graphs of a compiled model, in the order
    they first ran."""
    latest = {}  # a recompilation (new shapes) replaces the graph of the same parameters
    for graph in graphs:
        if graph.report is not None:
            latest[graph.key] = graph
    measured = sorted(latest.values(), key=lambda g: g.first_run)
    return combine_graph_reports([g.report.to_dict() for g in measured], _optimizer_state_bytes(session.optimizer),
                                 _unmeasured_note(graphs, latest, session.options),
                                 model or next((g.model_name for g in measured if g.model_name), None))


def _unmeasured_note(graphs: list["DynamoGraph"], measured: dict, options: BackendOptions) -> list[str]:
    """A note for graphs that ran but are in no report, so that a missing
    part of the model is never silent."""
    waiting = {}
    for graph in graphs:
        if graph.key not in measured:
            waiting.setdefault(graph.key, []).append(graph)
    if not waiting:
        return []
    compiles = max(len(versions) for versions in waiting.values())
    runs = options.warmup + options.iters
    why = (f"one was compiled {compiles} times: dynamo recompiles when a Python value read from a "
           "tensor (such as .item()) becomes a constant of the next graph; set "
           "torch._dynamo.config.capture_scalar_outputs = True or move the read out of the model"
           if compiles > 1 else "run more training steps")
    return [f"{len(waiting)} more graph(s) of this model ran but are not in the report: a graph is "
            f"measured after {runs} runs (warmup + iters) of one compilation, and {why}"]


def _optimizer_state_bytes(optimizer) -> int | None:
    if optimizer is None:
        return None
    return sum(v.untyped_storage().nbytes() for state in optimizer.state.values()
               for v in state.values() if isinstance(v, torch.Tensor))


def _boxed(gm: fx.GraphModule):
    """``gm`` recompiled to take one list that its code empties, so inputs are
    freed at their last use as AOTAutograd expects. Its graph stays as it
    is, so the profiling interpreter runs the same nodes."""
    gm.graph.set_codegen(fx.graph._BoxedCodeGen())
    gm.recompile()
    return gm


def _device_of(example_inputs) -> torch.device:
    devices = {t.device for t in example_inputs if isinstance(t, torch.Tensor)}
    return next((d for d in devices if d.type == "cuda"), torch.device("cpu"))


BACKEND_NAME = "mutwo_profile"


def register() -> None:
    """Register the backends with dynamo unless the package's entry points
    (or an earlier import) already did."""
    from .optimizing_backend import BACKEND_NAME as OPTIMIZING, mutwo

    registered = torch._dynamo.list_backends(exclude_tags=())
    for name, backend in ((BACKEND_NAME, mutwo_profile), (OPTIMIZING, mutwo)):
        if name not in registered:
            torch._dynamo.register_backend(backend, name=name)
