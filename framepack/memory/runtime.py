"""One place where the pipeline fits the transformer to the device: weight streaming + step cache.

`accelerate(model, device, ...)` detaches whatever an earlier call attached to the same model,
then plans and attaches weight streaming (when a budget is given) and a step cache (when named).
The returned `Accelerated` resets the cache at every section and reports what happened.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from .hooks import forget_attached, record_attached, release
from .offload import Offloader, module_bytes
from .streaming import (
    GIB,
    ByteLedger,
    WeightStreamer,
    budget_bytes,
    default_reserve,
    parse_budget,
    plan_memory,
)

__all__ = [
    "Accelerated",
    "accelerate",
    "check_speed_settings",
    "is_out_of_memory",
]


def is_out_of_memory(e: BaseException) -> bool:
    """True for a device (or host) allocation failure: `torch.OutOfMemoryError`, `MemoryError`,
    or a backend's RuntimeError that says "out of memory"."""
    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    return isinstance(e, (oom, MemoryError)) or (
        isinstance(e, RuntimeError) and "out of memory" in str(e).lower()
    )


def check_speed_settings(cache: str | None, threshold: float, vram_budget, coefficients=None) -> None:
    """Raise ValueError (one sentence) for a bad cache name, threshold, coefficients or VRAM budget."""
    from ..caching import CACHES

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
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 10:
        raise ValueError(f"the cache threshold must be a number from 0 to 10, got {threshold!r}.")
    parse_budget(vram_budget)


@dataclass
class Accelerated:
    model: nn.Module
    streamer: WeightStreamer | None = None
    cache: object | None = None  # a framepack.caching.StepCache
    ledger: ByteLedger | None = None
    counted: int = 0  # bytes of a resident model put on a shared ledger (offload.py)
    memory: Offloader | None = None  # the encoders' and the VAE's visits under the same budget

    def new_section(self, steps: int, branches: int = 1) -> None:
        """Reset every step cache on the model (ours and any attached by hand, e.g. a calibration
        recorder): a section of `steps` steps, `branches` model calls per step."""
        from ..caching import reset_caches

        reset_caches(self.model, steps, branches)

    def info(self) -> dict:
        out: dict = {}
        if self.streamer is not None:
            out["memory_plan"] = self.streamer.plan.describe()
            out["weights_peak_gib"] = round(self.ledger.peak / GIB, 3)
        if self.ledger is not None:
            out["device_weights_peak_bytes"] = self.ledger.peak
        if self.memory is not None and self.memory.total is not None:
            out["offload"] = self.memory.describe()
        if self.cache is not None:
            out["cache"] = {
                "name": self.cache.name,
                "threshold": self.cache.threshold,
                **self.cache.stats.as_dict(),
            }
        return out

    def detach(self) -> None:
        if self.cache is not None:
            self.cache.detach()
        if self.streamer is not None:
            self.streamer.detach()
        if self.counted:
            self.ledger.remove(self.counted, "transformer")
            self.counted = 0
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
) -> Accelerated:
    """Stream `model`'s weights under `vram_budget` (GiB or "auto") and attach step cache `cache`.

    With neither, the model is simply (moved back to) `device`. `reserve` bytes of the budget are
    kept for activations (default: `default_reserve`). With `memory` (`offload.plan_offload` for the
    same budget) the transformer gets the weight bytes the encoders and the VAE leave it, and its
    bytes go on `memory`'s ledger.
    """
    from ..caching import make_cache

    device = torch.device(device)
    total = budget_bytes(parse_budget(vram_budget), device, model)  # "auto" counts what it holds now
    release(model)  # an earlier run's streaming comes off: the weights are back where they were
    run = Accelerated(model, memory=memory)
    if memory is not None and memory.total is not None:
        run.ledger = memory.ledger
    if total is not None or fp8:
        if total is None:
            weights = None
        elif memory is not None and memory.total is not None:
            weights = memory.transformer_budget
        else:
            weights = total - (default_reserve(total, device) if reserve is None else reserve)
        plan = plan_memory(model, weights, fp8=fp8)
        if plan.streamed:
            run.ledger = run.ledger if run.ledger is not None else ByteLedger(keep_events=False)
            run.streamer = WeightStreamer(model, plan, device, run.ledger).attach()
    if run.streamer is None:
        model.to(device)
        if run.ledger is not None:
            run.counted = module_bytes(model)
            run.ledger.add(run.counted, "transformer")
    if cache is not None:
        run.cache = make_cache(cache, threshold, coefficients).attach(model)
    if run.streamer is not None or run.cache is not None or run.counted:
        record_attached(model, run)
    return run
