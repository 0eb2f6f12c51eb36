"""Cost model of swapping a tensor between device and pinned host memory.

A copy costs a fixed latency plus bytes over bandwidth, per direction: one
constant bandwidth is wrong for small tensors (FACTS.md: 1 MiB moves at
34 GB/s, 1 GiB at 54 GB/s on the H200). On a GPU the model is fitted to
measured pinned copies from 64 KiB to 1 GiB, once per device and process
(prepare_calibration pins the host buffer ahead, while the graph is captured);
on the CPU it is a documented default and marked estimated. (Fitted up to
256 MiB only, it underestimated 1 GiB copies by 5 to 8% instead of 3 to 4%
on the H200.)"""

import functools
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

CALIBRATION_SIZES = tuple(64 * 1024 * 4 ** k for k in range(8))  # 64 KiB .. 1 GiB


@dataclass(frozen=True)
class CopyCost:
    latency_ms: float
    bytes_per_ms: float

    def time_ms(self, nbytes: int) -> float:
        return self.latency_ms + nbytes / self.bytes_per_ms


@dataclass(frozen=True)
class SwapModel:
    """Time to copy a tensor out to pinned host memory and back in."""

    device_to_host: CopyCost
    host_to_device: CopyCost
    estimated: bool  # True when not fitted to measurements on this device

    def swap_out_ms(self, nbytes: int) -> float:
        return self.device_to_host.time_ms(nbytes)

    def swap_in_ms(self, nbytes: int) -> float:
        return self.host_to_device.time_ms(nbytes)

    def to_dict(self) -> dict:
        return {"d2h_latency_ms": self.device_to_host.latency_ms,
                "d2h_bandwidth_gb_s": self.device_to_host.bytes_per_ms / 1e6,
                "h2d_latency_ms": self.host_to_device.latency_ms,
                "h2d_bandwidth_gb_s": self.host_to_device.bytes_per_ms / 1e6,
                "estimated": self.estimated}


# PCIe 4.0 x16 in practice: about 25 GB/s and 10 us per copy each way.
DEFAULT_CPU_MODEL = SwapModel(CopyCost(0.01, 25e6), CopyCost(0.01, 25e6), estimated=True)


def swap_model(device: torch.device) -> SwapModel:
    if device.type != "cuda":
        return DEFAULT_CPU_MODEL
    return _calibrated(_indexed(device))


def prepare_calibration(device: torch.device) -> None:
    """Start pinning the calibration's host buffer on a helper thread, so
    that the capture or compilation running meanwhile hides it: pinning
    1 GiB takes longer than all the calibration's copies (0.42 s against
    0.36 s on the H200's host). Only the pinning overlaps; the copies are
    timed later, on the calling thread, with nothing else on the GPU."""
    if device.type == "cuda" and _indexed(device) not in _PINNED:
        _PINNED[_indexed(device)] = _PINNER.submit(
            torch.empty, max(CALIBRATION_SIZES), dtype=torch.uint8, pin_memory=True)


_PINNER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mutwo-pin")
_PINNED: dict[torch.device, Future] = {}  # host buffers being pinned, until calibration takes them


def _indexed(device: torch.device) -> torch.device:
    return torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _calibrated(device: torch.device) -> SwapModel:
    # One buffer each side, sliced per size: pinning host memory costs more
    # than the copies themselves.
    prepare_calibration(device)
    on_host = _PINNED.pop(device).result()
    on_device = torch.empty(max(CALIBRATION_SIZES), dtype=torch.uint8, device=device)
    d2h = [median_copy_ms(on_host[:n], on_device[:n]) for n in CALIBRATION_SIZES]
    h2d = [median_copy_ms(on_device[:n], on_host[:n]) for n in CALIBRATION_SIZES]
    return SwapModel(_fit(list(CALIBRATION_SIZES), d2h), _fit(list(CALIBRATION_SIZES), h2d), estimated=False)


def median_copy_ms(dst: torch.Tensor, src: torch.Tensor, repeats: int = 5) -> float:
    """Median time of ``dst.copy_(src, non_blocking=True)``, CUDA events."""
    times = []
    for _ in range(repeats + 1):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return float(np.median(times[1:]))  # the first copy warms up


def _fit(sizes: list[int], times_ms: list[float]) -> CopyCost:
    """Least squares in relative error: small and large copies count alike."""
    sizes_arr, times_arr = np.asarray(sizes, float), np.asarray(times_ms, float)
    design = np.stack([np.ones_like(sizes_arr), sizes_arr], axis=1) / times_arr[:, None]
    (latency_ms, ms_per_byte), *_ = np.linalg.lstsq(design, np.ones_like(times_arr), rcond=None)
    return CopyCost(max(float(latency_ms), 0.0), float(1.0 / ms_per_byte))
