"""Step caches: skip every transformer block at sampling steps where the output barely changes.

Both caches hook the blocks from outside (`framepack.memory.add_hook`) and reuse the residual
`blocks(x) - x` of the last fully computed step for the image tokens the head reads. The first
block decides; when it says skip, the other blocks pass their inputs through untouched and the
last one adds the cached residual. Call `reset_caches(model, steps, branches)` at every section
(the pipeline does): the first and last steps of a section are always computed.

- `TeaCache` is the release's rule (FRAMEPACK.md section 7): the relative L1 change of block 0's
  AdaLN-modulated input, rescaled by a polynomial fitted for HunyuanVideo, is accumulated; the
  blocks are computed again once the sum reaches the threshold.
- `FirstBlockCache` always computes block 0 and compares its residual with the one of the last
  computed step (rescaled by a polynomial that `framepack.training.calibrate` fits on the model at
  hand; identity by default): the network's own response is the signal, not its input.
- `MagCache` (Ma et al. 2025, "MagCache: Fast Video Generation with Magnitude-Aware Cache") reads
  no signal at run time: the magnitude ratio of successive residuals, ||r_t|| / ||r_t-1||, follows
  one curve per model, measured once by `framepack.training.calibrate`. Skipping step t costs an
  error of about |1 - product of the ratios since the last computed step|; those errors are
  summed, and the blocks are computed again once the sum passes the threshold or K steps were
  skipped in a row.

A threshold of 0 computes every step and gives exactly the uncached output.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from ..memory.hooks import HookHandle, add_hook, hooks_of
from ..memory.streaming import blocks_of
from ..model.layers import DualStreamBlock
from ..model.ops import modulated_layer_norm

__all__ = [
    "TEACACHE_HUNYUAN",
    "CacheStats",
    "StepCache",
    "TeaCache",
    "FirstBlockCache",
    "MagCache",
    "MAGCACHE_DEMO",
    "CACHES",
    "make_cache",
    "reset_caches",
    "rel_l1",
    "magnitude_ratio",
    "ratio_curve",
    "modulated_input",
    "first_block_residual",
    "image_tokens",
]

Reduce = Callable[[torch.Tensor], torch.Tensor]  # a tensor summed over the ranks

# The release's TeaCache rescale polynomial for HunyuanVideo, highest power first.
TEACACHE_HUNYUAN = (733.226126, -401.131952, 67.5869174, -3.149878, 0.0961237896)


# MagCache's magnitude-ratio curve of the shipped demo model (framepack/demo_model): 2 sections x
# 25 UniPC steps of its example green_circle_moves_down, fp32, from `python -m
# framepack.training.calibrate --model framepack/demo_model --image .../green_circle_moves_down.png
# --prompt "<its caption>" --steps 25` (another example gives the same ratios within 0.004). Step 0
# has no predecessor (1). Another model (the 13B release, a fine-tune) needs its own calibration.
MAGCACHE_DEMO = (
    1.0, 0.96631, 0.96002, 0.96342, 0.9782, 0.96846, 0.98014, 0.97721, 0.98167, 0.96898,
    0.98214, 0.97158, 0.9899, 0.96412, 0.9707, 0.97276, 0.96758, 0.95662, 0.96411, 0.95279,
    0.94755, 0.93905, 0.93054, 0.91646, 0.89468,
)  # fmt: skip


def rel_l1(a: torch.Tensor, b: torch.Tensor, reduce: Reduce | None = None) -> float:
    """mean|a - b| / mean|b| (as the release computes it). With `reduce` (the sum of a tensor over
    the ranks that each hold a shard of the tokens, `framepack.parallel`): the same over every
    rank's tokens, from the two sums, so that every rank reads the same number."""
    if reduce is None:
        return ((a - b).abs().mean() / b.abs().mean()).item()
    sums = reduce(torch.stack([(a - b).abs().float().sum(), b.abs().float().sum()]).double())  # (2,)
    return (sums[0] / sums[1]).item()


def magnitude_ratio(residual: torch.Tensor, previous: torch.Tensor) -> float:
    """MagCache's ratio: the mean over tokens of ||residual|| / ||previous|| (norms over channels)."""
    norms = residual.float().norm(dim=-1) / previous.float().norm(dim=-1)  # (B, N)
    return norms.mean().item()


def ratio_curve(ratios: tuple[float, ...], steps: int) -> np.ndarray:
    """A magnitude-ratio curve calibrated at `len(ratios)` steps, for a section of `steps` steps.

    The log magnitude of step i's residual relative to step 0 (the cumulative sum of the log
    ratios) is interpolated linearly at the step's place in the schedule (i / steps) and
    differenced again, extrapolating the last slope past the calibrated end. Twice the steps thus
    get about the square root of each ratio, and a product over any stretch of the schedule stays
    what was measured (MagCache's own code takes the nearest calibrated step instead, which doubles
    the predicted error per unit of time when the steps double). Same length: the curve itself.
    """
    r = np.asarray(ratios, dtype=np.float64)
    if steps == len(r):
        return r.copy()
    log_mag = np.cumsum(np.log(r[1:]), dtype=np.float64)
    log_mag = np.concatenate([[0.0], log_mag])  # (n,) step 0 is the reference
    src = np.arange(len(r)) / len(r)
    dst = np.arange(steps) / steps
    out = np.interp(dst, src, log_mag)
    if len(r) > 1:
        slope = (log_mag[-1] - log_mag[-2]) / (src[-1] - src[-2])
        beyond = dst > src[-1]
        out[beyond] = log_mag[-1] + slope * (dst[beyond] - src[-1])
    return np.exp(np.diff(out, prepend=0.0))  # (steps,) the first is exp(0) = 1


@dataclass
class CacheStats:
    evaluations: int = 0  # model calls seen
    skipped: int = 0  # calls whose blocks were (all but block 0 for FirstBlockCache) skipped

    @property
    def skipped_fraction(self) -> float:
        return self.skipped / self.evaluations if self.evaluations else 0.0

    def as_dict(self) -> dict:
        return {"evaluations": self.evaluations, "skipped": self.skipped}


@dataclass
class _Branch:
    """State of one sequence of calls (the conditional or the negative pass of CFG)."""

    step: int = 0
    previous: torch.Tensor | None = None  # last signal tensor
    accumulated: float = 0.0
    residual: torch.Tensor | None = None  # blocks' residual for the read-out tokens
    anchor: torch.Tensor | None = None  # image tokens the residual is added to (this call)
    extra: dict = field(default_factory=dict)


def image_tokens(block: nn.Module, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(image tokens (B, N, D), temb (B, D), N) from a block's call arguments."""
    if isinstance(block, DualStreamBlock):
        x, temb, rope = args[0], args[2], args[3]
        return x, temb, x.shape[1]
    h, temb, rope = args[0], args[1], args[2]
    n = rope.shape[1]
    return h[:, :n], temb, n


def modulated_input(block: nn.Module, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
    """Block 0's AdaLN-modulated image tokens (B, N, D): TeaCache's signal."""
    norm = block.norm1 if isinstance(block, DualStreamBlock) else block.norm
    shift, scale = norm(temb)[:2]
    return modulated_layer_norm(x, shift, scale)


def first_block_residual(block: nn.Module, x: torch.Tensor, out, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(block 0's image-token output y, its residual y - x) from the block's output."""
    y = out[0] if isinstance(out, tuple) else out[:, :n]  # (B, N, D), fewer rows if it reads out
    return y, y - x[:, x.shape[1] - y.shape[1] :]


class StepCache:
    """Base class: hook plumbing, per-section state, statistics. Subclasses implement `decide`."""

    name = "cache"
    priority = 10  # outside weight streaming (except on block 0): skipped blocks are never loaded
    default_coefficients: tuple[float, ...] = (1.0, 0.0)  # rescale polynomial, highest power first
    reads_block0 = True  # decides from block 0's weights or output (streaming loads it first)

    @classmethod
    def check_coefficients(cls, coefficients: tuple[float, ...]) -> None:
        """Raise ValueError (one sentence) if `coefficients` (finite numbers) do not suit this cache."""

    def __init__(self, threshold: float, coefficients: tuple[float, ...] | None = None) -> None:
        if not threshold >= 0:
            raise ValueError(f"a cache threshold must be a number >= 0, got {threshold!r}.")
        self.threshold = float(threshold)
        # Set when the blocks see a shard of the tokens (sequence parallelism): the statistic is
        # then summed over the ranks, so that every rank skips the same steps as one process would.
        self.reduce: Reduce | None = None
        self.coefficients = tuple(coefficients) if coefficients is not None else self.default_coefficients
        self.stats = CacheStats()
        self.handles: list[HookHandle] = []
        self.reset()

    def rescale(self, x: float) -> float:
        return float(np.polyval(self.coefficients, x))

    # ------------------------------------------------------------------ attach / reset
    def attach(self, model: nn.Module) -> StepCache:
        blocks = blocks_of(model)
        if not blocks:
            raise ValueError("this model has no blocks to cache.")
        self.last = len(blocks) - 1
        for j, block in enumerate(blocks):
            self.handles.append(add_hook(block, _CacheHook(self, j)))
        return self

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.reset()

    def reset(self, steps: int | None = None, branches: int = 1) -> None:
        """Start a section of `steps` sampling steps with `branches` model calls per step."""
        self.steps, self.branches = steps, max(int(branches), 1)
        self.state = [_Branch() for _ in range(self.branches)]
        self.calls = 0
        self.skipping = False
        self.current: _Branch | None = None

    # ------------------------------------------------------------------ the hooks
    def first(self, block: nn.Module, forward, args: tuple, kwargs: dict):
        st = self.state[self.calls % self.branches]
        self.calls += 1
        self.current = st
        forced = st.step == 0 or (self.steps is not None and st.step >= self.steps - 1) or st.residual is None
        self.stats.evaluations += 1
        out, skip = self.decide(st, block, forward, args, kwargs, forced or self.threshold <= 0)
        self.skipping = skip
        st.step += 1
        if skip:
            self.stats.skipped += 1
        if self.last == 0:  # a single block: it is also the last one
            return self.finish(block, st, out, args, kwargs)
        if out is not None:
            return out
        return self.passthrough(block, args, kwargs, False)

    def decide(self, st: _Branch, block, forward, args, kwargs, forced: bool):
        """Return (block 0's output or None when not run, skip the remaining blocks?)."""
        raise NotImplementedError

    def finish(self, block: nn.Module, st: _Branch, out, args: tuple, kwargs: dict):
        """After the last block of a computed step: store the residual; on a skipped one, apply it."""
        if self.skipping:
            return self.passthrough(block, args, kwargs, True)
        if isinstance(block, DualStreamBlock):
            img = out[0]  # (B, N, D)
        else:  # (B, keep_last, D), or (B, N + M, D) without keep_last
            keep = kwargs.get("keep_last", args[4] if len(args) > 4 else None)
            img = out if keep is not None else out[:, : args[2].shape[1]]
        st.residual = img - st.anchor[:, st.anchor.shape[1] - img.shape[1] :]
        st.anchor = None
        return out

    def passthrough(self, block: nn.Module, args: tuple, kwargs: dict, last: bool):
        """A skipped block: inputs unchanged; the last one adds the cached residual."""
        residual = self.current.residual
        if isinstance(block, DualStreamBlock):  # (x, c, temb, rope, key_mask)
            x, c = args[0], args[1]
            return (x + residual, c) if last else (x, c)
        h, rope = args[0], args[2]  # (h, temb, rope, key_mask, keep_last)
        keep = kwargs.get("keep_last", args[4] if len(args) > 4 else None)
        n = rope.shape[1]
        if keep is None:
            return torch.cat([h[:, :n] + residual, h[:, n:]], dim=1) if last else h
        rows = h[:, n - keep : n]  # (B, keep, D) the noisy tokens, as the block would return
        return rows + residual if last else rows


class _CacheHook:
    def __init__(self, cache: StepCache, j: int) -> None:
        self.cache, self.j = cache, j
        # Block 0 decides from its own weights, so weight streaming loads it first (runs outside);
        # around the other blocks the cache runs outside, so a skipped block is never loaded.
        self.priority = -cache.priority if j == 0 and cache.reads_block0 else cache.priority

    def __call__(self, module, forward, *args, **kwargs):
        cache = self.cache
        if self.j == 0:
            return cache.first(module, forward, args, kwargs)
        if cache.skipping:
            return cache.passthrough(module, args, kwargs, self.j == cache.last)
        out = forward(*args, **kwargs)
        if self.j == cache.last:
            return cache.finish(module, cache.current, out, args, kwargs)
        return out


class TeaCache(StepCache):
    """The release's TeaCache: accumulate the rescaled change of block 0's modulated input."""

    name = "teacache"
    default_coefficients = TEACACHE_HUNYUAN

    def decide(self, st, block, forward, args, kwargs, forced):
        x, temb, _ = image_tokens(block, args, kwargs)
        signal = modulated_input(block, x, temb)  # (B, N, D)
        if forced or st.previous is None:
            compute = True
            st.accumulated = 0.0
        else:
            st.accumulated += self.rescale(rel_l1(signal, st.previous, self.reduce))
            compute = st.accumulated >= self.threshold
            if compute:
                st.accumulated = 0.0
        st.previous = signal
        if not compute:
            return None, True
        st.anchor = x
        return forward(*args, **kwargs), False


class FirstBlockCache(StepCache):
    """Compute block 0; skip the rest while its residual stays close to the last computed one."""

    name = "fbcache"

    def decide(self, st, block, forward, args, kwargs, forced):
        x, _, n = image_tokens(block, args, kwargs)
        out = forward(*args, **kwargs)
        y, signal = first_block_residual(block, x, out, n)
        skip = (
            not forced
            and st.previous is not None
            and self.rescale(rel_l1(signal, st.previous, self.reduce)) < self.threshold
        )
        if not skip:
            st.previous = signal  # compared with the last *computed* step
            st.anchor = y
        return out, skip


class MagCache(StepCache):
    """MagCache (Ma et al. 2025, arXiv 2506.09045): skip steps by the calibrated magnitude ratios.

    `coefficients` is the per-step mean ratio ||r_t|| / ||r_t-1|| of the blocks' residual on the
    read-out tokens (`framepack.training.calibrate`; default: the demo model's, `MAGCACHE_DEMO`),
    mapped onto the section's step count by `ratio_curve`. After the first `retention` fraction of
    the steps, each step multiplies the ratio product since the last computed step and adds
    |1 - product| to the error; the step is skipped while that error stays within the threshold,
    at most `k` steps in a row, and the step's own ratio is within `max_step_change` of 1. The
    defaults are those of lllyasviel/FramePack PR #673 (threshold 0.1, K 3, retention 0.2, 0.06).
    The decision needs no computation, so a skipped step runs no block at all.
    """

    name = "magcache"
    default_coefficients = MAGCACHE_DEMO
    reads_block0 = False

    def __init__(
        self,
        threshold: float,
        coefficients: tuple[float, ...] | None = None,
        k: int = 3,
        retention: float = 0.2,
        max_step_change: float = 0.06,
    ) -> None:
        self.check_coefficients(coefficients or self.default_coefficients)
        self.k, self.retention, self.max_step_change = int(k), float(retention), float(max_step_change)
        super().__init__(threshold, coefficients)

    @classmethod
    def check_coefficients(cls, coefficients) -> None:
        if not all(float(c) > 0 for c in coefficients):
            raise ValueError(f"MagCache's magnitude ratios must all be positive, got {list(coefficients)!r}.")

    def reset(self, steps: int | None = None, branches: int = 1) -> None:
        super().reset(steps, branches)
        n = steps if steps is not None else len(self.coefficients)
        self.curve = ratio_curve(self.coefficients, n)  # (n,) one ratio per step
        self.kept = int(self.retention * n)  # the first steps, always computed

    def decide(self, st, block, forward, args, kwargs, forced):
        step = st.step
        if not (forced or step < self.kept or step >= len(self.curve)):
            ratio = float(self.curve[step])
            product = st.extra.get("product", 1.0) * ratio
            st.accumulated += abs(1.0 - product)
            skips = st.extra.get("skips", 0) + 1
            if (
                st.accumulated <= self.threshold
                and skips <= self.k
                and abs(1.0 - ratio) <= self.max_step_change
            ):
                st.extra.update(product=product, skips=skips)
                return None, True
        st.accumulated = 0.0
        st.extra.update(product=1.0, skips=0)
        x, _, _ = image_tokens(block, args, kwargs)
        st.anchor = x
        return forward(*args, **kwargs), False


CACHES: dict[str, type[StepCache]] = {"teacache": TeaCache, "fbcache": FirstBlockCache, "magcache": MagCache}


def make_cache(name: str, threshold: float, coefficients: tuple[float, ...] | None = None) -> StepCache:
    """A cache by name (`teacache`, `fbcache`, `magcache`); ValueError for unknown names."""
    try:
        cls = CACHES[name]
    except KeyError:
        raise ValueError(f"unknown step cache {name!r}; choose one of {', '.join(CACHES)}.") from None
    return cls(threshold, coefficients)


def reset_caches(model: nn.Module, steps: int | None = None, branches: int = 1) -> list[StepCache]:
    """Reset every step cache attached to `model` for a new section; returns them."""
    blocks = blocks_of(model)
    found = []
    for hook in hooks_of(blocks[0]) if blocks else []:
        cache = getattr(hook, "cache", None)
        if isinstance(cache, StepCache) and cache not in found:
            cache.reset(steps, branches)
            found.append(cache)
    return found
