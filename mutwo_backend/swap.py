"""Cost model of swapping a tensor between device and pinned host memory.

A copy costs a fixed latency plus bytes over bandwidth, per direction: one
constant bandwidth is wrong for small tensors (FACTS.md: 1 MiB moves at
34 GB/s, 1 GiB at 54 GB/s on the H200). On a GPU the model is fitted to
measured pinned copies from 64 KiB to 1 GiB, once per device and process
(prepare_calibration faults the host buffer in on a helper thread, and
start_calibration page-locks it and queues the copies so that host work,
the passes or a warm-up iteration, hides them); on the CPU it is a
documented default and marked estimated. (Fitted up to
256 MiB only, it underestimated 1 GiB copies by 5 to 8% instead of 3 to 4%
on the H200.)"""

import contextlib
import mmap
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from planner.problem import CopyCost

from .device_memory import free_bytes

CALIBRATION_SIZES = tuple(64 * 1024 * 4 ** k for k in range(8))  # 64 KiB .. 1 GiB


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


_TOUCHER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mutwo-touch")
_TOUCHED: dict[torch.device, Future] = {}  # host buffers being faulted in, until calibration takes them
_QUEUED: dict[torch.device, "_QueuedCopies"] = {}  # calibrations queued, until swap_model fits them
_MODELS: dict[torch.device, SwapModel] = {}
# About 25 ms on the H200 (1.8 GHz): far longer than queueing the copies takes.
SPIN_CYCLES = 45_000_000
REPEATS = 5  # timed copies per size and direction, after one that warms up


def _repeats(size: int) -> int:
    """One for copies of 256 MiB and more: they are most of the copy time,
    and vary little (1 GiB: 19.49 to 19.50 ms device to host on the H200)."""
    return REPEATS if size < 256 * 1024 ** 2 else 1


def swap_model(device: torch.device) -> SwapModel:
    """The swap cost model of ``device``; on a GPU, fitted to the copies
    start_calibration queued (queued now if it did not), once per device
    and process."""
    if device.type != "cuda":
        return DEFAULT_CPU_MODEL
    device = _indexed(device)
    if device not in _MODELS:
        if device not in _QUEUED:
            _queue(device)
        _MODELS[device] = _QUEUED.pop(device).fit()
    return _MODELS[device]


def prepare_calibration(device: torch.device) -> None:
    """Start faulting in the calibration's host buffer on a helper thread.
    It calls no CUDA function, so it can run beside anything, a recorded
    capture included; start_calibration page-locks it, which holds the
    CUDA driver (a recorded capture beside torch's pinning of 1 GiB took
    0.55 s longer on the H200)."""
    if device.type == "cuda" and _indexed(device) not in _TOUCHED and _indexed(device) not in _MODELS:
        _TOUCHED[_indexed(device)] = _TOUCHER.submit(touched_host_memory, max(CALIBRATION_SIZES))


@contextlib.contextmanager
def calibrating(device: torch.device):
    """prepare_calibration for work that ends by calling swap_model; if the
    work fails first, the calibration's buffers are dropped (its queued
    copies waited for) instead of being held until a later profile."""
    prepare_calibration(device)
    try:
        yield
    except BaseException:
        if device.type == "cuda":
            queued = _QUEUED.pop(_indexed(device), None)
            if queued is not None:
                queued.stream.synchronize()  # its buffers may be reused only once the copies ended
            _TOUCHED.pop(_indexed(device), None)
        raise


def touched_host_memory(nbytes: int) -> torch.Tensor | None:
    """``nbytes`` of anonymous host memory (on huge pages where the kernel
    allows them), every page faulted in; None where it cannot be mapped."""
    try:
        buffer = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            buffer.madvise(mmap.MADV_HUGEPAGE)
        tensor = torch.frombuffer(buffer, dtype=torch.uint8)  # (which keeps the mapping alive)
        return tensor.fill_(0)
    except (OSError, AttributeError, ValueError, RuntimeError):
        return None


def page_locked(touched: torch.Tensor | None, nbytes: int) -> torch.Tensor:
    """``touched`` registered with CUDA as page-locked memory. For 1 GiB on
    the H200's host, faulting in took 0.03 to 0.07 s and registering 0.02 to
    0.03 s, against 0.40 s for ``torch.empty(pin_memory=True)``, with the same
    copy speed (19.5 ms device to host). Where registering is not possible,
    torch's pinned memory."""
    cudart = torch.cuda.cudart()
    if touched is not None and \
            cudart.cudaHostRegister(touched.data_ptr(), nbytes, 0) == cudart.cudaError.success:
        weakref.finalize(touched, cudart.cudaHostUnregister, touched.data_ptr())
        return touched
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


def start_calibration(device: torch.device, step_peak_bytes: int = 0) -> None:
    """Page-lock the host buffer, queue every calibration copy on a side
    stream and return, so that the host work that follows (the passes, a
    warm-up iteration) hides the copies; swap_model waits for them. Only
    when the GPU has room for the calibration's 1 GiB device buffer beside
    a step that peaks at ``step_peak_bytes`` (0: nothing runs beside the
    copies), with a quarter to spare; otherwise swap_model calibrates
    alone, later.

    The copies are queued behind a GPU spin, all before the first one can
    start, so that their CUDA-event timings hold no gap from the host (a
    thread could not promise that: waiting for the GIL, its copies timed
    hundreds of times too long)."""
    if device.type != "cuda":
        return
    device = _indexed(device)
    if device in _MODELS or device in _QUEUED or not _room_beside(device, step_peak_bytes):
        return
    _queue(device)


def _queue(device: torch.device) -> None:
    """Queue the calibration's copies, once its host buffer is page-locked."""
    prepare_calibration(device)
    size = max(CALIBRATION_SIZES)
    _QUEUED[device] = _QueuedCopies(device, page_locked(_TOUCHED.pop(device).result(), size))


def _room_beside(device: torch.device, step_peak_bytes: int) -> bool:
    allocated = torch.cuda.memory_allocated(device)
    return free_bytes(device) >= 1.25 * max(step_peak_bytes - allocated, 0) + max(CALIBRATION_SIZES)


def _indexed(device: torch.device) -> torch.device:
    return torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())


class _QueuedCopies:
    """Device-to-host and host-to-device copies of every calibration size,
    each between a CUDA event pair, queued on a side stream. One buffer each
    side, sliced per size: pinning host memory costs more than the copies."""

    def __init__(self, device: torch.device, on_host: torch.Tensor):
        self.on_host = on_host
        self.stream = torch.cuda.Stream(device)
        with torch.cuda.device(device):
            self.on_device = torch.empty(max(CALIBRATION_SIZES), dtype=torch.uint8, device=device)
            self.stream.wait_stream(torch.cuda.current_stream())  # the buffer's allocation
            self.samples = []
            with torch.cuda.stream(self.stream):
                torch.cuda._sleep(SPIN_CYCLES)
                spun = torch.cuda.Event()
                spun.record()
                for direction, dst, src in (("d2h", on_host, self.on_device), ("h2d", self.on_device, on_host)):
                    for size in CALIBRATION_SIZES:
                        for _ in range(_repeats(size) + 1):
                            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                            start.record()
                            dst[:size].copy_(src[:size], non_blocking=True)
                            end.record()
                            self.samples.append((direction, size, start, end))
        # still spinning: every copy was queued before the first could start
        self.gap_free = not spun.query()

    def fit(self) -> SwapModel:
        self.stream.synchronize()
        if not self.gap_free:  # the host was slower than the spin: time each copy on its own
            d2h = [median_copy_ms(self.on_host[:n], self.on_device[:n]) for n in CALIBRATION_SIZES]
            h2d = [median_copy_ms(self.on_device[:n], self.on_host[:n]) for n in CALIBRATION_SIZES]
        else:
            times = {}
            for direction, size, start, end in self.samples:
                times.setdefault((direction, size), []).append(start.elapsed_time(end))
            d2h, h2d = ([float(np.median(times[direction, n][1:])) for n in CALIBRATION_SIZES]
                        for direction in ("d2h", "h2d"))
        sizes = list(CALIBRATION_SIZES)
        return SwapModel(_fit(sizes, d2h), _fit(sizes, h2d), estimated=False)


def median_copy_ms(dst: torch.Tensor, src: torch.Tensor, repeats: int = REPEATS) -> float:
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


class SwapCopies:
    """Real device<->pinned-host copies of activations on a side stream, timed
    with CUDA events. Nothing reads the copies: results cannot change."""

    def __init__(self):
        self.stream = torch.cuda.Stream()
        self.host = {}
        self.pending = []

    def _copy(self, direction: str, name: str, dst: torch.Tensor, src: torch.Tensor):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            start.record()
            dst.copy_(src, non_blocking=True)
            end.record()
        for tensor in (dst, src):
            if tensor.is_cuda:
                tensor.record_stream(self.stream)
        self.pending.append((direction, name, start, end))

    def copy_out(self, name: str, value: torch.Tensor):
        if name not in self.host:
            self.host[name] = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
        self._copy("out", name, self.host[name], value)

    def copy_in(self, name: str, like: torch.Tensor):
        if name in self.host:
            self._copy("in", name, torch.empty_like(like), self.host[name])

    def finish(self) -> tuple[dict[str, float], dict[str, float]]:
        self.stream.synchronize()
        times = {"out": {}, "in": {}}
        for direction, name, start, end in self.pending:
            times[direction][name] = start.elapsed_time(end)
        self.pending.clear()
        return times["out"], times["in"]
