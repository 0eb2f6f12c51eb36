"""What a capture path knows about a graph's inputs that the graph alone does not say."""

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping


@dataclass(frozen=True)
class GraphHints:
    """Placeholder names by role, given by the capture that made the graph.

    Placeholders named in none of the sets are user inputs (INPUT).
    ``num_fwd_outputs`` is set for AOTAutograd joint graphs: the joint
    outputs before it are forward outputs, the rest one gradient per primal
    (None where a primal gets no gradient). ``names`` maps placeholders to the
    qualified names reports show (``layer1.0.conv1.weight``). ``freed_after``
    maps a node to the node after which eager drops its last reference (a
    train-step capture sees the user's references: ``out = model(x)``,
    ``.grad``); a storage lives at least that long."""

    params: frozenset[str] = frozenset()
    buffers: frozenset[str] = frozenset()
    opt_states: frozenset[str] = frozenset()
    frozen_params: frozenset[str] = frozenset()
    num_fwd_outputs: int | None = None
    names: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    freed_after: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
