"""Graph analysis passes over fx graphs of a training iteration: boundary,
node kinds, activation liveness, recompute subgraphs, memory simulation.
``run_pipeline`` chains them into one GraphAnalysis."""

from .boundary import Boundary, Region
from .errors import AnalysisError, MutwoError
from .hints import GraphHints
from .kinds import NodeType
from .liveness import ActivationInfo
from .memory import MemorySimulation
from .pipeline import GraphAnalysis, run_pipeline
from .recompute import RecomputeInfo, update_after_recompute

__all__ = [
    "ActivationInfo", "AnalysisError", "Boundary", "GraphAnalysis", "GraphHints", "MemorySimulation",
    "MutwoError", "NodeType", "RecomputeInfo", "Region", "run_pipeline", "update_after_recompute",
]
