"""Step caches: threshold 0 is exactly uncached, skips follow the release's rule, sections reset,
weight streaming never loads a skipped block, and the pipeline and calibration use them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from framepack.caching import (
    MAGCACHE_DEMO,
    TEACACHE_HUNYUAN,
    FirstBlockCache,
    MagCache,
    TeaCache,
    make_cache,
    ratio_curve,
    rel_l1,
    reset_caches,
)
from framepack.memory import WeightStreamer, blocks_of, hooks_of, plan_memory
from framepack.model import PackedTransformer, get_spec
from framepack.sampling import get_sampler, sigma_schedule, velocity_to_x0
from framepack.testing import random_packed_inputs
from framepack.training.calibrate import fit, fit_ratios, load_coefficients

CFG = get_spec("tiny").replace(num_layers=2, num_single_layers=3)
STEPS = 10


@pytest.fixture(scope="module")
def model() -> PackedTransformer:
    torch.manual_seed(0)
    return PackedTransformer(CFG).eval()


@pytest.fixture(scope="module")
def inputs() -> dict:
    return random_packed_inputs(CFG, 4, 6, seed=2)


def sample(model, inputs, cfg: float = 1.0) -> torch.Tensor:
    """UniPC over STEPS steps, optionally with real CFG (two model calls per step)."""
    sigmas = sigma_schedule(STEPS, seq_len=54)
    negative = {**inputs, "text": inputs["text"].flip(1)}

    def denoise(x, sigma):
        t = sigma.reshape(1) * 1000
        v = model.forward_packed(**{**inputs, "noisy": x, "timestep": t})
        if cfg != 1.0:
            v_neg = model.forward_packed(**{**negative, "noisy": x, "timestep": t})
            v = v_neg + cfg * (v - v_neg)
        return velocity_to_x0(x, v, sigma)

    with torch.no_grad():
        return get_sampler("unipc")(denoise, inputs["noisy"], sigmas)


@pytest.fixture(scope="module")
def reference(model, inputs) -> torch.Tensor:
    return sample(model, inputs)


@pytest.mark.parametrize("name", ["teacache", "fbcache", "magcache"])
def test_threshold_zero_is_exactly_uncached(model, inputs, reference, name):
    cache = make_cache(name, 0.0).attach(model)
    try:
        for _ in range(2):  # two sections
            reset_caches(model, STEPS)
            assert torch.equal(sample(model, inputs), reference)
        assert cache.stats.skipped == 0 and cache.stats.evaluations == 2 * STEPS
    finally:
        cache.detach()
    assert all(hooks_of(b) == [] and "forward" not in b.__dict__ for b in blocks_of(model))


@pytest.mark.parametrize("cls", [TeaCache, FirstBlockCache])
def test_big_threshold_skips_all_but_first_and_last(model, inputs, reference, cls):
    cache = cls(1e9).attach(model)
    try:
        cache.reset(STEPS)
        out = sample(model, inputs)
        assert cache.stats.skipped == STEPS - 2  # the first and last steps are always computed
        cache.reset(STEPS)  # a new section: its first step is computed again
        sample(model, inputs)
        assert cache.stats.skipped == 2 * (STEPS - 2)
    finally:
        cache.detach()
    err = ((out - reference).norm() / reference.norm()).item()
    assert 0 < err < 0.5 and torch.isfinite(out).all()


def test_teacache_follows_the_release_rule(model, inputs):
    """Replay the release's accumulation on the signals the cache saw: the same decisions."""
    log = []

    class Logged(TeaCache):
        def decide(self, st, block, forward, args, kwargs, forced):
            before = st.previous
            out, skip = super().decide(st, block, forward, args, kwargs, forced)
            log.append((None if before is None else rel_l1(st.previous, before), skip))
            return out, skip

    cache = Logged(0.15).attach(model)
    try:
        cache.reset(STEPS)
        sample(model, inputs)
    finally:
        cache.detach()
    expected, acc = [False], 0.0
    for rel, _ in log[1:-1]:  # the release: compute the first and last steps, else accumulate
        acc += np.polyval(TEACACHE_HUNYUAN, rel)
        expected.append(acc < 0.15)
        acc = acc if acc < 0.15 else 0.0
    expected.append(False)
    assert [skip for _, skip in log] == expected
    assert any(expected)


def _magcache_skips(model, inputs, *args, **kwargs) -> list[bool]:
    """The skip decision of every step of one section under `MagCache(*args, **kwargs)`."""
    log = []

    class Logged(MagCache):
        def decide(self, st, block, forward, args, kwargs, forced):
            out, skip = super().decide(st, block, forward, args, kwargs, forced)
            log.append(skip)
            return out, skip

    cache = Logged(*args, **kwargs).attach(model)
    try:
        cache.reset(STEPS)
        sample(model, inputs)
    finally:
        cache.detach()
    return log


def test_magcache_follows_the_paper_rule(model, inputs):
    """Ratios 0.98 at every step, threshold 0.1: the error after 1, 2, 3 skipped steps is 0.02,
    0.0596, 0.1184 (sum of |1 - 0.98^j|), so two steps are skipped, the third computed; the first
    20% (2 of 10) and the last step are always computed."""
    flat = (1.0,) + (0.98,) * (STEPS - 1)
    F, T = False, True
    assert _magcache_skips(model, inputs, 0.1, flat) == [F, F, T, T, F, T, T, F, T, F]
    assert _magcache_skips(model, inputs, 0.1, flat, k=1) == [F, F, T, F, T, F, T, F, T, F]
    assert _magcache_skips(model, inputs, 1.0, flat, retention=0.5) == [F] * 5 + [T, T, T, F, F]
    # A step whose own ratio is off by more than 0.06 is computed (PR #673), whatever the sum.
    steep = flat[:4] + (0.9,) + flat[5:]
    assert _magcache_skips(model, inputs, 1.0, steep) == [F, F, T, T, F, T, T, T, F, F]


def test_magcache_ratio_curve_keeps_the_magnitude_over_the_schedule():
    curve = np.array([1.0] + [0.9] * 9)
    assert np.array_equal(ratio_curve(tuple(curve), 10), curve)  # same steps: the curve itself
    twice = ratio_curve(tuple(curve), 20)
    assert twice[0] == 1 and np.allclose(twice[2:], 0.9**0.5)  # half the step, half the log ratio
    assert np.prod(twice[:19]) == pytest.approx(np.prod(curve), rel=1e-9)  # the same schedule span
    assert np.allclose(ratio_curve(tuple(curve), 5)[1:], 0.81)
    assert len(ratio_curve(MAGCACHE_DEMO, 7)) == 7 and len(MAGCACHE_DEMO) == 25
    with pytest.raises(ValueError, match="positive"):
        MagCache(0.1, (1.0, 0.0, 0.9))


def test_cfg_branches_are_separate(model, inputs):
    uncached = sample(model, inputs, cfg=3.0)
    cache = TeaCache(0.0).attach(model)
    try:
        cache.reset(STEPS, branches=2)
        assert torch.equal(sample(model, inputs, cfg=3.0), uncached)
        assert len(cache.state) == 2 and cache.stats.evaluations == 2 * STEPS
    finally:
        cache.detach()


@pytest.mark.parametrize("cls", [TeaCache, MagCache])
def test_streaming_does_not_load_skipped_blocks(model, inputs, reference, cls):
    plan0 = plan_memory(model, None)
    plan = plan_memory(model, plan0.base_bytes + max(plan0.block_bytes))
    streamer = WeightStreamer(model, plan, "cpu").attach()
    cache = cls(0.0).attach(model)
    try:
        cache.reset(STEPS)
        assert torch.equal(sample(model, inputs), reference)  # both hooks, bit-identical
        full = streamer.transfers
        cache.threshold = 1e9
        if cls is MagCache:
            cache.coefficients = (1.0,) * STEPS  # skips steps 2-4 and 6-8 (K = 3)
        cache.reset(STEPS)
        streamer.transfers = 0
        sample(model, inputs)
    finally:
        cache.detach()
        streamer.detach()
    skipped = cache.stats.skipped
    assert skipped == {TeaCache: STEPS - 2, MagCache: 6}[cls]
    # Computed steps load everything; skipped ones load block 0 where the cache decides from it
    # (TeaCache), nothing where it decides from its calibrated curve alone (MagCache).
    block0 = plan.block_bytes[0] if cls.reads_block0 else 0
    assert streamer.transfers == pytest.approx((STEPS - skipped) * full / STEPS + skipped * block0)


def test_calibration_fits_and_loads(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 0.3, 40)
    rows = [(a, 2 * a, 0.5 * a + 0.01) for a in x]
    result = fit(rows)
    assert result["fbcache"]["r2"] > 0.999
    assert np.polyval(result["fbcache"]["coefficients"], 0.2) == pytest.approx(0.06, abs=1e-6)
    path = tmp_path / "calib.json"
    path.write_text(json.dumps(result))
    assert len(load_coefficients(path, "teacache")) == 5
    with pytest.raises(ValueError, match="calibration"):
        load_coefficients(tmp_path / "missing.json", "fbcache")
    with pytest.raises(ValueError):
        fit(rows[:3])
    # MagCache: the mean ratio per step over sections, saved beside the polynomials and read back.
    curve = fit_ratios({1: [0.9, 0.92], 2: [0.97, 0.97], 3: [1.0, 1.02]})
    assert curve["ratios"] == pytest.approx([1.0, 0.91, 0.97, 1.01]) and curve["steps"] == 4
    path.write_text(json.dumps({**result, "magcache": curve}))
    assert load_coefficients(path, "magcache") == pytest.approx((1.0, 0.91, 0.97, 1.01))
    path.write_text(json.dumps(result))  # a file from before MagCache
    with pytest.raises(ValueError, match="holds no ratios for magcache; rerun"):
        load_coefficients(path, "magcache")
    with pytest.raises(ValueError, match="step 2"):
        fit_ratios({1: [0.9], 3: [0.9]})


def test_bad_names_and_thresholds():
    with pytest.raises(ValueError, match="unknown step cache"):
        make_cache("magic", 0.1)
    with pytest.raises(ValueError, match="threshold"):
        TeaCache(-1)


def test_pipeline_streams_and_caches_exactly_at_threshold_zero(tmp_path):
    from framepack.io import read_video
    from framepack.pipeline.run import Request, open_run
    from framepack.pipeline.settings import GenerationSettings, prepare
    from framepack.testing import tight_budget, tiny_bundle

    bundle = tiny_bundle()
    image = np.full((64, 96, 3), 90, np.uint8)
    image[16:48, 24:56] = (200, 30, 30)
    base = dict(prompt="a cat walks", sections=2, steps=4)
    plain = open_run(bundle, Request(GenerationSettings(**base, name="plain"), image)).run(tmp_path)
    # The smallest budgets (every block streams, the VAE visits beside them, the run's activations
    # and cache state kept); fp8: a block plus one tensor's raw copy.
    cached = prepare(bundle, GenerationSettings(**base, cache="teacache", cache_threshold=0.0), image=image)
    budget = tight_budget(bundle, cached) / 2**30
    budget8 = tight_budget(bundle, prepare(bundle, GenerationSettings(**base), image=image), fp8=True) / 2**30
    fast = GenerationSettings(**base, name="fast", cache="teacache", cache_threshold=0.0, vram_budget=budget)
    done = open_run(bundle, Request(fast, image)).run(tmp_path)
    assert np.array_equal(read_video(done.video)[0], read_video(plain.video)[0])
    info = json.loads(done.sidecar.read_text())
    assert info["cache"]["evaluations"] == 8 and info["cache"]["skipped"] == 0
    assert "streamed" in info["memory_plan"]
    fp8 = GenerationSettings(**base, name="fp8", vram_budget=budget8, fp8_weights=True)
    info = open_run(bundle, Request(fp8, image)).run(tmp_path).info
    assert "fp8 host copies" in info["memory_plan"] and "cache" not in info
    skipping = GenerationSettings(**base, name="skip", cache="teacache", cache_threshold=10.0)
    info = open_run(bundle, Request(skipping, image)).run(tmp_path).info
    assert info["cache"]["skipped"] == 2 * (4 - 2) and "memory_plan" not in info
    with pytest.raises(ValueError, match="step cache"):
        open_run(bundle, Request(GenerationSettings(**base, cache="nope"), image)).run(tmp_path)
    with pytest.raises(ValueError, match="coefficients"):
        bad = GenerationSettings(**base, cache="fbcache", cache_coefficients=("x",))
        open_run(bundle, Request(bad, image)).run(tmp_path)


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--cache", "nope:0.1"], "unknown step cache"),
        (["--cache", "teacache:x"], "NAME:THRESHOLD"),
        (["--teacache", "0.1", "--cache", "fbcache:0.1"], "not both"),
        (["--teacache", "-1"], "threshold"),
        (["--vram-budget", "six"], "budget"),
        (["--cache", "fbcache:0.1", "--cache-calibration", "missing.json"], "does not exist"),
    ],
)
def test_cli_bad_speed_options_are_one_sentence(tmp_path, capsys, extra, needle):
    from PIL import Image

    from framepack.cli.main import main
    from framepack.testing import tiny_bundle_dir

    Image.fromarray(np.full((64, 96, 3), 90, np.uint8)).save(tmp_path / "start.png")
    args = ["generate", "--model", str(tiny_bundle_dir()), "--image", str(tmp_path / "start.png")]
    args += ["--prompt", "a cat", "--out", str(tmp_path / "out"), *extra]
    capsys.readouterr()  # (writing the tiny bundle prints progress bars)
    assert main(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and needle in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "out").exists()
