"""When eager training frees each value of a captured train step.

A graph can free a value after its last reader; eager frees a tensor when
its last reference goes. The two differ where the user's code holds a
reference: ``out = model(x)`` keeps the model output alive through backward
and the optimizer step, ``.grad`` keeps a gradient until ``zero_grad``. The
capture runs the user's real Python code, so those references are real
while it runs: ``EagerLifetimes`` (told each op's results while make_fx
traces on fake tensors; the recorder of recording.py does the same for a
recorded step) watches every tensor an op returns and, when Python
collects it, notes the last node traced so far. The memory pass and the profiling interpreter then free each
value where eager would (never before the graph's last read of it).
"""

import weakref

import torch.utils._pytree as pytree
from torch import Tensor, fx
from torch.fx.experimental.proxy_tensor import get_proxy_slot


class LastReferences:
    """For each watched value, the latest node recorded when Python dropped
    the tensor that holds it."""

    def __init__(self):
        self._died: dict[fx.Node, fx.Node] = {}
        self._watched: list[fx.Node] = []
        self._latest: fx.Node | None = None

    def watch(self, tensor: Tensor, node: fx.Node) -> None:
        """``tensor`` is ``node``'s value, just made: the latest node so far."""
        self._latest = node
        self._watched.append(node)
        weakref.finalize(tensor, self._note_death, node)

    def _note_death(self, node: fx.Node) -> None:
        if self._latest is not None:
            self._died[node] = self._latest

    def freed_after(self, last: fx.Node) -> dict[str, str]:
        """Watched node name -> the name of the node after which eager
        dropped its last reference. Values still referenced when the step
        ended (outputs, values a module or the optimizer kept) live to ``last``."""
        return {node.name: self._died.get(node, last).name for node in self._watched}


class EagerLifetimes:
    """For make_fx: a dispatch mode inside it, around the user's code, calls
    ``watch_outputs`` with each op's results. Afterwards
    ``freed_after(output_node)`` maps each watched node's name to the name of
    the node after which eager dropped its last reference."""

    def __init__(self):
        self.references = LastReferences()

    def watch_outputs(self, out, tracer) -> None:
        """Watch the tensors among ``out`` (an op's results) that ``tracer`` (make_fx's) holds nodes for."""
        for value in pytree.tree_leaves(out):
            if isinstance(value, Tensor):
                traced = get_proxy_slot(value, tracer, None)
                if traced is not None:
                    self.references.watch(value, traced.proxy.node)

    def freed_after(self, last: fx.Node) -> dict[str, str]:
        return self.references.freed_after(last)
