"""Which module of the model and which line of user code issued each op.

A report that says ``layer3.4.conv2`` and ``resnet.py:150`` points the user
at their model; ``convolution_140`` does not. Every call_function node a
capture creates carries two keys in ``node.meta``:

- ``MODULE_KEY`` ("mutwo_module"): the path of the innermost module of the
  model whose forward issued the op, as ``model.named_modules()`` names it
  (``layer3.4.conv2``); the root model's class name (``ResNet``) for ops of
  its own forward; None for ops outside the model (the loss in train_step,
  the optimizer step).
- ``SOURCE_KEY`` ("mutwo_source"): ``"<file>:<line>"`` of the innermost
  frame of user code that issued the op, or None. User code is any file
  outside torch, this project (mutwo_backend/, passes/) and Python's
  contextlib and functools: the model's own code in torchvision or
  transformers counts.

A backward op takes both from the forward op it differentiates: autograd
numbers the nodes it creates (sequence numbers), the attribution notes the
numbers each forward op created, and during backward it looks up the
number of the autograd node being run.

``OpAttribution`` serves both capture paths: the dispatch mode of each
(the recording's, and the one that watches make_fx's ops) calls it for
each op. The ``dynamo_*`` functions read what dynamo and AOTAutograd
leave in the meta of the graphs torch.compile gives a backend.
"""

import contextlib
import functools
import itertools
import os
import re
import sys
from types import CodeType, TracebackType

import torch
from torch import fx, nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

import passes

MODULE_KEY = "mutwo_module"
SOURCE_KEY = "mutwo_source"
# (module path, "file:line") of an op; either may be None
Where = tuple[str | None, str | None]

# code's file names are the paths modules were imported from: these, or
# (through a symbolic link) their real paths
_LIBRARY_DIRS = tuple({variant(os.path.dirname(os.path.abspath(path))) + os.sep
                       for path in (torch.__file__, __file__, passes.__file__)
                       for variant in (str, os.path.realpath)})
_LIBRARY_FILES = frozenset(variant(os.path.abspath(m.__file__)) for m in (contextlib, functools)
                           for variant in (str, os.path.realpath))


def is_user_file(filename: str) -> bool:
    """Whether code in ``filename`` is the user's (their script, their
    model's library) rather than torch's, this project's or the
    context-manager and decorator plumbing of contextlib and functools.
    (String tests only: the compile path asks for every frame of every node.)"""
    path = filename if os.path.isabs(filename) else os.path.abspath(filename)
    return not path.startswith(_LIBRARY_DIRS) and path not in _LIBRARY_FILES


def innermost_user_frame(traceback: TracebackType | None) -> tuple[str, int] | None:
    """``(file, line)`` of the innermost frame of user code in ``traceback``
    (an exception's), or None."""
    found = None
    while traceback is not None:
        filename = traceback.tb_frame.f_code.co_filename
        if is_user_file(filename):
            found = (filename, traceback.tb_lineno)
        traceback = traceback.tb_next
    return found


def annotate(node: fx.Node, where: Where) -> None:
    """Set ``node``'s module and source keys."""
    node.meta[MODULE_KEY], node.meta[SOURCE_KEY] = where


def attribution_of(node: fx.Node) -> Where:
    """``node``'s (module, source), as ``annotate`` set them."""
    return node.meta[MODULE_KEY], node.meta[SOURCE_KEY]


class OpAttribution:
    """Attributes the ops of one run of a train step to the model's modules
    and to lines of user code.

    Enter ``tracking()`` around the step; a dispatch mode calls
    ``current()`` as each op is dispatched. Modules are followed with global
    forward hooks that live only inside ``tracking()``; modules that are not
    part of the model are not followed."""

    def __init__(self, model: nn.Module):
        # a module shared under several paths takes the first (named_modules' order)
        self._path_of: dict[int, str] = {}
        for name, module in model.named_modules(remove_duplicate=False):
            self._path_of.setdefault(id(module), name or type(model).__name__)
        self._running: list[str] = []  # paths of the model's modules whose forward runs, innermost last
        self._by_sequence_nr: dict[int, Where] = {}  # autograd node's sequence number -> its forward op's
        self._next_sequence_nr = 0
        self._is_user_code: dict[CodeType, bool] = {}

    @contextlib.contextmanager
    def tracking(self):
        """Follow the model's modules while the step runs."""
        self._running.clear()
        self._next_sequence_nr = torch.autograd._get_sequence_nr()
        handles = [register_module_forward_pre_hook(self._entered),
                   register_module_forward_hook(self._left, always_call=True)]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
            self._running.clear()

    def _entered(self, module, args) -> None:
        path = self._path_of.get(id(module))
        if path is not None:
            self._running.append(path)

    def _left(self, module, args, output) -> None:
        path = self._path_of.get(id(module))
        if path is None:
            return
        for index in range(len(self._running) - 1, -1, -1):  # the innermost entry (a module may run inside itself)
            if self._running[index] == path:
                del self._running[index]
                return

    def current(self) -> Where:
        """The (module, source) of the op being dispatched now.

        In forward, the innermost running module of the model and the
        innermost user frame; the autograd nodes created since the previous
        op (the op's own, numbered before it is dispatched) are noted as
        this op's. In backward, the noted values of the forward op whose
        autograd node is running; where none was noted (gradient
        accumulation into ``.grad``), no module and the user's line that
        started backward. A forward that reruns in backward (activation
        checkpointing) is attributed as in forward."""
        autograd_node = torch._C._current_autograd_node()
        if autograd_node is not None and not self._running:
            noted = self._by_sequence_nr.get(autograd_node._sequence_nr())
            return noted if noted is not None else (None, self._user_line())
        where = (self._running[-1] if self._running else None, self._user_line())
        now = torch.autograd._get_sequence_nr()
        if now > self._next_sequence_nr:
            if autograd_node is None:  # (not a rerun forward's nodes, which no backward runs)
                for number in range(self._next_sequence_nr, now):
                    self._by_sequence_nr[number] = where
            self._next_sequence_nr = now
        return where

    def _user_line(self) -> str | None:
        """``"file:line"`` of the innermost frame of user code on the Python stack."""
        frame = sys._getframe(2)
        while frame is not None:
            code = frame.f_code
            user = self._is_user_code.get(code)
            if user is None:
                user = self._is_user_code[code] = is_user_file(code.co_filename)
            if user:
                return f"{code.co_filename}:{frame.f_lineno}"
            frame = frame.f_back
        return None


def annotate_last(graph: fx.Graph, count: int, where: Where) -> None:
    """Annotate the call_function nodes among the last ``count`` of ``graph``
    (an op's nodes, as make_fx just appended them: decomposed ops' and
    getitems included)."""
    for node in itertools.islice(reversed(graph.nodes), count):
        if node.op == "call_function":
            annotate(node, where)


# --- torch.compile: what dynamo and AOTAutograd leave in node.meta ---------

# the head of a dynamo source name: a local or global of the compiled frame
_SOURCE_HEAD = re.compile(r"""^[LG]\[(['"]).*?\1\]""")
# how a source name reaches a child: ._modules['x'], ._parameters['x'], ._buffers['x'], ['x'], [0]
_SOURCE_STEP = re.compile(r"""\._(?:modules|parameters|buffers)\[(['"])(.*?)\1\]|\[(['"])(.*?)\3\]|\[(\d+)\]""")
_STACK_FRAME = re.compile(r'File "([^"]+)", line (\d+)')


def _qualified_name(source_name: str) -> str:
    """A dynamo source or module-stack name as a qualified name relative to
    the compiled frame's module: ``L['self']._modules['layer1']._modules['0']``,
    ``L['self'].layer1[0]`` and ``layer1.0`` all give ``layer1.0``; the
    module itself (``L['self']``, ``G['model']``) gives ""."""
    name = _SOURCE_HEAD.sub("", source_name, count=1)
    name = _SOURCE_STEP.sub(lambda m: "." + next(g for g in m.group(2, 4, 5) if g is not None), name)
    return name.lstrip(".")


def _class_name(module_type) -> str:
    """A module-stack entry's type (a class, or its qualified name in a string) as a class name."""
    return module_type.__name__ if isinstance(module_type, type) else str(module_type).rsplit(".", 1)[-1]


def dynamo_attribution(node: fx.Node) -> Where:
    """(module path, "file:line") of a node of a graph AOTAutograd made from
    a dynamo graph (joint, forward or backward), like OpAttribution's.

    The module is the innermost entry of ``nn_module_stack`` (forward
    nodes) or ``fwd_nn_module_stack`` (backward nodes), as a path relative
    to the compiled module (``layer1.0.conv1``); the compiled root's class
    name where the entry is the root. Dynamo records no entry for a module
    compiled with ``torch.compile(model)``, so ops of that module's own
    forward, like ops outside any module, have None. The source is the
    innermost user frame of ``stack_trace``."""
    stack = node.meta.get("nn_module_stack") or node.meta.get("fwd_nn_module_stack")
    module = None
    if stack:
        path, module_type = list(stack.values())[-1]
        module = _qualified_name(path) or _class_name(module_type)
    source = None
    for filename, line in _STACK_FRAME.findall(node.meta.get("stack_trace") or ""):
        if is_user_file(filename):
            source = f"{filename}:{line}"
    return module, source


def dynamo_input_names(gm: fx.GraphModule) -> list[str | None]:
    """For the dynamo graph a backend receives: per placeholder, the
    qualified name of the parameter or buffer it is (``layer1.0.conv1.weight``,
    read from the source dynamo records for it), or None for other inputs.
    Call it inside the backend: once compiled, dynamo drops the sources
    (``grapharg``) from the placeholders' meta, and all names are None."""
    names = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        source = getattr(node.meta.get("grapharg"), "source", None)
        name = getattr(source, "name", None)
        name = name() if callable(name) else name  # (a method in older torch, a property in newer)
        names.append(_qualified_name(name) if isinstance(name, str) and _is_parameter_or_buffer(source, name)
                     else None)
    return names


def _is_parameter_or_buffer(source, name: str) -> bool:
    """Whether a placeholder's source reaches a module's parameter or buffer:
    through ``_parameters``/``_buffers`` in its name, or a ParamBufferSource
    among its bases (older names such as ``L['self'].conv1.weight``)."""
    if "._parameters[" in name or "._buffers[" in name:
        return True
    while source is not None:
        if "ParamBufferSource" in type(source).__name__:
            return True
        source = getattr(source, "base", None)
    return False


def dynamo_model_name(gm: fx.GraphModule) -> str | None:
    """The class name of the compiled root module, where a node's
    ``nn_module_stack`` holds the root's entry (a compiled function that
    calls the model, a compiled nn.Sequential); else None (a module compiled
    with ``torch.compile(model)`` has no entry of its own)."""
    for node in gm.graph.nodes:
        for path, module_type in (node.meta.get("nn_module_stack") or {}).values():
            if not _qualified_name(path):
                return _class_name(module_type)
    return None
