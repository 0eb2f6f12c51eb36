"""The swap runtime a rewritten graph calls: copies of whole storages to a
host slab and back, each direction on its own stream (the GPU has a copy
engine for each), ordered against the compute stream by events.

- ``swap_out`` waits (on the device-to-host stream) for the compute stream
  to have produced the value, then copies its storage into its slot of one
  pinned host slab, allocated once, at the first step.
- ``free`` makes the compute stream wait for that copy and drops the
  device storage there: the caching allocator may hand its block to the
  next op of the compute stream, which now runs after the copy. (Not
  ``record_stream``: during CUDA graph capture the allocator keeps such a
  block out of reuse until the capture ends, so the graph would save
  nothing.)
- ``swap_in`` allocates the storage again on the compute stream at the
  prefetch point and copies it back on the host-to-device stream; ``wait``
  makes the compute stream wait for it just before the first reader.

On the CPU the same calls run as plain copies: the graph stays the same and
its training can be checked there."""

import torch
from torch import nn

SWAP_MODULE = "mutwo_swap"  # the rewritten GraphModule's attribute holding the CopyStreams


def storage_view(flat: torch.Tensor, dtype: torch.dtype, size, stride, offset: int) -> torch.Tensor:
    """A view of ``dtype`` with the given geometry on ``flat``'s storage: an
    activation rebuilt on its storage brought back from the host."""
    return torch.empty(0, dtype=dtype, device=flat.device).set_(flat.untyped_storage(), offset, size, stride)


class InFlight:
    """One copy under way: the tensor it reads or writes on the device,
    and the event its stream records when the copy is done."""

    def __init__(self, device_bytes: torch.Tensor, done):
        self.device_bytes, self.done = device_bytes, done

    def free(self) -> "InFlight":
        """Drop the device storage once the copy out has read it; the
        copy, for swap_in to wait on."""
        if self.done is not None:
            torch.cuda.current_stream(self.device_bytes.device).wait_event(self.done)
        self.device_bytes = None
        return self

    def wait(self) -> torch.Tensor:
        """The storage brought back, once the compute stream may read it."""
        if self.done is not None:
            torch.cuda.current_stream(self.device_bytes.device).wait_event(self.done)
        device_bytes, self.device_bytes = self.device_bytes, None
        return device_bytes


class CopyStreams(nn.Module):
    """The host slab and the two copy streams of one rewritten graph;
    ``sizes[i]`` is the bytes of swapped storage ``i``."""

    def __init__(self, sizes: list[int]):
        super().__init__()
        self.sizes = list(sizes)
        self.offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self.slab: torch.Tensor | None = None
        self.device = self.device_to_host = self.host_to_device = None
        self.timings: list | None = None  # [] to time the copies (not inside a CUDA graph's capture)

    def _prepare(self, device: torch.device) -> None:
        cuda = device.type == "cuda"
        self.device = device
        self.slab = torch.empty(sum(self.sizes), dtype=torch.uint8, pin_memory=cuda)
        if cuda:
            self.device_to_host, self.host_to_device = torch.cuda.Stream(device), torch.cuda.Stream(device)

    def slot(self, index: int) -> torch.Tensor:
        return self.slab[self.offsets[index]:self.offsets[index] + self.sizes[index]]

    def swap_out(self, index: int, value: torch.Tensor) -> InFlight:
        if self.slab is None:
            self._prepare(value.device)
        device_bytes = torch.empty(0, dtype=torch.uint8, device=value.device).set_(value.untyped_storage())
        if self.device_to_host is None:
            self.slot(index).copy_(device_bytes)
            return InFlight(device_bytes, None)
        self.device_to_host.wait_stream(torch.cuda.current_stream(value.device))
        with torch.cuda.stream(self.device_to_host):
            done = self._copy(self.slot(index), device_bytes, "device_to_host")
        return InFlight(device_bytes, done)

    def swap_in(self, index: int, out: InFlight) -> InFlight:
        device_bytes = torch.empty(self.sizes[index], dtype=torch.uint8, device=self.device)  # compute stream's
        if self.host_to_device is None:
            device_bytes.copy_(self.slot(index))
            return InFlight(device_bytes, None)
        self.host_to_device.wait_stream(torch.cuda.current_stream(self.device))  # the prefetch point
        self.host_to_device.wait_event(out.done)  # the slot holds the copy out
        with torch.cuda.stream(self.host_to_device):
            done = self._copy(device_bytes, self.slot(index), "host_to_device")
        return InFlight(device_bytes, done)

    def _copy(self, destination: torch.Tensor, source: torch.Tensor, direction: str):
        """One copy on the current (copy) stream; the event that ends it."""
        timed = self.timings is not None
        start = torch.cuda.Event(enable_timing=True) if timed else None
        if timed:
            start.record()
        destination.copy_(source, non_blocking=True)
        done = torch.cuda.Event(enable_timing=timed)
        done.record()
        if timed:
            self.timings.append((direction, source.numel(), start, done))
        return done

    def copy_times(self) -> list[dict]:
        """The timed copies: direction, bytes and milliseconds on its stream."""
        torch.cuda.synchronize(self.device)
        return [{"direction": direction, "bytes": nbytes, "ms": start.elapsed_time(end)}
                for direction, nbytes, start, end in self.timings or []]
