"""Weight streaming: keep what fits on the device, stream the other blocks through two slots.

`plan_memory` decides, for a device memory budget, which transformer blocks stay resident; the
others live in host memory (pinned on CUDA) and `WeightStreamer` copies each one to the device
just before it runs and drops it right after. With two slots (double buffering) the copy of the
next streamed block runs on a side CUDA stream while the current block computes; the resident
blocks are spread evenly between the streamed ones, so every copy has compute to hide behind.
On a CPU the streams are no-ops, but the weights are still really copied in and dropped, so the
CPU tests exercise the same bookkeeping. A `ByteLedger` records the bytes on the device at every
moment. Optional fp8 (e4m3) host copies with one scale per output row halve the transfers; each
tensor is upcast on the device just before its block runs (`--fp8-compute`: multiplied as it is).
A block read from its files at each call (the disk tier) arrives in full precision and gets its
fp8 copy on the device by the same rule, so the RAM budget never changes the output (why on the
device: `framepack.pipeline.fp8_compute`).

`detach` leaves the model exactly as `attach` found it: every parameter and buffer gets back the data
it held before (same values, dtype and device). Host memory, for that: a tensor that lived on the host
keeps its own storage there for the whole run (what the model held before `attach`, so nothing new);
one that lived on the device gets a host copy while it streams (as any streamed tensor needs) and goes
back to the device on `detach`. fp8 copies are rounded, so they come on top of the full-precision
weights: half the streamed blocks' bytes more on the host (`MemoryPlan.fp8_host_bytes`; 13B in bf16,
everything streamed: 26 GB of weights + 13 GB of fp8 copies). They save transfers, not host memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..io.weights import DiskSource, disk_source, placeholder
from ..model.fp8 import quantize_weight
from .budgets import (
    format_bytes,
    module_tensors,
    tensor_bytes,
)
from .disk import DiskReader, aligned, materialise, read_source
from .hooks import HookHandle, add_hook

__all__ = [
    "ByteLedger",
    "MemoryPlan",
    "WeightStreamer",
    "blocks_of",
    "plan_memory",
]


def blocks_of(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks in execution order: dual-stream, then single-stream."""
    return [*model.transformer_blocks, *model.single_transformer_blocks]


def _quantizable(t: torch.Tensor) -> bool:
    return t.is_floating_point() and t.dim() >= 2


@dataclass(frozen=True)
class MemoryPlan:
    """Which blocks stay on the device; the rest stream through `slots` device slots."""

    budget: int | None  # bytes for weights; None = no limit
    base_bytes: int  # everything outside the blocks (embedders, refiner, head): always resident
    block_bytes: tuple[int, ...]  # device bytes of each block, execution order
    load_bytes: tuple[int, ...]  # device bytes while a streamed block is loaded (fp8: + its upcast)
    resident: tuple[bool, ...]
    slots: int  # 0 (nothing streamed), 1 (synchronous) or 2 (double buffering)
    fp8: bool = False
    fp8_bytes: tuple[int, ...] = ()  # fp8: each block's fp8 host copies (1 byte a weight + row scales)
    fp8_resident: bool = False  # fp8 compute: a resident block also holds its e4m3 weights on the device

    def resident_bytes(self, i: int) -> int:
        """Device bytes of block `i` while resident (fp8 compute: its weights and their e4m3 copies)."""
        return self.block_bytes[i] + (self.fp8_bytes[i] if self.fp8_resident else 0)

    @property
    def streamed(self) -> tuple[int, ...]:
        return tuple(i for i, r in enumerate(self.resident) if not r)

    @property
    def peak_bytes(self) -> int:
        """An upper bound of the weight bytes on the device at any moment."""
        resident = sum(self.resident_bytes(i) for i, r in enumerate(self.resident) if r)
        loads = sorted((self.load_bytes[i] for i in self.streamed), reverse=True)
        return self.base_bytes + resident + sum(loads[: self.slots])

    @property
    def least_bytes(self) -> int:
        """Device bytes of the smallest plan: the non-block weights and one block being loaded."""
        return self.base_bytes + max(self.load_bytes, default=0)

    @property
    def fp8_host_bytes(self) -> int:
        """Host bytes the fp8 copies add beside the full-precision weights (kept for `detach`)."""
        return sum(self.fp8_bytes[i] for i in self.streamed) if self.fp8 else 0

    def describe(self) -> str:
        n, s = len(self.resident), len(self.streamed)
        budget = "no limit" if self.budget is None else format_bytes(self.budget)
        slots = {0: "", 1: ", synchronous", 2: ", double-buffered"}[self.slots]
        fp8 = f", fp8 host copies (+{format_bytes(self.fp8_host_bytes)} of host memory)" if self.fp8 else ""
        return (
            f"{n - s}/{n} blocks resident, {s} streamed{slots}{fp8}; "
            f"weights on the device at most {format_bytes(self.peak_bytes)} ({budget})"
        )


def _fp8_rows(data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 e4m3 copy, scales (rows, 1, ...) in `data`'s dtype), on `data`'s device: one power-of-two
    scale per output row, so the upcast is an exact multiplication."""
    q, scale = quantize_weight(data.reshape(data.shape[0], -1))  # (rows, K), (rows, 1): fp8 compute's rule
    return q.reshape(data.shape), scale.reshape(-1, *[1] * (data.dim() - 1)).to(data.dtype)


def _spread(n: int, r: int) -> list[bool]:
    """`r` of `n` positions chosen evenly spaced."""
    return [(i + 1) * r // n > i * r // n for i in range(n)]


def plan_memory(
    model: nn.Module,
    budget: int | None,
    fp8: bool = False,
    blocks: Sequence[nn.Module] | None = None,
    fp8_compute: bool = False,
) -> MemoryPlan:
    """Plan for a weight budget in bytes (None: everything resident). Raises ValueError if too small.

    The smallest workable budget holds the non-block weights and one streamed block (copied
    synchronously); two slots (double buffering) are used whenever they fit. Within the budget
    as many blocks as fit stay resident, spread evenly, then any smaller block that still fits.
    `blocks` are the streamable layers in execution order (default: the transformer's blocks).
    `fp8_compute` (`--fp8-compute`): streamed blocks travel as fp8 copies, and a resident block
    holds its e4m3 weights beside its own on the device, so it costs its fp8 bytes more.
    """
    fp8 = fp8 or fp8_compute
    blocks = blocks_of(model) if blocks is None else list(blocks)
    if any(t.numel() == 0 for b in blocks for t in module_tensors(b)):
        raise ValueError("some blocks are streamed already (empty weights); detach the streamer first.")
    in_blocks = {id(t) for b in blocks for t in module_tensors(b)}
    base = tensor_bytes([t for t in module_tensors(model) if id(t) not in in_blocks])
    sizes = tuple(tensor_bytes(module_tensors(b)) for b in blocks)
    extra, fp8_bytes = [], []
    for b in blocks:  # fp8: the raw copy of the tensor being upcast sits beside the block
        quant = [t for t in module_tensors(b) if _quantizable(t)]
        extra.append(max((t.numel() for t in quant), default=0) if fp8 else 0)
        fp8_bytes.append(sum(t.numel() + t.shape[0] * t.element_size() for t in quant) if fp8 else 0)
    loads = tuple(s + e for s, e in zip(sizes, extra, strict=True))
    n = len(blocks)
    kept = tuple(s + (f if fp8_compute else 0) for s, f in zip(sizes, fp8_bytes, strict=True))  # resident
    if budget is None or base + sum(kept) <= budget:
        return MemoryPlan(budget, base, sizes, loads, (True,) * n, 0, fp8, tuple(fp8_bytes), fp8_compute)
    for slots in (2, 1):
        room = budget - base - slots * max(loads)
        if room < 0:
            continue
        resident = [False] * n
        for r in range(n, -1, -1):  # the most evenly spread blocks that fit
            cand = _spread(n, r)
            if sum(s for s, c in zip(kept, cand, strict=True) if c) <= room:
                resident = cand
                break
        used = sum(s for s, c in zip(kept, resident, strict=True) if c)
        for i in sorted(range(n), key=lambda i: kept[i]):  # top up with the small ones
            if not resident[i] and used + kept[i] <= room:
                resident[i], used = True, used + kept[i]
        if all(resident):  # cannot happen (the model did not fit), but keep one slot honest
            resident[min(range(n), key=lambda i: sizes[i])] = False
        return MemoryPlan(
            budget, base, sizes, loads, tuple(resident), slots, fp8, tuple(fp8_bytes), fp8_compute
        )
    need = base + max(loads)
    raise ValueError(
        f"a weight budget of {format_bytes(budget)} is too small: this model needs at least "
        f"{format_bytes(need)} (its non-block weights and one block)."
    )


@dataclass
class ByteLedger:
    """Bytes of weights on the device, updated at every load and drop; `peak` is the maximum."""

    current: int = 0
    peak: int = 0
    events: list[tuple[str, int]] = field(default_factory=list)  # (what happened, bytes after)
    keep_events: bool = True

    def add(self, n: int, what: str) -> None:
        self.current += n
        self.peak = max(self.peak, self.current)
        if self.keep_events:
            self.events.append((f"+{what}", self.current))

    def remove(self, n: int, what: str) -> None:
        self.current -= n
        assert self.current >= 0, "dropped more bytes than were loaded"
        if self.keep_events:
            self.events.append((f"-{what}", self.current))


@dataclass
class _Entry:
    """One streamed tensor: its host copy (maybe fp8 with row scales) or its place in a weight
    file (the disk tier), and its device version."""

    tensor: torch.Tensor  # the parameter / buffer whose `.data` is swapped
    host: torch.Tensor | DiskSource  # what is copied (read) to the device
    empty: torch.Tensor  # the placeholder while the block is not on the device
    original: torch.Tensor  # what `detach` gives back: the data itself, or its host copy (see `home`)
    home: torch.device  # where the data was before `attach`
    scale: torch.Tensor | None = None  # fp8: (rows, 1, ...) powers of two, in the tensor's dtype
    staged: torch.Tensor | None = None  # on the device, not yet upcast (fp8) / not yet installed
    fp8_sink: object = None  # `--fp8-compute`: takes the row scales; the fp8 copy is installed as it is
    # streamed as an fp8 copy: made on the host (`scale` set), or from its file at each load
    fp8: bool = False

    def restore(self) -> None:
        """Give the tensor back its data from before `attach` (copied back to a device it came from)."""
        self.tensor.data = self.original if self.original.device == self.home else self.original.to(self.home)

    @property
    def on_disk(self) -> bool:
        return isinstance(self.host, DiskSource)

    def new_staged(self, device: torch.device) -> torch.Tensor:
        """An uninitialised device tensor the host copy (or the file's bytes) goes into."""
        dtype = self.empty.dtype if self.on_disk else self.host.dtype
        return torch.empty(self.host.shape, dtype=dtype, device=device)


class WeightStreamer:
    """Streams the non-resident blocks of `model` according to `plan` (attach / detach)."""

    priority = 0  # step caches (higher) run outside and skip the load of a skipped block

    def __init__(
        self,
        model: nn.Module,
        plan: MemoryPlan,
        device: torch.device | str,
        ledger: ByteLedger | None = None,
        blocks: Sequence[nn.Module] | None = None,
        host_budget: int = 0,
        staged_reads: bool | None = None,
    ) -> None:
        self.model, self.plan, self.device = model, plan, torch.device(device)
        self.host_budget = host_budget  # host bytes the streamed blocks of a disk-backed model may keep
        self.host_tier = 0  # bytes of streamed blocks read once into host memory (`_keep_on_host`)
        self.ledger = ledger if ledger is not None else ByteLedger()
        self.blocks = blocks_of(model) if blocks is None else list(blocks)
        self.order = plan.streamed  # block indices, execution order
        self.entries: dict[int, list[_Entry]] = {}
        self.loaded: dict[int, object] = {}  # block -> copy-done event (None on a CPU)
        self.installed: set[int] = set()
        self.handles: list[HookHandle] = []
        self.cuda = self.device.type == "cuda"
        self.side = None
        self.transfers = 0  # bytes copied host -> device
        self.resident_bytes = 0  # what `attach` put on the ledger
        self.kept: list[tuple[nn.Module, str, torch.Tensor]] = []  # the rest's data before `attach`
        self.reader: DiskReader | None = None  # reads the blocks that stream from their files
        self.staged_reads = staged_reads  # through host staging, ahead (None: on CUDA; see DiskReader)
        self.reads: dict[int, object] = {}  # block -> the Future of its read from disk
        self.disk_bytes = 0  # bytes read from weight files for the streamed blocks

    # ------------------------------------------------------------------ attach / detach
    def attach(self) -> WeightStreamer:
        """Move the resident weights to the device, the streamed ones to the host; add the hooks."""
        for i in self.order:
            entries = []
            for t in module_tensors(self.blocks[i]):
                entries.append(self._offload(t))
            self.entries[i] = entries
        streamed = {id(e.tensor) for entries in self.entries.values() for e in entries}
        self._keep_on_host()
        self._start_reader()
        for module in self.model.modules():  # `to` replaces buffers: they are put back by name
            for name, p in module._parameters.items():
                if p is not None and id(p) not in streamed:
                    self.kept.append((module, name, p.data))
            for name, b in module._buffers.items():
                if b is not None and id(b) not in streamed:
                    self.kept.append((module, name, b))
        # The streamed tensors hold empty placeholders: this reads in (a disk-backed model) and
        # moves the base and the resident blocks.
        materialise(self.model, self.device)
        self.model.to(self.device)
        self.resident_bytes = self.plan.base_bytes + sum(
            b for b, r in zip(self.plan.block_bytes, self.plan.resident, strict=True) if r
        )
        self.ledger.add(self.resident_bytes, "resident")
        if self.cuda:
            self.side = torch.cuda.Stream(self.device)
        for k, i in enumerate(self.order):
            self.handles.append(add_hook(self.blocks[i], _BlockHook(self, k)))
        return self

    def _keep_on_host(self) -> None:
        """The host tier: streamed blocks that live in their files are read once into host memory
        (pinned for CUDA), in execution order while `host_budget` lasts; the rest are read from
        their files at every call. With fp8 the kept copies are fp8 (read and quantised one tensor
        at a time, so the full-precision block is never whole in memory). Their placeholders come
        back on `detach`."""
        for i in self.order:
            disk = [e for e in self.entries[i] if e.on_disk]
            size = sum(self._kept_bytes(e) for e in disk)
            if not disk or self.host_tier + size > self.host_budget:
                continue
            for e in disk:
                data = read_source(e.host, e.empty.dtype)
                host, e.scale = _fp8_rows(data) if e.fp8 else (data, None)
                e.host = host.pin_memory() if self.cuda else host
                if self.cuda and e.scale is not None:
                    e.scale = e.scale.pin_memory()
            self.host_tier += size

    def _kept_bytes(self, e: _Entry) -> int:
        """Host bytes a disk-backed tensor takes in the host tier (fp8: a byte a weight + row scales)."""
        if self.plan.fp8 and len(e.host.shape) >= 2:
            return e.host.numel + e.host.shape[0] * e.empty.element_size()
        return e.host.numel * e.empty.element_size()

    def _start_reader(self) -> None:
        """A `DiskReader` when some streamed block lives in its files; staged (CUDA), it has two
        host buffers of the largest such block (every tensor 64-byte aligned): one being read while
        the other is copied to the device."""
        sizes = [
            sum(aligned(e.host.numel * e.empty.element_size()) for e in entries if e.on_disk)
            for entries in self.entries.values()
        ]
        if max(sizes, default=0):
            self.reader = DiskReader(self.device, 2, max(sizes), staged=self.staged_reads)

    def _offload(self, t: torch.Tensor) -> _Entry:
        source = disk_source(t)
        if source is not None:  # the disk tier: the block is read from its file whenever it runs
            empty = torch.empty(0, dtype=t.dtype, device=self.device)
            entry = _Entry(t, source, empty, placeholder(source, t.dtype), torch.device("cpu"))
            entry.fp8 = self.plan.fp8 and _quantizable(t)
            t.data = empty  # any copy read in before (a resident run) is given back
            return entry
        data = t.data
        original = data if data.device.type == "cpu" else data.to("cpu")  # the full-precision host copy
        scale = None
        if self.plan.fp8 and _quantizable(data):
            host, scale = (t.cpu() for t in _fp8_rows(data))
        else:  # full precision: the host copy streams as it is
            host = original
        if self.cuda:
            host = host.pin_memory()  # no copy when it is pinned already (`load_bundle` pins)
            scale = None if scale is None else scale.pin_memory()
            if scale is None:  # the pinned copy is the original from now on: never two of them
                original = host
        empty = torch.empty(0, dtype=data.dtype, device=self.device)
        t.data = empty
        return _Entry(t, host, empty, original, data.device, scale, fp8=scale is not None)

    def detach(self) -> None:
        """Remove the hooks; every parameter and buffer gets back its data from before `attach`."""
        for h in self.handles:
            h.remove()
        self.handles.clear()
        for i in list(self.loaded):
            self._drop(i)
        for entries in self.entries.values():
            for e in entries:
                e.restore()
        self.entries.clear()
        for module, name, data in self.kept:
            if name in module._parameters:
                module._parameters[name].data = data
            else:
                module._buffers[name] = data
        self.kept.clear()
        self.ledger.remove(self.resident_bytes, "resident")  # the ledger may be shared (offload.py)
        self.resident_bytes = 0
        if self.reader is not None:
            self.reader.close()
            self.reader = None

    # ------------------------------------------------------------------ loads and drops
    def _load(self, i: int) -> None:
        """Start copying block `i` to the device (on the side stream when on CUDA)."""
        entries = self.entries[i]
        self.ledger.add(self.plan.load_bytes[i], f"block {i}")
        for e in entries:  # allocated in the compute stream's order: the memory of dropped blocks is reused
            e.staged = e.new_staged(self.device)
        from_disk = [(e.host, e.staged) for e in entries if e.on_disk]
        if from_disk:  # read (or read ahead) and copied by the reader thread while this block computes
            self.reads[i], read = self.reader.load(i, from_disk)
            self.disk_bytes += sum(source.nbytes for source, _ in from_disk) if read else 0
            entries = [e for e in entries if not e.on_disk]
        if self.cuda:
            ready = torch.cuda.current_stream(self.device).record_event()
            with torch.cuda.stream(self.side):
                self.side.wait_event(ready)
                for e in entries:
                    e.staged.copy_(e.host, non_blocking=True)
                done = self.side.record_event()
        else:
            for e in entries:
                e.staged.copy_(e.host)
            done = None
        self.transfers += sum(e.host.numel() * e.host.element_size() for e in entries)  # from host memory
        self.loaded[i] = done

    def _install(self, i: int) -> None:
        """Wait for block `i`'s copy and put its weights in place (upcasting fp8 tensor by tensor)."""
        self._wait(i)
        for e in self.entries[i]:
            staged, scale, e.staged = e.staged, e.scale, None
            if e.fp8 and e.on_disk:  # read in full precision: its fp8 copy is made here, by the host's rule
                staged, scale = _fp8_rows(staged)
            if not e.fp8:
                e.tensor.data = staged
            elif e.fp8_sink is not None:  # multiplied in e4m3 as it came (`keep_fp8`): no upcast
                e.tensor.data = staged
                e.fp8_sink(scale.to(self.device, non_blocking=True))
            else:  # per-tensor upcast: at most one fp8 tensor beside the block at a time
                e.tensor.data = staged.to(e.empty.dtype).mul_(scale.to(self.device, non_blocking=True))
        self.installed.add(i)

    def _wait(self, i: int) -> None:
        """The compute stream waits until block `i`'s copies (and reads from disk) are done."""
        done = self.loaded[i]
        if done is not None:
            torch.cuda.current_stream(self.device).wait_event(done)
        read = self.reads.pop(i, None)
        if read is not None:
            copied = read.result()  # re-raises a failed read here
            if copied is not None:
                torch.cuda.current_stream(self.device).wait_event(copied)

    def _drop(self, i: int) -> None:
        if i not in self.installed:  # a copy or a read may still be writing into it
            self._wait(i)
        for e in self.entries[i]:
            e.staged = None
            e.tensor.data = e.empty
        self.loaded.pop(i)
        self.installed.discard(i)
        self.ledger.remove(self.plan.load_bytes[i], f"block {i}")

    def enter(self, k: int) -> None:
        """Before the k-th streamed block runs: have it in place, start copying the next one."""
        i = self.order[k]
        nxt = self.order[(k + 1) % len(self.order)] if self.plan.slots == 2 else i
        for j in [j for j in self.loaded if j not in (i, nxt)]:  # left over after an error
            self._drop(j)
        if i not in self.loaded:
            self._load(i)
        if i not in self.installed:
            self._install(i)
        if nxt not in self.loaded:
            self._load(nxt)
        self._read_ahead(self.order[(k + max(self.plan.slots, 1)) % len(self.order)])

    def _read_ahead(self, j: int) -> None:
        """Start reading block `j` from its files into the reader's host staging (a staged reader:
        the block after the ones being copied and computed)."""
        if self.reader is None or j in self.loaded:
            return
        sources = [(e.host, e.empty.dtype) for e in self.entries[j] if e.on_disk]
        if sources and self.reader.read_ahead(j, sources):
            self.disk_bytes += sum(source.nbytes for source, _ in sources)

    def leave(self, k: int) -> None:
        self._drop(self.order[k])

    def keep_fp8(self, tensor: torch.Tensor, sink) -> bool:
        """Install `tensor`'s fp8 copy as it is at every load and hand its row scales (on the device)
        to `sink`, instead of upcasting it (`--fp8-compute`, `framepack.model.fp8`). False when
        `tensor` is not streamed as an fp8 copy (resident)."""
        for entries in self.entries.values():
            for e in entries:
                if e.tensor is tensor and e.fp8:
                    e.fp8_sink = sink
                    return True
        return False


class _BlockHook:
    """Brackets one streamed block's forward with the streamer's enter / leave."""

    priority = WeightStreamer.priority

    def __init__(self, streamer: WeightStreamer, k: int) -> None:
        self.streamer, self.k = streamer, k

    def __call__(self, module, forward, *args, **kwargs):
        self.streamer.enter(self.k)
        try:
            return forward(*args, **kwargs)
        finally:
            self.streamer.leave(self.k)
