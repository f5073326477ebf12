"""TEMPORARY (replaced by the wt-speed branch): the per-run composition of streaming, offload, caches."""

from __future__ import annotations

from ..memory.runtime import accelerate, check_speed_settings
from .conditioning import offloaded

__all__ = ["accelerate_run", "check_speed_settings", "offloaded"]


def accelerate_run(model, device, s, memory=None):
    return accelerate(
        model,
        device,
        s.vram_budget,
        s.cache,
        s.cache_threshold,
        s.cache_coefficients,
        s.fp8_weights,
        memory=memory,
    )
