"""Stage 3: the plan made real: the rewritten graph (rewrite), the copy
streams its swaps run on, and the optimized step (graph code or one CUDA
graph replay)."""

from .rewrite import RewriteError, rewrite
from .step import OptimizedStep, optimize_train_step

__all__ = ["OptimizedStep", "RewriteError", "optimize_train_step", "rewrite"]
