"""Step caches attached as hooks: TeaCache (the release's rule) and a first-block residual cache."""

from .step_cache import (
    CACHES,
    TEACACHE_HUNYUAN,
    CacheStats,
    FirstBlockCache,
    StepCache,
    TeaCache,
    make_cache,
    rel_l1,
    reset_caches,
)

__all__ = [
    "CACHES",
    "TEACACHE_HUNYUAN",
    "CacheStats",
    "FirstBlockCache",
    "StepCache",
    "TeaCache",
    "make_cache",
    "rel_l1",
    "reset_caches",
]
