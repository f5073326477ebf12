"""The disk tier: weights read from their safetensors files when a run needs them.

A bundle loaded under a RAM budget (`load_bundle(..., ram_budget=...)`) holds placeholders with
`DiskSource`s (`framepack.io.weights`) instead of its weights. The planners treat the files as
one more home for a tensor beside the host and the device:

- `materialise(module, device)` reads every placeholder of a module in (what stays resident;
  the streamer and the offloader put the placeholders back, which gives the memory back);
- `DiskReader` reads the tensors of the streamed blocks in a thread of its own, ahead of the
  compute: on CUDA into reused pinned staging buffers, two blocks ahead (block i+2 is read while
  block i+1 is copied to the device and block i computes); on a CPU straight into place, one block
  ahead (there is no copy there to overlap).

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
    """Reads the tensors of streamed blocks in a thread of its own (see the module docstring).

    Two ways, chosen by `staged`:

    - direct (a CPU): `load(key, pairs)` reads each (source, destination) pair straight into its
      destination while the current block computes; on a CPU the read is the whole load, there is no
      copy to overlap with it, and every buffer would come out of the same memory budget.
    - staged (CUDA, or `staged=True` anywhere): `read_ahead(key, sources)` reads a block into the
      next of `slots` reused host buffers of `slot_bytes` (pinned on CUDA), which needs no device
      memory; `load(key, pairs)` then copies it from there to the destinations on a side stream (and
      reads it first if it was not read ahead, or its buffer was taken since). So the streamer reads
      block i+2 while block i+1 is copied and block i computes.

    `load` returns a `Future` whose result is the CUDA event that marks the copies done (None on a
    CPU). The thread runs one task at a time in the order they were given, which orders every read
    into a buffer after the copies out of it that were asked for before.
    """

    def __init__(self, device: torch.device, slots: int, slot_bytes: int, staged: bool | None = None) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.staged = self.cuda if staged is None else staged
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="framepack-disk")
        self.staging: list[torch.Tensor] = []
        self.pending: list[object] = []  # per buffer: the event of the last copy out of it
        self.owner: list[object] = []  # per buffer: the block whose bytes it holds (or is reading)
        self.ahead: dict[object, tuple[int, Future]] = {}  # block -> (its buffer, the read into it)
        self.next_slot = 0
        self.side = torch.cuda.Stream(device) if self.cuda else None
        if self.staged:
            for _ in range(max(slots, 1)):
                buf = torch.empty(slot_bytes, dtype=torch.uint8)
                self.staging.append(buf.pin_memory() if self.cuda else buf)
                self.pending.append(None)
                self.owner.append(None)
        self.scratch = torch.empty(0, dtype=torch.uint8)  # dtype conversions

    def read_ahead(self, key: object, sources: list[tuple[DiskSource, torch.dtype]]) -> bool:
        """Start reading block `key` into a staging buffer (staged readers; False when it is
        already there or the reader is direct). True when a read was started."""
        if not self.staged or key in self.ahead:
            return False
        slot = self._claim(key)
        self.ahead[key] = slot, self.pool.submit(self._fill, sources, slot)
        return True

    def load(self, key: object, tensors: list[tuple[DiskSource, torch.Tensor]]) -> tuple[Future, bool]:
        """Start putting block `key`'s bytes into `tensors`' destinations: (the `Future` of the copy
        event, whether the files had to be read for it (False: it was read ahead))."""
        ready = torch.cuda.current_stream(self.device).record_event() if self.cuda else None
        if not self.staged:
            return self.pool.submit(self._read_into, tensors), True
        ahead = self.ahead.pop(key, None)
        read = ahead is None
        if read:
            slot = self._claim(key)
            ahead = slot, self.pool.submit(self._fill, [(source, out.dtype) for source, out in tensors], slot)
        slot, filled = ahead
        return self.pool.submit(self._copy, [out for _, out in tensors], slot, filled, ready), read

    def _claim(self, key: object) -> int:
        """The next staging buffer, taken for `key` (a block read ahead into it and not loaded yet
        is forgotten: it will be read again when it is loaded)."""
        slot = self.next_slot
        self.next_slot = (slot + 1) % len(self.staging)
        last = self.ahead.get(self.owner[slot])
        if last is not None and last[0] == slot:
            del self.ahead[self.owner[slot]]
        self.owner[slot] = key
        return slot

    def _read(self, source: DiskSource, out: torch.Tensor) -> None:
        self.scratch = _grown(self.scratch, source.nbytes if out.dtype != source.stored else 0)
        source.read(out, self.scratch)
        STATS.add(source.nbytes)

    def _read_into(self, tensors: list[tuple[DiskSource, torch.Tensor]]) -> None:
        for source, out in tensors:
            self._read(source, out)

    def _views(self, slot: int, layout: list[tuple[torch.Size, torch.dtype]]):
        """The staging buffer `slot` cut into one tensor per (shape, dtype), each 64-byte aligned."""
        buf, at = self.staging[slot], 0
        for shape, dtype in layout:
            size = torch.Size(shape).numel() * dtype.itemsize
            yield buf[at : at + size].view(dtype).view(shape)
            at += aligned(size)

    def _fill(self, sources: list[tuple[DiskSource, torch.dtype]], slot: int) -> None:
        if self.pending[slot] is not None:
            self.pending[slot].synchronize()  # the last copy out of this buffer is done
            self.pending[slot] = None
        views = self._views(slot, [(source.shape, dtype) for source, dtype in sources])
        for (source, _), view in zip(sources, views, strict=True):
            self._read(source, view)

    def _copy(self, outs: list[torch.Tensor], slot: int, filled: Future, ready):
        filled.result()  # done (the thread ran it before this); re-raises a failed read
        views = list(self._views(slot, [(out.shape, out.dtype) for out in outs]))
        if not self.cuda:
            for out, view in zip(outs, views, strict=True):
                out.copy_(view)
            return None
        with torch.cuda.stream(self.side):
            self.side.wait_event(ready)  # the destinations were allocated on the compute stream
            for out, view in zip(outs, views, strict=True):
                out.copy_(view, non_blocking=True)
            done = self.side.record_event()
        self.pending[slot] = done
        return done

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.staging.clear()
        self.ahead.clear()


def aligned(n: int, to: int = 64) -> int:
    """`n` rounded up to a multiple of `to` (where the next tensor starts in a staging buffer)."""
    return -(-n // to) * to


def _grown(buf: torch.Tensor, n: int) -> torch.Tensor:
    return buf if buf.numel() >= n else torch.empty(n, dtype=torch.uint8)
