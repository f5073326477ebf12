"""The encoders and the VAE on the device only while they are used, under the transformer's budget.

With a VRAM budget, `plan_offload` first checks whether every weight fits at once (then every
module stays on the device: no moves at all). If not, the text encoders (LLaMA, CLIP), the image
encoder (SigLIP) and the VAE are parked on the host (pinned on CUDA) and visit the device one at
a time: `on_device(module)` copies a parked module in for its `with` block and drops it after.
One generation runs in this sequence: the transformer is parked while the prompts and images are
encoded, each encoder alone on the device; then the transformer is streamed under the weight
budget less the VAE's bytes (`Offloader.transformer_budget`), so the VAE fits beside it for every
decode. A module larger than the whole weight budget (LLaMA 8B under 6 GB) streams its own layers
through a `WeightStreamer` while it visits. Every copy and drop goes to the `ByteLedger` that the
transformer's streaming writes to, so its peak is the most weight bytes the device ever held.

On a CPU the same code runs: a parked tensor is an empty placeholder and a visit really copies the
weights, so a module used outside its `with` block fails loudly in the tests.

`vae_tiles` picks the VAE's decode tile from the activation bytes the budget leaves.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..io.weights import DiskSource, disk_source, on_disk, placeholder
from .budgets import budget_bytes, default_reserve, format_bytes, module_tensors, parse_budget, tensor_bytes
from .disk import move_module, read_source
from .estimate import DeviceNeed
from .hooks import release
from .streaming import ByteLedger, MemoryPlan, WeightStreamer, plan_memory

__all__ = [
    "Offloader",
    "belongs_on",
    "layers_of",
    "module_bytes",
    "on_device",
    "pin_host",
    "plan_offload",
    "plan_visits",
    "vae_decode_bytes",
    "vae_tiles",
]

_MANAGED = "_framepack_offloader"
_AWAY = "_framepack_away_from"  # the device a module was parked away from, until a run takes it back
TILES = (256, 192, 128, 96, 64)  # decode tile sides in pixels, largest first (256: diffusers' default)
LIVE_TENSORS = 5  # full-resolution tensors alive at once in a decoder resnet / upsampler (estimate)


def module_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer of `module`."""
    return tensor_bytes(module_tensors(module))


def layers_of(module: nn.Module) -> list[nn.Module]:
    """The module's repeated layers: its `nn.ModuleList` holding the most bytes (LLaMA's `layers`)."""
    lists = [m for m in module.modules() if isinstance(m, nn.ModuleList) and len(m) > 1]
    best = max(lists, key=module_bytes, default=None)
    return [] if best is None else list(best)


@dataclass
class _Parked:
    """One parked tensor: its host copy (or its place in a weight file: a disk-backed module) and
    the empty placeholder it holds meanwhile."""

    tensor: torch.Tensor  # the parameter / buffer whose `.data` is swapped
    host: torch.Tensor | DiskSource
    empty: torch.Tensor

    def on_host(self) -> torch.Tensor:
        """What the tensor holds between runs: its host copy, or its memory-free disk placeholder."""
        return placeholder(self.host, self.empty.dtype) if isinstance(self.host, DiskSource) else self.host

    def on_device(self, device: torch.device) -> torch.Tensor:
        """A new copy on `device` (read from the file for the disk tier)."""
        if isinstance(self.host, DiskSource):
            return read_source(self.host, self.empty.dtype, device)
        return self.host.to(device, non_blocking=True, copy=True)

    @property
    def nbytes(self) -> int:
        return self.host.nbytes if isinstance(self.host, DiskSource) else tensor_bytes([self.host])


@dataclass
class Offloader:
    """Which modules visit the device, and the bookkeeping of their visits (see the module docstring)."""

    device: torch.device
    total: int | None  # the whole budget in bytes; None: no budget (nothing is moved or counted)
    weights: int | None  # bytes of weights allowed on the device at once
    ledger: ByteLedger = field(default_factory=lambda: ByteLedger(keep_events=False))
    transformer_budget: int | None = None  # weight bytes the transformer's plan may use
    resident: bool = True  # everything fits: every module stays on the device
    parked: dict[int, list[_Parked]] = field(default_factory=dict)  # id(module) -> its tensors
    streamed: dict[int, MemoryPlan] = field(default_factory=dict)  # visitors too big to visit whole
    managed: list[nn.Module] = field(default_factory=list)
    visits: int = 0  # how many times a module was copied in
    inside: set[int] = field(default_factory=set)  # id(module) of the modules in a `use` block
    activations: bool = True  # whether `room` is meaningful (see `plan_offload`)
    need: DeviceNeed | None = None  # the run's bytes besides weights, when given

    # ---------------------------------------------------------------------------- parking
    def park(self, module: nn.Module) -> None:
        """Keep `module`'s weights on the host; its tensors hold empty placeholders on the device."""
        if id(module) in self.parked:
            return
        pin = self.device.type == "cuda"
        entries = []
        for t in module_tensors(module):
            data = t.data
            source = disk_source(t)
            if source is not None:  # disk-backed: it visits from its file, no host copy is kept
                host = source
            else:
                host = data if data.device.type == "cpu" else data.to("cpu")
                if pin and module in self.managed:  # visitors come back often: pinned copies are fast
                    host = host.pin_memory()
            entries.append(_Parked(t, host, torch.empty(0, dtype=data.dtype, device=self.device)))
            t.data = entries[-1].empty
        self.parked[id(module)] = entries

    def unpark(self, module: nn.Module) -> None:
        """Give `module` its host weights back (no copy to the device)."""
        for e in self.parked.pop(id(module), ()):
            e.tensor.data = e.on_host()

    @contextmanager
    def use(self, module: nn.Module) -> Iterator[int | None]:
        """`module` on the device for the block; yields the bytes of the budget left (None: no budget)."""
        entries = self.parked.get(id(module))
        if entries is None or id(module) in self.inside:  # resident, or already in: nothing moves
            yield self.room()
            return
        self.visits += 1
        self.inside.add(id(module))
        try:
            yield from self._visit(module, entries)
        finally:
            self.inside.discard(id(module))

    def _visit(self, module: nn.Module, entries: list[_Parked]) -> Iterator[int | None]:
        name = type(module).__name__
        plan = self.streamed.get(id(module))
        if plan is None:
            size = sum(e.nbytes for e in entries)
            self.ledger.add(size, name)
            for e in entries:
                e.tensor.data = e.on_device(self.device)
            try:
                yield self.room()
            finally:
                for e in entries:
                    e.tensor.data = e.empty
                self.ledger.remove(size, name)
            return
        for e in entries:  # too big to visit whole: its layers stream, the rest comes in
            e.tensor.data = e.on_host()
        streamer = WeightStreamer(module, plan, self.device, self.ledger, layers_of(module)).attach()
        try:
            yield self.room()
        finally:
            streamer.detach()
            for e in entries:
                e.tensor.data = e.empty

    def room(self) -> int | None:
        """Bytes of the budget not held by weights right now (what activations may use); None when
        activations are not accounted for."""
        if self.total is None or not self.activations:
            return None
        return self.total - self.ledger.current - self.kept

    @property
    def kept(self) -> int:
        """Bytes of the budget held besides weights and the decode (context, allocator, step cache)."""
        if self.need is None or self.total is None:
            return 0
        return self.need.reserve(self.total) - max(self.need.activations, self.need.vae_decode)

    @contextmanager
    def transformer_away(self, model: nn.Module) -> Iterator[None]:
        """The transformer parked on the host for the block (the encoders then have the device)."""
        if self.resident:
            yield
            return
        release(model)  # an earlier run's streaming and step cache come off first
        self.park(model)
        try:
            yield
        finally:
            self.unpark(model)

    def close(self) -> None:
        """Every parked module gets its host weights back; the modules are no longer managed."""
        for module in self.managed:
            if id(module) in self.parked and self.device.type != "cpu":
                module.__dict__[_AWAY] = self.device  # its weights stay on the host after the run
            self.unpark(module)
            module.__dict__.pop(_MANAGED, None)
        self.managed.clear()

    def describe(self) -> str:
        if self.total is None:
            return "no budget"
        besides = ""
        if self.need is not None:
            kept = format_bytes(self.need.reserve(self.total))
            besides = f"; {kept} kept besides weights ({self.need.describe()})"
        if self.resident:
            return f"encoders and VAE resident ({format_bytes(self.weights)} of weights fit){besides}"
        streamed = f", {len(self.streamed)} streaming their layers" if self.streamed else ""
        return f"encoders and VAE on the device only while used{streamed}{besides}"


def belongs_on(module: nn.Module, device: torch.device | str) -> None:
    """Record that `module`'s weights wait on the host for `device` (`load_bundle` under a budget):
    a run without a budget moves them there, as after a budgeted run (`Offloader.close`)."""
    if torch.device(device).type != "cpu":
        module.__dict__[_AWAY] = torch.device(device)


def pin_host(module: nn.Module) -> None:
    """Page-lock `module`'s host weights one tensor at a time, the copies CUDA streams from (never a
    second copy of the module; the planner's own `pin_memory` calls then copy nothing)."""
    for t in module_tensors(module):
        if t.device.type == "cpu" and not t.is_pinned() and not on_disk(t):  # placeholders hold nothing
            t.data = t.data.pin_memory()


def on_device(module: nn.Module):
    """The context a caller wraps around a use of `module`: it visits the device when an `Offloader`
    manages it (yielding the budget's bytes left), else nothing happens (yielding None)."""
    offloader = module.__dict__.get(_MANAGED)
    return nullcontext() if offloader is None else offloader.use(module)


def plan_offload(
    transformer: nn.Module,
    visitors: Sequence[nn.Module],
    device: torch.device | str,
    vram_budget: str | float | None,
    **options,
) -> Offloader:
    """Plan the encoders' and the VAE's visits for `vram_budget` (GiB, "auto" or None) and park them.

    The `options` (`reserve`, `beside`, `fp8`, `need`, `run_size`) are `plan_visits`'s. `beside` is the visitor used while the transformer holds the device (the VAE, for decoding
    between sections); the transformer's budget leaves room for it (its plan checked with `fp8` host
    copies when asked, so a too small budget fails before any work). `reserve` bytes are kept for
    activations (default: `streaming.default_reserve`); `need` (`estimate.DeviceNeed`, the run's
    activations, step cache, VAE decode and CUDA overhead at its token count, `run_size` naming it)
    replaces it, and also counts on a CPU. On a CPU, where activations share the host's
    memory with everything else, the budget bounds the weights only, unless `reserve` is given
    (then `Offloader.room` also picks the VAE's decode tile there). Raises ValueError when a module
    cannot fit. `plan_visits` is the same plan with nothing moved.
    """
    device = torch.device(device)
    held = nn.ModuleList([transformer, *visitors])  # "auto": what they hold counts as free
    if budget_bytes(parse_budget(vram_budget), device, held) is None:
        for m in visitors:  # no budget: modules an earlier budget left on the host come back
            away = m.__dict__.pop(_AWAY, None)
            if away is not None:
                move_module(m, away)
        return Offloader(device, None, None)
    release(transformer)  # an earlier run's streaming comes off, so its bytes count (`place_weights` would)
    off = plan_visits(transformer, visitors, device, vram_budget, **options)
    for m in visitors:
        off.managed.append(m)
        m.__dict__[_MANAGED] = off
        m.__dict__.pop(_AWAY, None)
        if off.resident:  # everything fits: it all stays on the device
            move_module(m, device)
        else:
            off.park(m)
    if off.resident:
        off.ledger.add(sum(module_bytes(m) for m in visitors), "encoders and VAE")
    return off


def plan_visits(
    transformer: nn.Module,
    visitors: Sequence[nn.Module],
    device: torch.device | str,
    vram_budget: str | float | None,
    reserve: int | None = None,
    beside: nn.Module | None = None,
    fp8: bool = False,
    need: DeviceNeed | None = None,
    run_size: str = "this size",
) -> Offloader:
    """`plan_offload`'s plan (the budget's shares, which visitors stream their layers), with
    nothing registered, parked or moved; ValueError (one sentence) when a module cannot fit."""
    device = torch.device(device)
    held = nn.ModuleList([transformer, *visitors])
    total = budget_bytes(parse_budget(vram_budget), device, held)
    if total is None:
        return Offloader(device, None, None)
    if need is not None:
        reserve = need.reserve(total)
    weights = total - (default_reserve(total, device) if reserve is None else reserve)
    sizes = [module_bytes(m) for m in visitors]
    off = Offloader(
        device, total, weights, activations=device.type != "cpu" or reserve is not None, need=need
    )
    if module_bytes(transformer) + sum(sizes) <= weights:
        off.transformer_budget = weights - sum(sizes)
        return off
    off.resident = False
    off.transformer_budget = weights - (0 if beside is None else module_bytes(beside))
    least = plan_memory(transformer, None, fp8=fp8).least_bytes  # non-block weights and one block
    if need is not None:  # too small: one sentence, before any work
        need.check(total, least + (0 if beside is None else module_bytes(beside)), run_size)
    elif off.transformer_budget < least:  # the same test, with the old reserve
        kept = total - off.transformer_budget
        raise ValueError(
            f"a VRAM budget of {format_bytes(total)} is too small: the transformer needs at least "
            f"{format_bytes(least)} (its non-block weights and one block) beside the "
            f"{format_bytes(kept)} kept for the VAE and activations."
        )
    for m, size in zip(visitors, sizes, strict=True):
        if size > weights:  # too big to visit whole: its layers stream
            layers = layers_of(m)
            if not layers:
                raise ValueError(
                    f"the {type(m).__name__} needs {format_bytes(size)}, more than the budget's "
                    f"{format_bytes(weights)} of weights."
                )
            off.streamed[id(m)] = plan_memory(m, weights, blocks=layers)
    return off


# ------------------------------------------------------------------------------- VAE tiling
def vae_decode_bytes(vae: nn.Module, latent_shape: Sequence[int], tile: int | None = None) -> int:
    """Estimated activation bytes of decoding latents `(B, C, t, h, w)` with `vae`.

    The decoder's largest tensors are at full resolution, with the widest of its last two stages'
    channels; `LIVE_TENSORS` of them are alive at once. Framewise decoding (always on in diffusers)
    keeps at most one temporal tile of frames; `tile` caps the spatial size (tiled decoding).
    Against the peak of live tensors measured during untiled decodes on a CPU: 0.91-0.96 for the
    tiny test VAE, 1.01-1.07 for the release's architecture (`measure.LiveBytes`, `bench/offload.py`).
    """
    b, _, t, h, w = latent_shape
    cfg = vae.config
    dtype = next(vae.parameters()).dtype
    frames = min((t - 1) * cfg.temporal_compression_ratio + 1, vae.tile_sample_min_num_frames + 1)
    height, width = h * cfg.spatial_compression_ratio, w * cfg.spatial_compression_ratio
    if tile is not None:
        height, width = min(height, tile), min(width, tile)
    channels = max(cfg.block_out_channels[:2])
    per_item = LIVE_TENSORS * channels * frames * height * width * dtype.itemsize
    return per_item * (1 if getattr(vae, "use_slicing", False) else b)


def vae_tiles(vae: nn.Module, latent_shape: Sequence[int], room: int | None) -> int | None:
    """The decode tile side in pixels for `room` bytes of activations; None: diffusers' default.

    The default (256-pixel tiles, or one pass for smaller frames) is kept while its estimate fits
    the room; below that threshold the largest tile of `TILES` whose estimate fits is chosen (the
    smallest when none does).
    """
    if room is None or vae_decode_bytes(vae, latent_shape, TILES[0]) <= room:
        return None
    for tile in TILES[1:]:
        if vae_decode_bytes(vae, latent_shape, tile) <= room:
            return tile
    return TILES[-1]
