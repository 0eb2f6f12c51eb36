"""What the command line's commands share: the zoo's optimizers, the flags
of a command that builds and profiles a zoo model, argparse types, and
what counts as running out of memory."""

import argparse

import torch

from .errors import StepDoesNotFitError
from .models import MODELS
from .timers import TIMERS

OPTIMIZERS = {
    "adam": lambda params: torch.optim.Adam(params, lr=1e-3, fused=True),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-3, fused=True),
    "sgd": lambda params: torch.optim.SGD(params, lr=1e-2, momentum=0.9),
}


def default_batch_size(device: str) -> int:
    return 32 if device == "cuda" else 2


# --- arguments -----------------------------------------------------------------

def _int_at_least(minimum: int, wording: str):
    """An argparse type: an integer of at least ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} is {wording}")
        return value
    return parse


positive_int = _int_at_least(1, "not a positive integer")
non_negative_int = _int_at_least(0, "negative")


def add_model_options(parser: argparse.ArgumentParser, out_default: str) -> None:
    """Flags of every command that builds and profiles a zoo model."""
    parser.add_argument("--model", choices=sorted(MODELS), default="resnet152",
                        help="zoo model, built with random weights; nothing is downloaded (default: resnet152)")
    parser.add_argument("--seq-len", type=positive_int, default=None, metavar="L",
                        help="sequence length of the BERT models (default: 512 for bert, 64 for bert-tiny); "
                             "ignored by the other models")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="where the step runs (default: cuda when a GPU is visible, else cpu with a warning)")
    parser.add_argument("--warmup", type=non_negative_int, default=None, metavar="K",
                        help="warm-up iterations, not measured (default: none after a recorded train-step "
                             "capture, which ran the step on the device; 1 otherwise)")
    parser.add_argument("--iters", type=positive_int, default=3, metavar="K",
                        help="measured iterations; node times are their medians (default: 3)")
    parser.add_argument("--timer", choices=TIMERS, default=None,
                        help="per-node timer: cpu (host clock), cuda-events (an event pair per node) or "
                             "cupti (kernel times attributed to nodes) (default: cupti on cuda, cpu on cpu)")
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="adam",
                        help="adam and adamw are fused; sgd uses momentum 0.9 (default: adam)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the batch (default: 0)")
    parser.add_argument("--out", default=out_default, metavar="DIR",
                        help=f"directory the results are written to, checked writable before anything runs "
                             f"(default: {out_default})")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")


def seq_len(args: argparse.Namespace, spec) -> int | None:
    """--seq-len or the model's default; None for models without one."""
    return (args.seq_len or spec.default_seq_len) if spec.default_seq_len else None


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` or an error it was raised from is an out-of-memory:
    CUDA's (torch.OutOfMemoryError), the CPU allocator's, or mutwo's refusal
    of a step that cannot fit (StepDoesNotFitError)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (torch.cuda.OutOfMemoryError, StepDoesNotFitError)):
            return True
        if isinstance(error, RuntimeError) and "can't allocate memory" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False
