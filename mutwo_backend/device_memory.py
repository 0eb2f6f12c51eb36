"""Whether a step fits in the GPU's memory, asked before it runs.

The memory simulation knows a step's peak before anything runs, and it is a
lower bound (kernel workspaces and allocator fragmentation come on top): a
step whose simulated peak exceeds what the device has free cannot run, so it
is refused with the numbers and the ways out instead of an out-of-memory
error halfway through a training iteration, after batch-norm statistics have
changed. A step that passes and still runs out is explained the same way."""

import contextlib
import gc

import torch

from passes import GraphAnalysis

from .errors import StepDoesNotFitError
from .report import format_bytes

GIB = 1024 ** 3
WAYS_OUT = ("use a smaller batch, free other tensors on the device, or recompute activations in backward "
            "(torch.utils.checkpoint). passes.run_pipeline(step.gm, step.hints) after capture_train_step "
            "shows where the memory goes without running the step")


def free_bytes(device: torch.device) -> int:
    """Bytes new allocations can take: the driver's free memory and what the
    caching allocator holds but has not handed out."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def free_device_memory(device: torch.device) -> None:
    """Collect dropped tensors and, on a GPU, return the allocator's cached
    blocks, so that the next model (a sweep's next batch, a benchmark's
    next tool) starts from the same memory."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def resident_bytes(analysis: GraphAnalysis) -> int:
    """Bytes of the graph's inputs (parameters, buffers, optimizer state, the
    batch): allocated before the step runs, part of its simulated peak."""
    return sum(analysis.output_bytes[n] for n in analysis.nodes if n.op == "placeholder")


def needed_bytes(analysis: GraphAnalysis) -> int:
    """The step's simulated peak beyond its inputs: what it allocates as it runs."""
    return analysis.memory.peak_bytes - resident_bytes(analysis)


def check_step_fits(device: torch.device, analysis: GraphAnalysis) -> None:
    """Raise StepDoesNotFitError if the step's simulated peak, beyond its
    inputs, exceeds what ``device`` has free. Nothing runs on the CPU."""
    if device.type != "cuda":
        return
    needed = needed_bytes(analysis)
    free = free_bytes(device)
    if needed > free:
        raise StepDoesNotFitError(
            f"the step does not fit on {device} ({torch.cuda.get_device_name(device)}): at its peak it "
            f"needs {needed / GIB:.2f} GiB beyond its inputs (simulated, a lower bound: kernel "
            f"workspaces come on top) and {free / GIB:.2f} GiB are free; {_at_peak(analysis)}. "
            f"Nothing has run: {WAYS_OUT}.")


def _at_peak(analysis: GraphAnalysis) -> str:
    """The simulated bytes at the peak by kind, largest first."""
    kinds = sorted(analysis.memory.breakdown_at_peak.items(), key=lambda item: -item[1])
    return "at the peak " + ", ".join(f"{kind.value} {format_bytes(nbytes)}" for kind, nbytes in kinds if nbytes)


@contextlib.contextmanager
def out_of_memory_explained(device: torch.device, analysis: GraphAnalysis, what: str):
    """Turn a CUDA out-of-memory error while the step runs into a
    StepDoesNotFitError with the simulated peak and the ways out."""
    try:
        yield
    except torch.cuda.OutOfMemoryError as error:
        needed = needed_bytes(analysis)
        raise StepDoesNotFitError(
            f"the step ran out of memory on {device} during the {what}: at its peak it needs "
            f"{needed / GIB:.2f} GiB beyond its inputs (simulated, a lower bound: kernel workspaces "
            f"and fragmentation come on top), more than was free; {_at_peak(analysis)}. The iteration "
            f"stopped partway (batch-norm statistics may have changed): {WAYS_OUT}.") from error


class AllocatorReadings:
    """The CUDA caching allocator's byte counters, read straight from its C++
    statistics: torch.cuda.memory_allocated() flattens every statistic into a
    new dict per call, too slow to call around each of 10,000 nodes. Even
    so, one reading per node is a quarter of an interpreted iteration's
    host time on ResNet-152: read once, after the node."""

    def __init__(self, device: torch.device):
        self.index = device.index if device.index is not None else torch.cuda.current_device()

    def allocated_and_peak_bytes(self) -> tuple[int, int]:
        counters = torch._C._cuda_memoryStats(self.index)["allocated_bytes"]["all"]
        return counters["current"], counters["peak"]

    def reset_peak(self) -> None:
        torch._C._cuda_resetPeakMemoryStats(self.index)
