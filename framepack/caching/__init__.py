"""Step caches attached as hooks: TeaCache (the release's rule), a first-block residual cache and
MagCache (magnitude ratios of successive residuals, calibrated per model)."""

from .step_cache import (
    CACHES,
    MAGCACHE_DEMO,
    TEACACHE_HUNYUAN,
    CacheStats,
    FirstBlockCache,
    MagCache,
    StepCache,
    TeaCache,
    magnitude_ratio,
    make_cache,
    ratio_curve,
    rel_l1,
    reset_caches,
)

__all__ = [
    "CACHES",
    "MAGCACHE_DEMO",
    "TEACACHE_HUNYUAN",
    "CacheStats",
    "FirstBlockCache",
    "MagCache",
    "StepCache",
    "TeaCache",
    "make_cache",
    "magnitude_ratio",
    "ratio_curve",
    "rel_l1",
    "reset_caches",
]
