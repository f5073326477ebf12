"""History discretization, "+D" of the FramePack paper (arXiv 2504.12626, v3): a k-means codebook
of latent pixels, and at training time history latents replaced by their nearest codes
(`discretize` in the training config), which reduces drift in the forward order."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .data import LatentCache

__all__ = ["fit_codebook", "quantise", "fit_cache_codebook", "load_codebook", "save_codebook"]


def _nearest(flat: torch.Tensor, codebook: torch.Tensor, rows: int = 65536) -> torch.Tensor:
    """Index of the nearest code for each row of `flat` (N, C)."""
    return torch.cat([torch.cdist(part, codebook).argmin(1) for part in flat.split(rows)])


def fit_codebook(vectors: torch.Tensor, k: int, iters: int, generator: torch.Generator) -> torch.Tensor:
    """K-means of latent pixels `vectors` (N, C): k-means++ seeding, then `iters` Lloyd steps -> (k, C)."""
    vectors = vectors.float()
    n = vectors.shape[0]
    if n < k:
        raise ValueError(f"the cache has {n} latent pixels to fit, fewer than discretize = {k} codes.")
    centers = [vectors[int(torch.randint(n, (1,), generator=generator))]]
    d2 = (vectors - centers[0]).square().sum(1)  # (N,)
    for _ in range(1, k):
        if d2.sum() > 0:
            i = int(torch.multinomial(d2 / d2.sum(), 1, generator=generator))
        else:
            i = int(torch.randint(n, (1,), generator=generator))
        centers.append(vectors[i])
        d2 = torch.minimum(d2, (vectors - vectors[i]).square().sum(1))
    codebook = torch.stack(centers)  # (k, C)
    for _ in range(iters):
        assign = _nearest(vectors, codebook)
        sums = torch.zeros_like(codebook).index_add_(0, assign, vectors)
        counts = torch.bincount(assign, minlength=k)
        used = counts > 0  # an empty cluster keeps its centre
        codebook[used] = sums[used] / counts[used, None]
    return codebook


def quantise(latents: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Latents `(C, ...)` with every pixel (a C-vector) replaced by its nearest code of `(K, C)`."""
    c = latents.shape[0]
    flat = latents.movedim(0, -1).reshape(-1, c)  # (N, C)
    return codebook[_nearest(flat.float(), codebook)].reshape(*latents.shape[1:], c).movedim(-1, 0)


def fit_cache_codebook(
    cache: LatentCache,
    ids: list[int],
    channels: int,
    k: int,
    samples: int,
    iters: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """`fit_codebook` on about `samples` latent pixels (`channels`-vectors), as many drawn at random
    from each clip `ids` of `cache` -> (k, channels)."""
    per = -(-samples // len(ids))
    vectors = []
    for i in ids:  # `per` random latent pixels of every usable clip
        flat = cache[i]["latents"].float().movedim(0, -1).reshape(-1, channels)  # (N, C)
        vectors.append(flat[torch.randint(flat.shape[0], (per,), generator=generator)])
    return fit_codebook(torch.cat(vectors), k, iters, generator)


def load_codebook(path: Path, k: int, channels: int) -> torch.Tensor:
    """The codebook saved at `path`; ValueError (one sentence) unless it holds `k` codes of `channels`."""
    from safetensors.torch import load_file

    codebook = load_file(str(path))["codebook"]
    if tuple(codebook.shape) != (k, channels):
        raise ValueError(f"{path} holds {tuple(codebook.shape)} codes, not discretize = {k} of {channels}.")
    return codebook


def save_codebook(path: Path, codebook: torch.Tensor) -> None:
    from safetensors.torch import save_file

    save_file({"codebook": codebook.contiguous()}, str(path), metadata={"format": "framepack-codebook/1"})
