"""The rewritten step replayed as one CUDA graph: the host issues the whole
step once, at capture, and each replay runs at the GPU's kernel time.

The first call runs the graph's code for real (a training iteration, which
also loads kernels and grows the allocator), then captures the step, which
runs nothing. Later calls copy the batch into the captured inputs and
replay. Parameters, buffers and optimizer state are updated in place, so
they must stay the tensors the graph was captured with."""

import torch
import torch.utils._pytree as pytree

from ..errors import MutwoError
from ..optimizers import EagerOptimizer


def cuda_graph_unsupported(gm, device: torch.device) -> str | None:
    """Why the step cannot be replayed as a CUDA graph, or None."""
    if device.type != "cuda":
        return f"the step runs on {device.type}, not on a GPU"
    for node in gm.graph.nodes:
        value = node.meta.get("val")
        if node.op == "call_function" and "_local_scalar_dense" in str(node.target):
            return f"{node.name} reads a tensor's value on the host, which a CUDA graph cannot"
        if isinstance(value, torch.Tensor) and any(isinstance(d, torch.SymInt) for d in value.shape):
            return f"{node.name} has a dynamic shape"
        if node.op == "placeholder" and isinstance(value, torch.Tensor) and value.device.type == "cpu" \
                and value.numel() > 0:
            return (f"input {node.name} is a CPU tensor (a non-fused optimizer's step count, say), which a CUDA "
                    "graph cannot update: use Adam(fused=True) or capturable=True")
    return None


class CudaGraphStep:
    """An executor for TrainStepGraph.run: ``(params, buffers, states, args)``
    in, the graph's ``(output, grads)`` out. ``capture_peak_bytes`` is
    ``max_memory_allocated`` over the capture (a replay allocates nothing:
    it reuses those addresses) and ``pool_bytes`` what the graph's memory
    pool took from the GPU."""

    def __init__(self, gm, device: torch.device):
        self.gm, self.device = gm, device
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_state = self.static_args = self.static_output = None
        self.capture_peak_bytes = self.pool_bytes = None

    def __call__(self, params, buffers, states, args):
        if self.graph is None:
            # the real first iteration on a side stream, as CUDA graph capture wants its warm-up
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side), EagerOptimizer():
                output = self.gm(params, buffers, states, args)
            torch.cuda.current_stream(self.device).wait_stream(side)
            self._capture(params, buffers, states, args)
            return output
        self._check_same_state((params, buffers, states))
        for static, new in zip(pytree.tree_leaves(self.static_args), pytree.tree_leaves(args)):
            if isinstance(new, torch.Tensor) and new.data_ptr() != static.data_ptr():
                static.copy_(new)
        self.graph.replay()
        out, grads = self.static_output
        # what train_step returned, copied: the next replay overwrites the graph's own (a loss kept in a list
        # must not change); the gradients are the graph's, as eager's are new each step
        return pytree.tree_map_only(torch.Tensor, torch.clone, out), grads

    def _capture(self, params, buffers, states, args) -> None:
        torch.cuda.synchronize(self.device)
        reserved = torch.cuda.memory_reserved(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.static_args = pytree.tree_map_only(torch.Tensor, torch.clone, args)
        self.static_state = [t.data_ptr() for t in pytree.tree_leaves((params, buffers, states))
                             if isinstance(t, torch.Tensor)]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), EagerOptimizer():
            self.static_output = self.gm(params, buffers, states, self.static_args)
        torch.cuda.synchronize(self.device)
        self.capture_peak_bytes = torch.cuda.max_memory_allocated(self.device)
        self.pool_bytes = torch.cuda.memory_reserved(self.device) - reserved
        self.graph = graph

    def _check_same_state(self, state) -> None:
        now = [t.data_ptr() for t in pytree.tree_leaves(state) if isinstance(t, torch.Tensor)]
        if now != self.static_state:
            raise MutwoError("the model's parameters, buffers or optimizer state are other tensors than when the "
                             "step was captured as a CUDA graph (moved, replaced or re-created): build the "
                             "optimized step again (optimize_train_step), or pass cuda_graph=False.")
