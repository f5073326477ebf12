"""The speed features of one run, composed: memory under the VRAM budget, and a step cache.

- `offloaded(bundle, vram_budget, ...)`: the encoders and the VAE fitted to the budget for the
  run's `with` block (`framepack.memory.offload`), closed after it.
- `accelerate_run(model, device, settings, memory)`: the transformer's weights streamed under the
  budget beside them (`framepack.memory.runtime.place_weights`) and the step cache the settings
  name (`framepack.caching`); `accelerate` is the same with every setting spelled out. The
  returned `Accelerated` resets the step caches at every section and reports what happened; it
  stays attached until the next run on the same model (or `framepack.memory.hooks.release`)
  detaches it.
- `check_speed_settings`: one sentence for a bad cache name, threshold, coefficients or budget;
  `check_device_settings`: one for what the device cannot run (fp8 compute, an attention kernel).
- The run's attention backend (`--attention`, `framepack.model.attention`) is chosen for as long
  as the run stays attached.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..caching import CACHES, StepCache, make_cache, reset_caches
from ..memory.budgets import parse_budget
from ..memory.hooks import forget_attached, record_attached
from ..memory.offload import Offloader, plan_offload
from ..memory.runtime import Placement, place_weights
from ..memory.streaming import WeightStreamer
from ..model.attention import check_backend, get_backend, set_backend
from ..parallel import attached_parallel, leader_of
from .budget import bundle_need, device_budget, run_size
from .bundle import Bundle
from .compiled import CompiledBlocks
from .fp8_compute import Fp8Compute, check_fp8_compute

__all__ = [
    "Accelerated",
    "accelerate",
    "accelerate_run",
    "check_device_settings",
    "check_speed_settings",
    "offloaded",
]


def check_device_settings(settings, device) -> None:
    """Raise ValueError (one sentence) for what a run's settings ask of a device that it cannot
    do: fp8 compute without e4m3 products, an attention kernel without its package or its GPU.
    Needs no weights: callers run it before loading."""
    check_fp8_compute(settings.fp8_compute, device)
    check_backend(settings.attention, device)


def check_speed_settings(
    cache: str | None, threshold: float, vram_budget, coefficients=None, ram_budget=None
) -> None:
    """Raise ValueError (one sentence) for a bad cache name, threshold, coefficients or budget."""
    if coefficients is not None:
        try:
            ok = len(coefficients) > 0 and all(math.isfinite(float(c)) for c in coefficients)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(
                f"the cache coefficients must be a list of finite numbers, got {coefficients!r}."
            )

    if cache is not None and cache not in CACHES:
        raise ValueError(f"unknown step cache {cache!r}; choose one of {', '.join(CACHES)}.")
    if cache is not None and coefficients is not None:
        CACHES[cache].check_coefficients(coefficients)  # MagCache: positive ratios
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 10:
        raise ValueError(f"the cache threshold must be a number from 0 to 10, got {threshold!r}.")
    parse_budget(vram_budget)
    parse_budget(ram_budget, "RAM")


@contextmanager
def offloaded(
    bundle: Bundle, vram_budget: str | float | None, fp8: bool = False, prepared=None
) -> Iterator[Offloader]:
    """The encoders and the VAE fitted to `vram_budget` for one run (`framepack.memory.offload`):
    all kept on the device when everything fits, else each visits it only while used. With the
    run's `prepared` settings its activations, step cache, VAE decode and CUDA overhead are kept
    out of the weights' share (`framepack.pipeline.budget`)."""
    model = bundle.transformer
    visitors = bundle.visitors()
    device = bundle.device  # a bundle loaded onto the host for a budget: the device it runs on
    need = None
    if prepared is not None and parse_budget(vram_budget) is not None:
        need = bundle_need(bundle, prepared)
    size = "this size" if prepared is None else run_size(prepared)
    memory = plan_offload(
        model, visitors, device, vram_budget, beside=bundle.vae, fp8=fp8, need=need, run_size=size
    )
    try:
        yield memory
    finally:
        memory.close()


@dataclass
class Accelerated:
    """One run's weight placement and step cache on a model (see the module docstring)."""

    weights: Placement
    cache: StepCache | None = None
    compiled: CompiledBlocks | None = None  # `--compile`: the blocks' compiled forwards
    fp8: Fp8Compute | None = None  # `--fp8-compute`: the blocks' linear layers in e4m3
    attention: str = "sdpa"  # the run's attention backend
    attention_before: str = "sdpa"  # the process's backend before the run, back on `detach`

    @property
    def model(self) -> nn.Module:
        return self.weights.model

    @property
    def streamer(self) -> WeightStreamer | None:
        return self.weights.streamer

    def new_section(self, steps: int, branches: int = 1) -> None:
        """Reset every step cache on the model (ours and any attached by hand, e.g. a calibration
        recorder): a section of `steps` steps, `branches` model calls per step. On rank 0 of
        several, the other ranks' caches too (`framepack.parallel.Leader`)."""
        leader = leader_of(self.model)
        if leader is not None:
            leader.new_section(steps, branches)
        reset_caches(self.model, steps, branches)

    def info(self) -> dict:
        out = self.weights.info()
        out["attention"] = self.attention
        if self.compiled is not None:
            out["compile"] = self.compiled.info()
        if self.fp8 is not None:
            out["fp8_compute"] = self.fp8.info()
        if self.cache is not None:
            out["cache"] = {
                "name": self.cache.name,
                "threshold": self.cache.threshold,
                **self.cache.stats.as_dict(),
            }
        return out

    def detach(self) -> None:
        if self.compiled is not None:
            self.compiled.detach()
        if self.cache is not None:
            self.cache.detach()
        if self.fp8 is not None:
            self.fp8.detach()
        self.weights.detach()
        set_backend(self.attention_before)
        forget_attached(self.model)


def accelerate(
    model: nn.Module,
    device: torch.device | str,
    vram_budget: str | float | None = None,
    cache: str | None = None,
    threshold: float = 0.15,
    coefficients: tuple[float, ...] | None = None,
    fp8: bool = False,
    reserve: int | None = None,
    memory: Offloader | None = None,
    host_budget: int = 0,
    compile: bool = False,
    fp8_compute: bool | str = False,
    attention: str = "sdpa",
) -> Accelerated:
    """Stream `model`'s weights under `vram_budget` (GiB or "auto") and attach step cache `cache`
    (and with `compile`, the blocks' compiled forwards, `framepack.pipeline.compiled`; with
    `fp8_compute`, their linear layers in e4m3, `framepack.pipeline.fp8_compute`, whose streamed
    blocks then travel as fp8 host copies; "emulate": the same in fp32 arithmetic, any device;
    `attention`: the backend every block's attention uses, `framepack.model.attention`).

    Whatever an earlier call attached to the same model is detached first. With neither a budget
    nor a cache, the model is simply (moved back to) `device`. `reserve` bytes of the budget are
    kept for activations (default: `framepack.memory.streaming.default_reserve`). With `memory`
    (`offload.plan_offload` for the same budget) the transformer gets the weight bytes the encoders
    and the VAE leave it, and its bytes go on `memory`'s ledger.
    """
    check_fp8_compute(fp8_compute, device)
    check_backend(attention, device, getattr(getattr(model, "config", None), "attention_head_dim", None))
    # fp8 compute multiplies the streamed blocks' fp8 copies as they come, and a resident block's
    # e4m3 weights sit beside its own: the plan counts them within the budget
    placed = place_weights(model, device, vram_budget, fp8, reserve, memory, host_budget, bool(fp8_compute))
    run = Accelerated(placed, attention=attention, attention_before=get_backend())
    set_backend(attention)
    if fp8_compute:
        run.fp8 = Fp8Compute(model, run.streamer, emulate=fp8_compute == "emulate", ledger=placed.ledger)
        run.fp8.attach()
    if cache is not None:
        run.cache = make_cache(cache, threshold, coefficients).attach(model)
        parallel = attached_parallel(model)  # the blocks see a shard: every rank decides alike
        run.cache.reduce = None if parallel is None else parallel.all_sum
    if compile:  # innermost: streaming and the step cache run around the compiled blocks
        run.compiled = CompiledBlocks(model).attach()
    parts = (run.cache, run.compiled, run.fp8)
    if run.weights.attached or any(p is not None for p in parts) or attention != run.attention_before:
        record_attached(model, run)
    return run


def accelerate_run(
    model: nn.Module, device, settings, memory: Offloader | None = None, host_budget: int = 0
) -> Accelerated:
    """`accelerate` with a run's speed settings (a `GenerationSettings`): weight streaming under
    `settings.vram_budget` (beside `memory`'s encoders and VAE, `framepack.memory.offload`), in fp8
    with `settings.fp8_weights`, and the step cache `settings.cache`; `host_budget` host bytes for
    the streamed blocks of a disk-backed model (`budget.host_tier_budget`)."""
    return accelerate(
        model,
        device,
        device_budget(settings, device),
        settings.cache,
        settings.cache_threshold,
        settings.cache_coefficients,
        settings.fp8_weights,
        memory=memory,
        host_budget=host_budget,
        compile=settings.compile,
        fp8_compute=settings.fp8_compute,
        attention=settings.attention,
    )
