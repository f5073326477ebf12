"""The disk tier: weights read from their safetensors files when a run needs them.

A bundle loaded under a RAM budget (`load_bundle(..., ram_budget=...)`) holds placeholders with
`DiskSource`s (`framepack.io.weights`) instead of its weights. The planners treat the files as
one more home for a tensor beside the host and the device:

- `materialise(module, device)` reads every placeholder of a module in (what stays resident;
  the streamer and the offloader put the placeholders back, which gives the memory back);
- `DiskReader` reads the tensors of a streamed block in a thread of its own, so the read of the
  next block runs while the current one computes; on CUDA each read goes into a reused pinned
  staging buffer per slot and is copied to the device from there.

`DiskStats` counts the bytes read, for the plan's "read from disk per step" and the benchmarks.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..io.weights import DiskSource, disk_source, on_disk

__all__ = [
    "DiskReader",
    "DiskStats",
    "aligned",
    "available_ram",
    "disk_backed",
    "materialise",
    "move_module",
    "proc_bytes",
]


@dataclass
class DiskStats:
    """Bytes read from weight files."""

    bytes_read: int = 0

    def add(self, n: int) -> None:
        self.bytes_read += n


STATS = DiskStats()  # every read of this process (`framepack info`, the benchmarks)


def disk_backed(module: nn.Module) -> bool:
    """Whether any parameter of `module` can be read back from a file (a lazily loaded bundle)."""
    return any(disk_source(p) is not None for p in module.parameters())


def read_source(source: DiskSource, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """A new tensor in `dtype` on `device` with `source`'s values."""
    out = source.read(torch.empty(source.shape, dtype=dtype))
    STATS.add(source.nbytes)
    return out if torch.device(device).type == "cpu" else out.to(device)


def materialise(module: nn.Module, device: torch.device | str) -> None:
    """Read every placeholder of `module` onto `device`."""
    for p in module.parameters():
        if on_disk(p):
            p.data = read_source(disk_source(p), p.dtype, device)


def move_module(module: nn.Module, device: torch.device | str) -> nn.Module:
    """`module.to(device)` for a module that may hold placeholders: they are read in first."""
    materialise(module, device)
    return module.to(device)


def proc_bytes(path: str, field: str) -> int | None:
    """A `field:  N kB` line of a /proc file (Linux) in bytes, or None where there is none."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def available_ram() -> int:
    """Bytes of host memory available now (MemAvailable on Linux; else physical memory)."""
    free = proc_bytes("/proc/meminfo", "MemAvailable")
    return free if free is not None else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class DiskReader:
    """Reads the tensors of a block into place in a thread of its own (see the module docstring).

    `submit(block, tensors)` starts reading `tensors` ((source, destination) pairs: destinations
    on the device) and returns a `Future` whose result is the CUDA event that marks the copies
    done (None on a CPU). `slots` staging buffers of `slot_bytes` each are reused in turn on CUDA.
    """

    def __init__(self, device: torch.device, slots: int, slot_bytes: int) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="framepack-disk")
        self.staging: list[torch.Tensor] = []
        self.pending: list[object] = []  # per slot: the event of the last copy out of it
        self.next_slot = 0
        self.side = torch.cuda.Stream(device) if self.cuda else None
        if self.cuda:
            for _ in range(max(slots, 1)):
                self.staging.append(torch.empty(slot_bytes, dtype=torch.uint8).pin_memory())
                self.pending.append(None)
        self.scratch = torch.empty(0, dtype=torch.uint8)  # dtype conversions (CPU)

    def submit(self, tensors: list[tuple[DiskSource, torch.Tensor]]) -> Future:
        slot = self.next_slot
        self.next_slot = (slot + 1) % max(len(self.staging), 1)
        ready = torch.cuda.current_stream(self.device).record_event() if self.cuda else None
        return self.pool.submit(self._read, tensors, slot, ready)

    def _read(self, tensors, slot: int, ready):
        if not self.cuda:
            for source, out in tensors:
                self.scratch = _grown(self.scratch, source.nbytes if out.dtype != source.stored else 0)
                source.read(out, self.scratch)
                STATS.add(source.nbytes)
            return None
        if self.pending[slot] is not None:
            self.pending[slot].synchronize()  # the last copy out of this buffer is done
        buf, at = self.staging[slot], 0
        with torch.cuda.stream(self.side):
            self.side.wait_event(ready)  # the destinations were allocated on the compute stream
            for source, out in tensors:
                size = out.numel() * out.element_size()
                view = buf[at : at + size].view(out.dtype).view(out.shape)
                self.scratch = _grown(self.scratch, source.nbytes if out.dtype != source.stored else 0)
                source.read(view, self.scratch)
                STATS.add(source.nbytes)
                out.copy_(view, non_blocking=True)
                at += aligned(size)
            done = self.side.record_event()
        self.pending[slot] = done
        return done

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.staging.clear()


def aligned(n: int, to: int = 64) -> int:
    """`n` rounded up to a multiple of `to` (where the next tensor starts in a staging buffer)."""
    return -(-n // to) * to


def _grown(buf: torch.Tensor, n: int) -> torch.Tensor:
    return buf if buf.numel() >= n else torch.empty(n, dtype=torch.uint8)
