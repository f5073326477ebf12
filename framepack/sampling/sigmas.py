"""Noise levels for flow-matching sampling: the shifted uniform schedule of the FramePack release.

Flow matching (Lipman et al. 2023; rectified flow, Liu et al. 2023) interpolates
`x_sigma = (1 - sigma) * x0 + sigma * noise`. Sampling walks sigma from 1 to 0 on a grid that is
uniform in `t` and warped by the time shift of Esser et al. 2024 ("Scaling Rectified Flow
Transformers", SD3), whose strength `mu` grows with the number of noisy tokens as in Flux and
HunyuanVideo: longer sequences spend more steps at high noise.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["MU_MAX", "flow_shift", "dynamic_mu", "noisy_tokens", "sigma_schedule"]

MU_MAX = math.log(7.0)
"""Cap on the dynamic shift: `mu = ln 7` (shift 7), reached from about 8800 noisy tokens on."""


def flow_shift(t: Tensor, mu: float) -> Tensor:
    """Warp `t` in [0, 1] to `sigma = e^mu / (e^mu + 1/t - 1)`; t = 0 maps to 0 and t = 1 to 1 exactly.

    Written as `e^mu t / (e^mu t + 1 - t)`, the same function without the division by t.
    """
    e = math.exp(mu)
    return e * t / (e * t + (1.0 - t))


def dynamic_mu(seq_len: int) -> float:
    """Shift strength for `seq_len` noisy tokens: 0.5 at 256 tokens, 1.15 at 4096, capped at ln 7."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be a positive token count, got {seq_len}.")
    return min(0.5 + (seq_len - 256) * 0.65 / 3840, MU_MAX)


def noisy_tokens(t: int, h: int, w: int) -> int:
    """Noisy tokens of a window of `t` latent frames at `h x w` latent pixels: `t*h*w/4` (2x2 patches)."""
    if min(t, h, w) < 1:
        raise ValueError(f"Latent size (T, H, W) = ({t}, {h}, {w}) must be positive in every axis.")
    return t * h * w // 4


def sigma_schedule(steps: int, *, seq_len: int | None = None, shift: float | None = None) -> Tensor:
    """The `steps + 1` noise levels, float32, from exactly 1 down to exactly 0.

    `t = linspace(1, 0, steps + 1)` warped by `flow_shift` with `mu = ln(shift)` when a shift is given,
    else `mu = dynamic_mu(seq_len)`. A given shift takes precedence over `seq_len`.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}.")
    if shift is not None:
        if not shift > 0:
            raise ValueError(f"shift must be positive, got {shift}.")
        mu = math.log(shift)
    elif seq_len is not None:
        mu = dynamic_mu(seq_len)
    else:
        raise ValueError("sigma_schedule needs either seq_len (for the dynamic shift) or an explicit shift.")
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)  # (steps + 1,)
    return flow_shift(t, mu).to(torch.float32)
