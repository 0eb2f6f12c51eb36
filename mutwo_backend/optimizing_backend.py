"""The torch.compile backend "mutwo": "mutwo_profile", then the plan.

Each dynamo graph is profiled as "mutwo_profile" profiles it (its forward
and backward graphs, analysed as one program). Once its report is made,
the program is planned for ``memory_budget`` (a fraction of the graph's
own profiled peak, or bytes for each graph), rewritten (recompute copies
in backward, swaps through the copy streams) and split back into a forward
and a backward graph (runtime/split.py), which run from the next step on,
as the graphs' code.

    compiled = torch.compile(model, backend="mutwo",
                             options={"memory_budget": 0.5, "optimizer": optimizer})
    ... train ...
    mutwo_backend.get_plan(compiled)   # the plan (a list with graph breaks)
"""

import logging
from collections import deque
from dataclasses import dataclass

from torch import fx

from planner import Plan, plan_memory
from planner.budget import budget_bytes

from .backend import BackendOptions, DynamoGraph, _boxed, compile_graph, sessions_of
from .errors import MutwoError
from .runtime.rewrite import rewrite
from .runtime.split import split_program

log = logging.getLogger("mutwo")
BACKEND_NAME = "mutwo"


@dataclass(frozen=True)
class OptimizeOptions(BackendOptions):
    """The options of "mutwo_profile", and the budget the graphs must fit."""

    memory_budget: object = None
    allow_swap: bool | None = None

    BACKEND = BACKEND_NAME

    @classmethod
    def parse(cls, options: dict | None) -> "OptimizeOptions":
        parsed = super().parse(options)
        if parsed.memory_budget is None:
            raise MutwoError('backend "mutwo" needs a memory budget: options={"memory_budget": 0.5} (a fraction '
                             'of each graph\'s profiled peak), bytes, or a size such as "6GiB"')
        budget_bytes(parsed.memory_budget, 1)  # its form, at compile time
        if parsed.after != "run":
            raise MutwoError('backend "mutwo" runs its plan after the profile: option after="keep" is '
                             "mutwo_profile's")
        return parsed


def mutwo(gm: fx.GraphModule, example_inputs, options: dict | None = None, **kwargs):
    """Backend entry point (registered as "mutwo")."""
    return compile_graph(gm, example_inputs, options, OptimizeOptions, OptimizingGraph)


def get_plan(compiled_model) -> Plan | list[Plan] | None:
    """The plan a model compiled with backend="mutwo" runs: one Plan, or,
    for a model dynamo split into several graphs, their Plans in the order
    the graphs first ran; None before the first is made."""
    _, sessions = sessions_of(compiled_model, "get_plan")
    graphs = sorted((g for s in sessions.values() for g in s.graphs if getattr(g, "plan", None) is not None),
                    key=lambda g: g.first_run)
    plans = [g.plan for g in graphs]
    return None if not plans else plans[0] if len(plans) == 1 else plans


class OptimizingGraph(DynamoGraph):
    """A dynamo graph that, once profiled, runs its planned program."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.plan: Plan | None = None
        self.split = None
        self.in_flight: deque[list] = deque()  # values the forward hands the backward beside the slots

    def measured(self) -> None:
        self.plan = plan_memory(self.report, self.options.memory_budget, allow_swap=self.options.allow_swap)
        program = rewrite(self.program.graph, self.plan)
        self.split = split_program(program, self.forward_gm, self.backward_gm, self.program.forward_names,
                                   self.program.backward_names, self.hints.num_fwd_outputs)
        _boxed(self.split.forward)
        _boxed(self.split.backward)
        log.info("graph %d runs its plan: %d recomputed and %d swapped activations, predicted peak %.1f MiB",
                 self.index, self.plan.count("recompute"), self.plan.count("swap"),
                 self.plan.predicted_peak_bytes / 2 ** 20)

    def after_profile(self, forward: bool, fast):
        if self.split is None:
            return fast
        return self._forward if forward else self._backward

    def _forward(self, args):
        outputs = self.split.forward(args)
        if not self.split.extra_count:
            return outputs
        self.in_flight.append(list(outputs[-self.split.extra_count:]))
        return outputs[:-self.split.extra_count]

    def _backward(self, args):
        if self.split.extra_count:
            if not self.in_flight:
                raise MutwoError("a backward ran without its forward's values (backward \"mutwo\" pairs each "
                                 "backward with the latest forward of its graph): run each forward's backward "
                                 "before the next forward, or use backend=\"mutwo_profile\"")
            args = [*args, *self.in_flight.pop()]  # (the latest forward's: autograd runs backwards last first)
        return self.split.backward(args)
