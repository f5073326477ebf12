"""Classifier-free guidance on velocities, CFG rescale, and velocity <-> data-prediction conversion.

Flow matching with `x_sigma = (1 - sigma) * x0 + sigma * noise` has velocity `v = noise - x0`, so
`x0 = x - sigma * v` and `v = (x - x0) / sigma`. Guidance: Ho & Salimans 2022, "Classifier-Free
Diffusion Guidance"; rescale: Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps
are Flawed" (section 3.4).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["cfg_velocity", "velocity_to_x0", "x0_to_velocity"]


def cfg_velocity(v_pos: Tensor, v_neg: Tensor | None, scale: float, rescale: float = 0.0) -> Tensor:
    """Guided velocity `v_neg + scale * (v_pos - v_neg)`, optionally rescaled towards the std of `v_pos`.

    With `rescale = phi > 0` the guided velocity is mixed with its copy rescaled to the per-sample
    standard deviation (over all non-batch dims) of `v_pos`: `phi * v * std(v_pos) / std(v) + (1 - phi) * v`.
    `scale == 1` returns `v_pos` itself and needs no negative pass (`v_neg` may be None).
    """
    if scale == 1:
        return v_pos
    if v_neg is None:
        raise ValueError(
            f"A CFG scale of {scale} needs the negative velocity v_neg (only scale 1 works without)."
        )
    v = v_neg + scale * (v_pos - v_neg)  # (B, ...)
    if rescale == 0:
        return v
    dims = list(range(1, v.ndim))
    std_pos = v_pos.std(dim=dims, keepdim=True)  # (B, 1, ...)
    std_cfg = v.std(dim=dims, keepdim=True)  # (B, 1, ...)
    ratio = torch.where(std_cfg > 0, std_pos / std_cfg, torch.ones_like(std_cfg))  # constant v: leave as is
    return rescale * (v * ratio) + (1 - rescale) * v


def _per_batch(sigma: Tensor | float, x: Tensor) -> Tensor:
    """`sigma` (a number, 0-d or `(B,)`) shaped to broadcast against `x` `(B, ...)`."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if sigma.ndim == 0:
        return sigma
    return sigma.reshape(-1, *([1] * (x.ndim - 1)))  # (B, 1, ...)


def velocity_to_x0(x: Tensor, v: Tensor, sigma: Tensor | float) -> Tensor:
    """Data prediction `x - sigma * v`; `sigma` is a number or one value per batch element `(B,)`."""
    return x - _per_batch(sigma, x) * v


def x0_to_velocity(x: Tensor, x0: Tensor, sigma: Tensor | float) -> Tensor:
    """Velocity `(x - x0) / sigma` (sigma > 0); `sigma` is a number or one value per batch element `(B,)`."""
    return (x - x0) / _per_batch(sigma, x)
