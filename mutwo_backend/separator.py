"""Separator ops that mark the end of the forward pass in a captured graph.

``torch.ops.separator.sep`` is an identity placed on the model output; its
gradient runs through ``torch.ops.separator.sep_backward``, so the traced
train step holds one node where forward ends and one where backward starts.
Both ops return a view of their input (schema ``Tensor(a) -> Tensor(a)``):
marking the boundary must not copy the model output, or the captured graph
would need more memory than the eager step it describes.
"""

import torch

from .errors import CaptureError

NAMESPACE = "separator"
_SCHEMAS = {
    "sep": "sep(Tensor(a) x) -> Tensor(a)",
    "sep_backward": "sep_backward(Tensor(a) x) -> Tensor(a)",
}


def _identity_view(x: torch.Tensor) -> torch.Tensor:
    return x.view_as(x)


def _op_is_defined(name: str) -> bool:
    return torch._C._dispatch_has_kernel(f"{NAMESPACE}::{name}") or hasattr(
        getattr(torch.ops, NAMESPACE), name
    )


def _define_ops() -> None:
    """Define the ops once per process; a second import (or another library
    that already defined ``separator``) finds them and does nothing."""
    missing = [name for name in _SCHEMAS if not _op_is_defined(name)]
    if not missing:
        return
    lib = torch.library.Library(NAMESPACE, "FRAGMENT")
    for name in missing:
        lib.define(_SCHEMAS[name])
        lib.impl(name, _identity_view, "CompositeExplicitAutograd")
        lib.impl(name, _identity_view, "Meta")
    # Keep the library object alive for the life of the process.
    _LIBRARIES.append(lib)


_LIBRARIES: list = []
_define_ops()


class SEPFunction(torch.autograd.Function):
    """Identity whose forward is ``separator.sep`` and backward ``separator.sep_backward``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.separator.sep(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return torch.ops.separator.sep_backward(grad)


def sep(x: torch.Tensor) -> torch.Tensor:
    """Mark ``x`` (the model output) as the end of the forward pass."""
    if not isinstance(x, torch.Tensor):
        raise CaptureError(
            f"mutwo_backend.sep takes the model's output tensor, not {_a_type_name(x)}: pass the "
            "tensor the loss is computed from, e.g. sep(out.logits), sep(out['logits']) or sep(out[0]).")
    return SEPFunction.apply(x)


def _a_type_name(value) -> str:
    """``value``'s type name with its article, as a message says it: "an int",
    "a dict", "None"."""
    if value is None:
        return "None"
    name = type(value).__name__
    vowel_sound = name[:1].lower() in "aeiou" and not name.lower().startswith(("us", "uni", "uu"))  # (a UserDict)
    return f"{'an' if vowel_sound else 'a'} {name}"
