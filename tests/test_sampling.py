"""Sigma schedules, the Euler and UniPC samplers against analytic flows, hooks and CFG."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from framepack.sampling import (
    MU_MAX,
    SAMPLERS,
    Cancelled,
    cfg_velocity,
    dynamic_mu,
    euler,
    flow_shift,
    get_sampler,
    noisy_tokens,
    sigma_schedule,
    unipc,
    velocity_to_x0,
    x0_to_velocity,
)

F64 = torch.float64
SAMPLER_FNS = [euler, unipc]
# The 640 resolution buckets in latent pixels (pixels / 8) and their transposes.
BUCKETS = [(52, 120), (56, 108), (60, 104), (64, 96), (68, 88), (72, 84), (76, 80), (80, 80)]
LATENT_BUCKETS = BUCKETS + [(w, h) for h, w in BUCKETS]


def t_grid(steps: int, shift: float) -> torch.Tensor:
    """A float64 sigma schedule: uniform in t, shifted, from 1 to 0."""
    return flow_shift(torch.linspace(1.0, 0.0, steps + 1, dtype=F64), math.log(shift))


def fitted_order(steps: list[int], errors: list[float]) -> float:
    """Least-squares slope of -log(error) against log(steps)."""
    lx = torch.tensor([math.log(n) for n in steps], dtype=F64)
    ly = torch.tensor([math.log(e) for e in errors], dtype=F64)
    lx, ly = lx - lx.mean(), ly - ly.mean()
    return -float((lx * ly).sum() / (lx * lx).sum())


# ---------------------------------------------------------------- sigma schedules


def test_flow_shift_endpoints_and_formula():
    t = torch.linspace(1.0, 0.0, 101, dtype=F64)
    for mu in (-1.0, 0.0, 0.5, MU_MAX, 3.0):
        s = flow_shift(t, mu)
        assert s[0].item() == 1.0 and s[-1].item() == 0.0
        assert torch.all(s[1:] < s[:-1])
        inner = t[1:-1]
        ref = math.exp(mu) / (math.exp(mu) + 1 / inner - 1)
        torch.testing.assert_close(s[1:-1], ref, rtol=1e-14, atol=0)
    torch.testing.assert_close(flow_shift(t, 0.0), t)  # mu = 0 is the identity


@pytest.mark.parametrize("steps", [1, 2, 7, 25, 50, 1000])
@pytest.mark.parametrize("kw", [{"seq_len": 256}, {"seq_len": 14400}, {"shift": 3.0}, {"shift": 0.5}])
def test_schedule_endpoints_monotone(steps, kw):
    s = sigma_schedule(steps, **kw)
    assert s.dtype == torch.float32 and s.shape == (steps + 1,)
    assert s[0].item() == 1.0 and s[-1].item() == 0.0
    assert torch.all(s[1:] < s[:-1])


def test_dynamic_mu_values():
    assert dynamic_mu(256) == pytest.approx(0.5)
    assert dynamic_mu(4096) == pytest.approx(1.15)
    assert dynamic_mu(1_000_000) == MU_MAX == pytest.approx(math.log(7))
    assert dynamic_mu(2176) == pytest.approx(0.825)  # linear in between
    cap = 256 + (MU_MAX - 0.5) * 3840 / 0.65  # about 8798 tokens
    assert dynamic_mu(math.floor(cap)) < MU_MAX == dynamic_mu(math.ceil(cap))


def test_640_buckets_are_capped():
    assert noisy_tokens(9, 80, 80) == 14400
    assert dynamic_mu(14400) == MU_MAX
    for h, w in LATENT_BUCKETS:
        assert dynamic_mu(noisy_tokens(9, h, w)) == MU_MAX
    torch.testing.assert_close(sigma_schedule(25, seq_len=14400), sigma_schedule(25, shift=7.0))


def test_schedule_values():
    s = sigma_schedule(4, seq_len=4096)
    t = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=F64)
    e = math.exp(1.15)
    ref = torch.cat([torch.ones(1, dtype=F64), e / (e + 1 / t[1:-1] - 1), torch.zeros(1, dtype=F64)])
    torch.testing.assert_close(s, ref.float())
    # A given shift overrides seq_len; shift 1 is the plain linear schedule.
    torch.testing.assert_close(sigma_schedule(8, seq_len=14400, shift=1.0), torch.linspace(1, 0, 9))
    assert not torch.equal(sigma_schedule(8, seq_len=256), sigma_schedule(8, seq_len=14400))


@pytest.mark.parametrize(
    "args, kw, match",
    [
        ((0,), {"shift": 3.0}, "steps"),
        ((-2,), {"seq_len": 100}, "steps"),
        ((10,), {"shift": 0.0}, "shift"),
        ((10,), {"shift": -1.0}, "shift"),
        ((10,), {}, "seq_len"),
        ((10,), {"seq_len": 0}, "seq_len"),
    ],
)
def test_schedule_errors(args, kw, match):
    with pytest.raises(ValueError, match=match):
        sigma_schedule(*args, **kw)
    with pytest.raises(ValueError, match="positive"):
        noisy_tokens(0, 80, 80)


# ---------------------------------------------------------------- analytic flows
#
# (a) Straight flow: the data is a single point x0*, so the data prediction is x0* for every x and
#     the ODE dx/dsigma = (x - x0*)/sigma has the straight solution x_sigma = x0* + sigma (x_1 - x0*).
# (b) Gaussian data N(m, s^2) under x_sigma = (1 - sigma) x0 + sigma eps: with a = 1 - sigma and
#     V = a^2 s^2 + sigma^2 = Var(x_sigma), the data prediction is E[x0 | x] = m + (a s^2 / V)(x - a m),
#     and the flow keeps the standard score z = (x - a m)/sqrt(V) fixed:
#     x_sigma = a m + sqrt(V) z with z = x_1, so the sample at sigma = 0 is m + s x_1.

M, S = 0.3, 0.5


def gaussian_x0(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    s = sigma.reshape(-1, *([1] * (x.ndim - 1)))  # (B, 1, ...)
    a = 1 - s
    return M + a * S**2 / (a * a * S**2 + s * s) * (x - a * M)


def gaussian_flow(x1: torch.Tensor, sigma: float) -> torch.Tensor:
    a = 1 - sigma
    return a * M + math.sqrt(a * a * S**2 + sigma**2) * x1


@pytest.fixture
def x1() -> torch.Tensor:
    return torch.randn(64, 2, 3, generator=torch.Generator().manual_seed(0), dtype=F64)  # (B, C, L)


@pytest.mark.parametrize("sampler", SAMPLER_FNS)
@settings(max_examples=40, deadline=None)
@given(
    gaps=st.lists(st.floats(0.05, 1.0), min_size=1, max_size=30),
    seed=st.integers(0, 2**16),
)
def test_straight_flow_is_exact(sampler, gaps, seed):
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(3, 4, generator=g, dtype=F64)
    x = torch.randn(3, 4, generator=g, dtype=F64)
    cum = torch.tensor([0.0, *gaps], dtype=F64).cumsum(0)
    sigmas = torch.flip(cum / cum[-1], [0])  # any strictly decreasing schedule from 1 to 0
    seen = []

    def on_step(i, total, xi, x0):
        expected = target + sigmas[i + 1] * (x - target)  # on the straight line
        torch.testing.assert_close(xi, expected, rtol=1e-12, atol=1e-12)
        seen.append(i)

    out = sampler(lambda xi, sig: target.expand_as(xi), x, sigmas, callback=on_step)
    torch.testing.assert_close(out, target, rtol=1e-13, atol=1e-13)
    assert seen == list(range(len(gaps)))


def test_gaussian_flow_closed_form(x1):
    # The closed form solves the ODE: central differences of x_sigma match v = (x - x0)/sigma ...
    eps = 1e-5
    for sigma in (0.9, 0.5, 0.1, 0.01):
        x = gaussian_flow(x1, sigma)
        dx = (gaussian_flow(x1, sigma + eps) - gaussian_flow(x1, sigma - eps)) / (2 * eps)
        v = x0_to_velocity(x, gaussian_x0(x, torch.full((64,), sigma, dtype=F64)), sigma)
        torch.testing.assert_close(dx, v, rtol=1e-7, atol=1e-8)
    # ... and a very fine Euler run lands on its endpoint m + s x_1.
    out = euler(gaussian_x0, x1, t_grid(4096, 3.0))
    assert (out - (M + S * x1)).abs().max() < 2e-3


def gaussian_errors(sampler, x1, steps, shift):
    exact = M + S * x1
    return [(sampler(gaussian_x0, x1, t_grid(n, shift)) - exact).pow(2).mean().sqrt().item() for n in steps]


@pytest.mark.parametrize("shift", [1.0, 3.0, 7.0])
def test_euler_is_first_order(x1, shift):
    steps = [16, 32, 64, 128]
    order = fitted_order(steps, gaussian_errors(euler, x1, steps, shift))
    assert 0.7 < order < 1.5


@pytest.mark.parametrize("shift", [1.0, 3.0, 7.0])
def test_unipc_is_second_order_down_to_sigma_zero(x1, shift):
    # With sigma = 0 at the end, the last steps are O(1) in lambda = -log(sigma) and the final one
    # returns the data prediction at sigma_{n-1} ~ shift/n, an O(sigma^2) = O(1/n^2) defect.
    steps = [128, 256, 512]
    errors = gaussian_errors(unipc, x1, steps, shift)
    assert fitted_order(steps, errors) > 1.8
    assert errors[-2] / errors[-1] > 3.5
    assert errors[-1] < gaussian_errors(euler, x1, [512], shift)[0] / 5


def test_unipc_is_third_order_away_from_zero(x1):
    # Uniform steps in lambda to sigma = 0.05: the order of the method itself (UniP-3 at the last point).
    steps = [16, 32, 64, 128]
    errors = []
    for n in steps:
        sigmas = torch.exp(-torch.linspace(0.0, -math.log(0.05), n + 1, dtype=F64))
        errors.append((unipc(gaussian_x0, x1, sigmas) - gaussian_flow(x1, 0.05)).abs().max().item())
    assert fitted_order(steps, errors) > 2.7


def test_unipc_final_step_to_zero_is_finite_and_the_last_x0():
    x = torch.randn(2, 16, 3, 8, 8, generator=torch.Generator().manual_seed(1))  # (B, C, T, H, W)
    sigmas = sigma_schedule(25, seq_len=noisy_tokens(3, 8, 8))
    outputs = []

    def on_step(i, total, xi, x0):
        assert torch.isfinite(xi).all() and torch.isfinite(x0).all()
        outputs.append(x0)

    out = unipc(gaussian_x0, x, sigmas, callback=on_step)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert torch.equal(out, outputs[-1])


# ---------------------------------------------------------------- calls, callback, cancel


@pytest.mark.parametrize("sampler", SAMPLER_FNS)
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 25])
def test_one_call_per_step_and_callback(sampler, steps):
    sigmas = sigma_schedule(steps, shift=3.0)
    calls, steps_seen = [], []

    def model(x, sigma_vec):
        assert sigma_vec.shape == (x.shape[0],) and sigma_vec.dtype == x.dtype
        calls.append(sigma_vec[0].item())
        return gaussian_x0(x, sigma_vec)

    def on_step(i, total, x, x0):
        assert total == steps and len(calls) == i + 1
        steps_seen.append(i)

    out = sampler(model, torch.randn(3, 5), sigmas, callback=on_step)
    assert calls == sigmas[:-1].tolist()  # one call at every sigma except the final 0
    assert steps_seen == list(range(steps))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("sampler", SAMPLER_FNS)
def test_cancel_stops_before_the_next_model_call(sampler):
    calls = []
    model = lambda x, s: calls.append(1) or gaussian_x0(x, s)  # noqa: E731
    with pytest.raises(Cancelled):
        sampler(model, torch.randn(2, 3), sigma_schedule(10, shift=3.0), cancel=lambda: len(calls) == 4)
    assert len(calls) == 4
    with pytest.raises(Cancelled):  # a cancel already requested stops before any call
        sampler(model, torch.randn(2, 3), sigma_schedule(10, shift=3.0), cancel=lambda: True)
    assert len(calls) == 4


def test_sampler_registry_and_bad_sigmas():
    assert get_sampler("unipc") is unipc and get_sampler("euler") is euler
    assert set(SAMPLERS) == {"unipc", "euler"}
    with pytest.raises(ValueError, match="Unknown sampler"):
        get_sampler("dpm++")
    for bad in (torch.tensor([1.0]), torch.tensor([1.0, 0.5, 0.5, 0.0]), torch.tensor([1.0, 0.0, 0.0])):
        with pytest.raises(ValueError, match="sigmas"):
            unipc(gaussian_x0, torch.zeros(1, 2), bad)


# ---------------------------------------------------------------- guidance


def test_cfg_plain_and_scale_one():
    g = torch.Generator().manual_seed(2)
    v_pos, v_neg = torch.randn(2, 4, 3, 5, 5, generator=g), torch.randn(2, 4, 3, 5, 5, generator=g)
    assert cfg_velocity(v_pos, v_neg, 1.0, rescale=0.7) is v_pos
    assert cfg_velocity(v_pos, None, 1.0) is v_pos
    torch.testing.assert_close(cfg_velocity(v_pos, v_neg, 5.0), v_neg + 5.0 * (v_pos - v_neg))
    torch.testing.assert_close(cfg_velocity(v_pos, v_neg, 5.0, rescale=0.0), v_neg + 5.0 * (v_pos - v_neg))
    with pytest.raises(ValueError, match="v_neg"):
        cfg_velocity(v_pos, None, 3.0)


def test_cfg_rescale():
    g = torch.Generator().manual_seed(3)
    v_pos, v_neg = (
        torch.randn(3, 4, 2, 6, 6, generator=g, dtype=F64),
        torch.randn(3, 4, 2, 6, 6, generator=g, dtype=F64),
    )
    v_pos = v_pos * torch.tensor([0.5, 1.0, 2.0], dtype=F64).view(3, 1, 1, 1, 1)  # a std per sample
    dims = (1, 2, 3, 4)
    plain = cfg_velocity(v_pos, v_neg, 7.0)
    full = cfg_velocity(v_pos, v_neg, 7.0, rescale=1.0)
    torch.testing.assert_close(full.std(dim=dims), v_pos.std(dim=dims))
    torch.testing.assert_close(
        full / full.std(dim=dims, keepdim=True), plain / plain.std(dim=dims, keepdim=True)
    )
    torch.testing.assert_close(cfg_velocity(v_pos, v_neg, 7.0, rescale=0.7), 0.7 * full + 0.3 * plain)


def test_velocity_x0_round_trip():
    g = torch.Generator().manual_seed(4)
    x, v = (
        torch.randn(3, 4, 2, 5, 5, generator=g, dtype=F64),
        torch.randn(3, 4, 2, 5, 5, generator=g, dtype=F64),
    )
    sigma = torch.tensor([0.9, 0.4, 0.1], dtype=F64)
    x0 = velocity_to_x0(x, v, sigma)
    torch.testing.assert_close(x0[1], x[1] - 0.4 * v[1])
    torch.testing.assert_close(x0_to_velocity(x, x0, sigma), v)
    torch.testing.assert_close(velocity_to_x0(x, v, 0.25), x - 0.25 * v)
