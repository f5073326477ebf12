"""Samplers for flow matching in the k-diffusion style: one signature, any callable as the model.

Every sampler is `sampler(model, x, sigmas, *, callback=None, cancel=None) -> Tensor` where

- `model(x, sigma_vec)` returns the data prediction x0 for latents `x` at noise level `sigma_vec`
  (shape `(B,)`, dtype of `x`); a velocity network is wrapped with `velocity_to_x0`;
- `sigmas` is a decreasing 1-D tensor of noise levels, all positive except possibly the last, 0;
- `callback(step, total, x, x0)` runs after every step with `x` at `sigmas[step + 1]` and the data
  prediction `x0` of that step's model call;
- `cancel()` is asked before every model call; when it returns True the sampler raises `Cancelled`.

Both make exactly one model call per step (`len(sigmas) - 1` calls) and return `x` at `sigmas[-1]`,
which for the usual final sigma 0 is the data prediction of the last model call.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["Cancelled", "Model", "Callback", "Sampler", "euler", "unipc", "SAMPLERS", "get_sampler"]

Model = Callable[[Tensor, Tensor], Tensor]
Callback = Callable[[int, int, Tensor, Tensor], None]
Sampler = Callable[..., Tensor]


class Cancelled(Exception):
    """Raised by a sampler when its `cancel()` hook returns True between steps."""


def _sigma_values(sigmas: Tensor) -> list[float]:
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(
            f"sigmas must be a 1-D tensor of at least 2 noise levels, got shape {tuple(sigmas.shape)}."
        )
    s = [float(v) for v in sigmas.tolist()]
    if not all(math.isfinite(v) for v in s) or min(s[:-1]) <= 0 or s[-1] < 0:
        raise ValueError("sigmas must be finite and positive, except the last which may be 0.")
    if any(s[i + 1] >= s[i] for i in range(len(s) - 1)):
        raise ValueError("sigmas must be strictly decreasing.")
    return s


def _denoise(model: Model, x: Tensor, sigma: float, step: int, cancel: Callable[[], bool] | None) -> Tensor:
    if cancel is not None and cancel():
        raise Cancelled(f"Sampling was cancelled before step {step}.")
    return model(x, x.new_full((x.shape[0],), sigma))  # x0: same shape as x


def euler(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    callback: Callback | None = None,
    cancel: Callable[[], bool] | None = None,
) -> Tensor:
    """Euler's method on the flow-matching ODE `dx/dsigma = v = (x - x0) / sigma`.

    Flow matching: Lipman et al. 2023, "Flow Matching for Generative Modeling"; Liu et al. 2023,
    "Flow Straight and Fast" (rectified flow). First order; one model call per step. A step to
    sigma = 0 lands on the data prediction exactly.
    """
    s = _sigma_values(sigmas)
    total = len(s) - 1
    for i in range(total):
        x0 = _denoise(model, x, s[i], i, cancel)
        if s[i + 1] == 0:
            x = x0
        else:
            v = (x - x0) / s[i]
            x = x + (s[i + 1] - s[i]) * v
        if callback is not None:
            callback(i, total, x, x0)
    return x


def _combine(weights: list[float], terms: list[Tensor]) -> Tensor:
    """`sum(w * d)` over matching weights and tensors."""
    out = weights[0] * terms[0]
    for w, d in zip(weights[1:], terms[1:], strict=True):
        out = out + w * d
    return out


def _unipc_coefficients(
    lambdas: list[float], lambda_t: float, order: int
) -> tuple[float, float, list[float], list[float], list[float]]:
    """UniPC-bh1 coefficients for a step from `lambdas[-1]` to `lambda_t` using `order` past points.

    Returns `(h_phi_1, B_h, rks, rhos_p, rhos_c)`: `h_phi_1 = expm1(-h)`, `B_h = -h`, the ratios `r_k` of the older
    lambda gaps to `h` (newest history point first, `order - 1` of them), the predictor weights
    (`order - 1`) and the corrector weights (`order`, the last for the new model output).
    """
    lam0 = lambdas[-1]
    h = lambda_t - lam0
    rks = [(lambdas[-(k + 1)] - lam0) / h for k in range(1, order)] + [1.0]
    hh = -h
    b_h = hh  # B(h) of variant bh1
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1.0
    factorial = 1
    rows, b = [], []
    for k in range(1, order + 1):
        rows.append([r ** (k - 1) for r in rks])
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    R = torch.tensor(rows, dtype=torch.float64)  # (order, order)
    bt = torch.tensor(b, dtype=torch.float64)  # (order,)
    if order == 1:
        rhos_p: list[float] = []
    elif order == 2:
        rhos_p = [0.5]
    else:
        rhos_p = torch.linalg.solve(R[:-1, :-1], bt[:-1]).tolist()
    rhos_c = [0.5] if order == 1 else torch.linalg.solve(R, bt).tolist()
    return h_phi_1, b_h, rks[:-1], rhos_p, rhos_c


def unipc(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    callback: Callback | None = None,
    cancel: Callable[[], bool] | None = None,
) -> Tensor:
    """UniPC, variant bh1, data prediction, order up to 3 (the sampler of the FramePack release).

    Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion
    Models" (NeurIPS 2023), on the exponential integrator in data-prediction form of DPM-Solver++
    (Lu et al. 2022). For flow matching the schedule is taken as alpha = 1, sigma = sigma, so
    `lambda = -log(sigma)` and the first-order step is `x_t = (sigma_t / sigma_s) x_s - expm1(-h) x0_s`.

    Order `min(3, len(sigmas) - 2)`, warming up through orders 1 and 2. Step i calls the model once
    at `sigmas[i]`, uses that output to correct x there (UniC, no second call on the corrected x),
    then predicts x at `sigmas[i + 1]` (UniP) from the stored data predictions. A step to sigma = 0
    is first order, whose limit as `lambda -> inf` is `x = x0` of the last call: a higher-order
    extrapolation in lambda diverges there. The callback sees the predicted (not yet corrected) x.
    """
    s = _sigma_values(sigmas)
    total = len(s) - 1
    max_order = max(1, min(3, total - 1))
    lambdas: list[float] = []  # lambda of each stored data prediction, newest last
    history: list[Tensor] = []  # data predictions, newest last
    pending = None  # (x_lin, D1s, B_h, rhos_c, x0_prev): the corrector awaiting the model at s[i]
    for i in range(total):
        x0 = _denoise(model, x, s[i], i, cancel)
        if pending is not None:  # UniC: correct x at s[i] with the new data prediction
            x_lin, d1s, b_h, rhos_c, x0_prev = pending
            x = x_lin - b_h * _combine(rhos_c, [*d1s, x0 - x0_prev])
        lambdas = (lambdas + [-math.log(s[i])])[-max_order:]
        history = (history + [x0])[-max_order:]

        if s[i + 1] == 0:
            x, pending = x0, None
        else:  # UniP: predict x at s[i + 1]
            order = min(i + 1, max_order)
            lambda_t = -math.log(s[i + 1])
            h_phi_1, b_h, rks, rhos_p, rhos_c = _unipc_coefficients(lambdas, lambda_t, order)
            x0_prev = history[-1]
            d1s = [(history[-(k + 2)] - x0_prev) / r for k, r in enumerate(rks)]
            x_lin = (s[i + 1] / s[i]) * x - h_phi_1 * x0_prev
            x = x_lin - b_h * _combine(rhos_p, d1s) if d1s else x_lin
            pending = (x_lin, d1s, b_h, rhos_c, x0_prev)
        if callback is not None:
            callback(i, total, x, x0)
    return x


SAMPLERS: dict[str, Sampler] = {"unipc": unipc, "euler": euler}
"""Samplers by name; `unipc` is the release's choice."""


def get_sampler(name: str) -> Sampler:
    """The sampler called `name` (see `SAMPLERS`)."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"Unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}.") from None
