"""The device-memory estimate (`framepack.memory.estimate`) against measured peaks, and the budget
check it drives: one sentence and exit 2 before any work, and a plan that fits its budget."""

from __future__ import annotations

import json

import pytest
import torch

from framepack.caching import reset_caches
from framepack.cli.main import main
from framepack.memory.budgets import GIB
from framepack.memory.estimate import DeviceNeed, activation_bytes, cache_bytes
from framepack.memory.measure import LiveBytes
from framepack.model import PackedTransformer, get_spec
from framepack.packing.schedule import K1, K2, K4
from framepack.pipeline.budget import bundle_need
from framepack.pipeline.bundle import load_bundle
from framepack.pipeline.named import default_model
from framepack.pipeline.settings import GenerationSettings, prepare
from framepack.pipeline.speed import accelerate
from framepack.testing import random_packed_inputs

# Modelled / measured (LiveBytes, fp32 on a CPU): 1.05-1.16 when written.
CASES = [
    ("tiny", 8, 8, 16, 4, None),
    ("tiny", 16, 24, 64, 30, None),
    ("tiny", 16, 24, 64, 30, "teacache"),
    ("medium", 8, 8, 16, 4, None),
    ("medium", 16, 16, 32, 16, "teacache"),
    ("medium", 16, 16, 32, 16, "fbcache"),
]


@pytest.mark.parametrize(("spec", "h", "w", "text", "image", "cache"), CASES)
def test_the_activation_model_bounds_the_measured_peak(spec, h, w, text, image, cache):
    cfg = get_spec(spec)
    torch.manual_seed(0)
    model = PackedTransformer(cfg).eval().requires_grad_(False)
    inputs = random_packed_inputs(cfg, h, w, text_tokens=text)
    inputs["image_embeds"] = torch.randn(1, image, cfg.image_proj_dim)
    run = accelerate(model, "cpu", None, cache, 0.0)
    tokens = K1.tokens(9 + 2, h, w) + K2.tokens(2, h, w) + K4.tokens(16, h, w)  # window + released history
    noisy = K1.tokens(9, h, w)
    estimate = activation_bytes(cfg, tokens, text + image, 4) + cache_bytes(cfg, cache, tokens, noisy, 4)
    with torch.no_grad():
        reset_caches(model, 3)
        with LiveBytes() as live:
            for _ in range(3):  # a computed step, then the cache's state lives across calls
                model.forward_packed(**inputs)
    run.detach()
    assert 1.0 <= estimate / live.peak < 1.5, estimate / live.peak


def test_smallest_budget_and_the_sentence():
    need = DeviceNeed(activations=300, cache=50, vae_decode=100, overhead=1000, margin=0.1)
    total = need.smallest(2000)
    assert need.weights(total) >= 2000 > need.weights(total - 1)
    with pytest.raises(ValueError, match=r"^a VRAM budget of .* cannot hold this run at 8x8 .*or more\.$"):
        need.check(total - 1, 2000, "8x8")
    need.check(total, 2000, "8x8")


def _generate(tmp_path, budget, *extra):
    out = tmp_path / "out"
    args = ["generate", "--prompt", "a cat", "--sections", "1", "--steps", "1", "--device", "cpu"]
    return main([*args, "--vram-budget", str(budget), "--out", str(out), "--name", "v", *extra]), out


def test_a_budget_too_small_is_one_sentence_before_any_work(tmp_path, capsys):
    code, out = _generate(tmp_path, 0.01)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not out.exists()
    assert err[-1].startswith("framepack: a VRAM budget of 0.01 GiB cannot hold this run at ")
    assert "give --vram-budget 0.051 or more." in err[-1]


def test_the_plan_at_a_feasible_budget_fits_it(tmp_path, capsys):
    code, out = _generate(tmp_path, 0.052, "--cache", "teacache")
    assert code == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "besides weights the device holds activations" in err
    info = json.loads((out / "v.json").read_text())

    def find(d, key):
        if isinstance(d, dict):
            if key in d:
                return d[key]
            for v in d.values():
                r = find(v, key)
                if r is not None:
                    return r
        return None

    peak = find(info, "device_weights_peak_bytes")
    assert "kept besides weights" in find(info, "offload")
    bundle = load_bundle(default_model(), device="cpu", vram_budget=0.052)
    prepared = prepare(bundle, GenerationSettings(prompt="a cat", sections=1, steps=1, cache="teacache"))
    need = bundle_need(bundle, prepared)
    budget = round(0.052 * GIB)
    assert peak + need.working + need.overhead <= budget, (peak, need, budget)
