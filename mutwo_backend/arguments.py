"""Checks of the arguments the entry points share, made before anything
runs: a bad value must fail before the model or the optimizer is touched."""

import torch

from .errors import MutwoError
from .timers import TIMERS

SWAP_MODES = ("model", "measure")


def check_iterations(warmup: int | None, iters: int) -> None:
    """``warmup`` None is each entry point's default."""
    if not isinstance(iters, int) or iters < 1 or warmup is not None and (not isinstance(warmup, int) or warmup < 0):
        raise MutwoError(f"need iters >= 1 and warmup >= 0 (integers), got iters={iters!r}, warmup={warmup!r}")


def check_swap(swap: str) -> None:
    if swap not in SWAP_MODES:
        raise MutwoError(f"unknown swap mode {swap!r}: choose one of {', '.join(SWAP_MODES)}")


def check_timer(timer: str | None, device: torch.device) -> None:
    """``timer`` None is the device's default. The GPU timers need the step
    on a CUDA device."""
    if timer is None:
        return
    if timer not in TIMERS:
        raise MutwoError(f"unknown timer {timer!r}: choose one of {', '.join(TIMERS)}")
    if timer != "cpu" and (device.type != "cuda" or not torch.cuda.is_available()):
        raise MutwoError(f"timer {timer!r} times CUDA kernels, but the step runs on {device}: use "
                         "timer='cpu' (or leave timer unset), or move the model and inputs to a GPU.")


def check_module_depth(module_depth) -> None:
    if isinstance(module_depth, bool) or not isinstance(module_depth, int) or module_depth < 1:
        raise MutwoError(f"module_depth={module_depth!r}: give a positive integer, the depth of the per-module "
                         "totals (1: layer3, 2: layer3.4; default 2)")


def check_profile_arguments(device: torch.device, warmup: int | None, iters: int, timer: str | None,
                            swap: str, module_depth: int = 1) -> None:
    """Every check above, as profile_train_step and GraphProfiler make them."""
    check_iterations(warmup, iters)
    check_swap(swap)
    check_timer(timer, device)
    check_module_depth(module_depth)
