"""Training samples and batches: sections of cached clips, packed as inference packs them.

One sample is one section of a cached clip (FRAMEPACK.md sections 2, 4, 5; docs/training.md):

1. a position `p`: the window is latents `1+p ... p+ws` (latent 0 is the start frame);
2. the history of the order, packed by the schedule with `gather_history` (zero-filled when short).
   Inverted (anti-drifting) order: the latents after the window, nearest first, and the start
   latent as the anchor across `q * ws` blank latents, `q` the gap in windows capped at
   `max_blank`, or (with `blank_probability`) a uniform draw up to it, since long videos pad less
   than the true gap; with `end_probability` the future is cut after a random number of windows,
   as in a video that ends there. Forward order: the latents before the window, start latent included. With
   +D (`discretize`) the history latents are first replaced by their nearest codebook vectors;
3. flow matching: `x = (1 - sigma) x0 + sigma noise`, target velocity `noise - x0`, MSE on the
   window (the only tokens the head reads out); `sigma = flow_shift(t, mu)` with inference's shift.

Every random draw comes from a generator seeded by (seed, step, sample), so a run resumed from
a checkpoint repeats an unbroken one and N processes see the global batch of one process.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..model import HistoryGroup
from ..packing import forward_layout, gather_history, inverted_layout
from ..sampling.sigmas import dynamic_mu, flow_shift, noisy_tokens
from .codebook import quantise
from .config import TrainConfig
from .data import LatentCache

__all__ = ["Batch", "Clips", "SectionSampler", "motion_weights", "seeded_generator", "weighted_mse"]


@dataclass
class Batch:
    """One process's share of a global batch: every tensor has that share's batch size B."""

    noisy: torch.Tensor  # (B, C, ws, h, w) x_sigma
    target: torch.Tensor  # (B, C, ws, h, w) velocity noise - x0
    sigma: torch.Tensor  # (B,)
    noisy_indices: torch.Tensor  # (B, ws)
    history: list[HistoryGroup]  # k1 (anchors + group 0) first, then the schedule's other groups
    text: torch.Tensor  # (B, L, D_text)
    text_mask: torch.Tensor  # (B, L)
    pooled: torch.Tensor  # (B, D_pooled)
    image_embeds: torch.Tensor  # (B, N, D_image)
    clips: list[int]
    positions: list[int]
    blanks: list[int]
    weight: torch.Tensor | None = None  # (B, 1, ws, h, w) loss weights (`motion_weight`), mean 1


def motion_weights(x0: torch.Tensor, start: torch.Tensor, strength: float) -> torch.Tensor:
    """(1, ws, h, w) loss weights of a window `x0` (C, ws, h, w): `1 + strength * d / max(d)` for
    the channel-mean distance `d` of each latent pixel from the start latent `start` (C, 1, h, w),
    scaled to a mean of 1 (all ones when nothing differs)."""
    d = (x0 - start).abs().mean(dim=0, keepdim=True)  # (1, ws, h, w)
    w = 1 + strength * d / d.max().clamp_min(1e-12)
    return w / w.mean()


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """The mean squared error, each element times its (broadcast) weight when one is given."""
    if weight is None:
        return F.mse_loss(pred, target)
    return ((pred - target).square() * weight.to(pred.device)).mean()


def seeded_generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded by mixing non-negative `parts` (seed, step, purpose, index)."""
    seed = int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0]) & (2**63 - 1)
    return torch.Generator().manual_seed(seed)


class Clips:
    """The cache's clips long enough for one section, grouped by shape, with a small LRU."""

    def __init__(self, cache: LatentCache, min_latents: int, keep: int = 64) -> None:
        self.cache, self.keep, self._lru = cache, keep, {}
        shapes = cache.groups()
        self.groups = sorted((s, ids) for s, ids in shapes.items() if s[0] >= min_latents)
        if not self.groups:
            longest = max((s[0] for s in shapes), default=0)
            raise ValueError(
                f"no clip in {cache.directory} has the {min_latents} latents one section needs "
                f"(the longest has {longest}); prepare longer clips or lower the window."
            )
        for (_, h, w), _ in self.groups:
            if h % 16 or w % 16:
                raise ValueError(f"clips of {h}x{w} pixels do not patchify; sizes must be multiples of 16.")

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if i in self._lru:
            self._lru[i] = self._lru.pop(i)  # most recently used last
        else:
            self._lru[i] = self.cache[i]
            if len(self._lru) > self.keep:
                self._lru.pop(next(iter(self._lru)))
        return self._lru[i]


class SectionSampler:
    """Draws the samples of a step and stacks one process's share of them into a `Batch`.

    `empty`: the empty caption's embeddings (caption dropout trains on them), `codebook`: the +D
    codes the history is quantised to (None: off), `world`: the processes sharing each batch.
    """

    def __init__(
        self,
        config: TrainConfig,
        clips: Clips,
        order: str,
        schedule,
        empty: dict[str, torch.Tensor] | None,
        codebook: torch.Tensor | None,
        world: int,
    ) -> None:
        self.config, self.clips, self.order, self.schedule = config, clips, order, schedule
        self.empty, self.codebook, self.world = empty, codebook, world
        self.window = schedule.generate

    def batch(self, step: int, rank: int) -> Batch:
        """Process `rank`'s share of the global batch of `step` (the same for any number of processes)."""
        cfg = self.config
        g = seeded_generator(cfg.seed, step, 0)
        sizes = torch.tensor([float(len(ids)) for _, ids in self.clips.groups])
        _, ids = self.clips.groups[int(torch.multinomial(sizes, 1, generator=g))]
        picks = torch.randint(len(ids), (cfg.batch_size,), generator=g).tolist()
        share = cfg.batch_size // self.world
        first = rank * share
        samples = [
            self.sample(ids[picks[j]], seeded_generator(cfg.seed, step, 1, j))
            for j in range(first, first + share)
        ]
        kernels = [grp.kernel.name for grp in self.schedule.groups]
        history = [
            HistoryGroup(
                torch.stack([s["history"][i] for s in samples]),  # (B, C, f, h, w)
                torch.tensor([s["indices"][i] for s in samples]),  # (B, f)
                kernels[i],
            )
            for i in range(len(kernels))
        ]
        stack = lambda key: torch.stack([s[key] for s in samples])  # noqa: E731
        return Batch(
            noisy=stack("noisy"),
            target=stack("target"),
            sigma=torch.tensor([s["sigma"] for s in samples]),
            noisy_indices=torch.tensor([s["noisy_indices"] for s in samples]),
            history=history,
            text=stack("text"),
            text_mask=stack("text_mask"),
            pooled=stack("pooled"),
            image_embeds=stack("image_embeds"),
            clips=[s["clip"] for s in samples],
            positions=[s["position"] for s in samples],
            blanks=[s["blank"] for s in samples],
            weight=stack("weight") if cfg.motion_weight else None,
        )

    def sample(self, clip_id: int, g: torch.Generator) -> dict:
        """One section of clip `clip_id`, every draw from `g` (position, history, sigma, noise, caption)."""
        cfg, ws = self.config, self.window
        clip = self.clips[clip_id]
        latents = clip["latents"].float()  # (C, T, h, w)
        _, t, h, w = latents.shape
        if cfg.positions == "slots":
            p = ws * int(torch.randint((t - 1) // ws, (1,), generator=g))
        else:
            p = int(torch.randint(t - ws, (1,), generator=g))
        x0 = latents[:, 1 + p : 1 + p + ws]  # (C, ws, h, w)
        layout, groups, blank = self._history(latents, p, g)
        sigma = self._sigma(noisy_tokens(ws, h, w), g)
        noise = torch.randn(x0.shape, generator=g)
        text, mask, pooled = clip["text"].float(), clip["text_mask"].float(), clip["pooled"].float()
        if cfg.caption_dropout and float(torch.rand((), generator=g)) < cfg.caption_dropout:
            text, mask, pooled = (self.empty[k].float() for k in ("text", "text_mask", "pooled"))
        return {
            "noisy": (1 - sigma) * x0 + sigma * noise,
            "target": noise - x0,
            "sigma": sigma,
            "noisy_indices": list(layout.noisy),
            "history": groups,
            "indices": [list(i) for i in [layout.clean_k1(), *layout.groups[1:]]],
            "text": text,
            "text_mask": mask,
            "pooled": pooled,
            "image_embeds": clip["image_embeds"].float(),
            "clip": clip_id,
            "position": p,
            "blank": blank,
            "weight": motion_weights(x0, latents[:, :1], cfg.motion_weight) if cfg.motion_weight else None,
        }

    def _history(self, latents: torch.Tensor, p: int, g: torch.Generator):
        """(layout, packed history groups (C, f, h, w) with the anchors first in k1, blank latents)
        of the window at `p` in `latents` (C, T, h, w)."""
        cfg, ws, schedule = self.config, self.window, self.schedule
        anchors = latents[:, : schedule.anchors]  # (C, A, h, w)
        blank = 0
        if self.order == "inverted":
            q = min(p // ws, cfg.max_blank)  # the true gap in windows, capped as inference caps it
            if float(torch.rand((), generator=g)) < cfg.blank_probability:
                q = int(torch.randint(q + 1, (1,), generator=g))  # long videos pad less than the gap
            blank = q * ws
            layout = inverted_layout(schedule, blank)
            history = latents[:, 1 + p + ws :]  # nearest first
            if cfg.end_probability and float(torch.rand((), generator=g)) < cfg.end_probability:
                # As if the video ended sooner: keep a uniform number of the future's whole windows,
                # so sections see the zero (not yet generated) history a shorter video gives them.
                windows = history.shape[1] // ws
                history = history[:, : ws * int(torch.randint(windows + 1, (1,), generator=g))]
        else:
            layout = forward_layout(schedule)
            history = latents[:, : 1 + p]  # time order, most recent last
        if self.codebook is not None and history.shape[1]:
            history = quantise(history, self.codebook)
        groups = [x[0] for x in gather_history(history[None], schedule, self.order)]  # (C, f, h, w) each
        groups[0] = torch.cat([anchors, groups[0]], dim=1)  # the clean k1 group: anchors first
        return layout, groups, blank

    def _sigma(self, tokens: int, g: torch.Generator) -> float:
        """The noise level: a uniform or logit-normal `t` through inference's shift for `tokens`."""
        cfg = self.config
        mu = math.log(cfg.shift) if cfg.shift is not None else dynamic_mu(tokens)
        if cfg.sigma_sampling == "shifted-uniform":
            u = torch.rand((), generator=g, dtype=torch.float64)
        else:
            u = torch.sigmoid(
                cfg.logit_mean + cfg.logit_std * torch.randn((), generator=g, dtype=torch.float64)
            )
        return float(flow_shift(u, mu))
