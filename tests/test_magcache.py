"""MagCache through the pipeline (issue 20, part 3): exact at threshold 0 and close at the default
threshold on the demo model in the release's dtypes, the same under weight streaming and with
`--compile`, calibrated by `framepack.training.calibrate` and read back by `--cache-calibration`,
selectable in the CLI, a batch job, the API and the GUI form, and bad input refused in one sentence.
The rule itself (skips, K, retention, the ratio curve) is tested on a tiny model in test_caching."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from framepack.caching import CACHES
from framepack.memory import GIB
from framepack.pipeline.bundle import component_dtypes, load_bundle
from framepack.pipeline.named import DEFAULT_MODEL
from framepack.pipeline.run import Request, open_run
from framepack.pipeline.settings import GenerationSettings, prepare
from framepack.testing import tight_budget, tiny_bundle_dir

EXAMPLES = DEFAULT_MODEL / "examples"
START = EXAMPLES / "red_circle_moves_right.png"  # not the example the default curve was measured on
CAPTION = (EXAMPLES / "red_circle_moves_right.txt").read_text().strip()
FLAT = (1.0,) + (0.99,) * 7  # a curve that lets the rule skip: steps 1-3 and 5-6 of 8


@pytest.fixture
def one_thread():
    """One thread: the same reductions whatever the core count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def frames(directory: Path) -> np.ndarray:
    files = sorted(directory.glob("*.png"))
    assert files, directory
    return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files]).astype(np.float64)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a - b) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def _run(bundle, out: Path, name: str, image=None, **settings):
    request = Request(GenerationSettings(name=name, png=True, **settings), image)
    done = open_run(bundle, request).run(out)
    return frames(out / f"{name}_frames"), done.info


def test_demo_model_in_release_dtypes_exact_at_zero_and_close_at_the_default(tmp_path, one_thread):
    """bf16 transformer, fp16 encoders and VAE; 12 steps, so the 25-step default curve is mapped."""
    bundle = load_bundle(DEFAULT_MODEL, dtypes=component_dtypes("cuda"))
    base = dict(prompt=CAPTION, image=str(START), sections=2, steps=12)
    reference, info = _run(bundle, tmp_path, "plain", **base)
    assert "cache" not in info
    exact, info = _run(bundle, tmp_path, "zero", cache="magcache", cache_threshold=0.0, **base)
    assert np.array_equal(exact, reference)  # atol 0
    assert info["cache"] == {"name": "magcache", "threshold": 0.0, "evaluations": 24, "skipped": 0}
    video, info = _run(bundle, tmp_path, "fast", cache="magcache", cache_threshold=0.1, **base)
    quality = psnr(video, reference)
    print(f"magcache 0.1: skipped {info['cache']['skipped']}/24, {quality:.2f} dB")
    assert info["cache"]["skipped"] >= 4  # 6 on this CPU
    assert quality >= 45, quality  # 58.72 dB measured


def test_streaming_and_compile_run_the_same_skips(image, tmp_path):
    """Every block streamed under the tightest budget: the same frames as resident weights; with
    `--compile` on top: the same skips, frames to fp32 tolerance."""
    bundle = load_bundle(tiny_bundle_dir())
    base = dict(prompt="a square", sections=2, steps=8, seed=3)
    cache = dict(cache="magcache", cache_threshold=0.5, cache_coefficients=FLAT)
    plain = prepare(bundle, GenerationSettings(**base, **cache), image)
    budget = tight_budget(bundle, plain) / GIB
    eager, eager_info = _run(bundle, tmp_path, "eager", image, **base, **cache)
    assert eager_info["cache"]["skipped"] == 2 * 5
    streamed, info = _run(bundle, tmp_path, "streamed", image, **base, **cache, vram_budget=budget)
    assert "streamed" in info["memory_plan"] and info["cache"] == eager_info["cache"]
    assert np.array_equal(streamed, eager)
    try:
        compiled, info = _run(
            bundle, tmp_path, "compiled", image, **base, **cache, vram_budget=budget, compile=True
        )
    finally:
        torch._dynamo.reset()
    assert info["cache"] == eager_info["cache"] and info["compile"]["graphs_compiled"] >= 1
    assert psnr(compiled, eager) >= 35


def _cli(args: list[str], capsys) -> tuple[int, list[str]]:
    from framepack.cli.main import main

    capsys.readouterr()
    code = main(args)
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def _generate_args(tmp_path: Path) -> list[str]:
    Image.fromarray(np.full((64, 96, 3), 90, np.uint8)).save(tmp_path / "start.png")
    return [
        "generate",
        *("--model", str(tiny_bundle_dir()), "--image", str(tmp_path / "start.png")),
        *("--prompt", "a cat", "--sections", "1", "--steps", "6", "--out", str(tmp_path / "out")),
    ]


def test_calibration_round_trip(tmp_path, capsys):
    from framepack.training.calibrate import main as calibrate

    path = tmp_path / "calib.json"
    assert calibrate(["--model", "tiny", "--sections", "2", "--steps", "6", "--out", str(path)]) == 0
    data = json.loads(path.read_text())
    assert len(data["teacache"]["coefficients"]) == 5 and len(data["fbcache"]["coefficients"]) == 3
    ratios = data["magcache"]["ratios"]
    assert len(ratios) == 6 and ratios[0] == 1.0 and all(0 < r < 2 for r in ratios)
    args = _generate_args(tmp_path) + ["--cache", "magcache:0.1", "--cache-calibration", str(path)]
    code, err = _cli(args, capsys)
    assert code == 0, err
    sidecar = json.loads(next((tmp_path / "out").glob("*.json")).read_text())
    assert sidecar["cache"]["name"] == "magcache" and sidecar["cache"]["evaluations"] == 6
    assert sidecar["settings"]["cache_coefficients"] == pytest.approx(ratios)


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--cache", "magcache:-1"], "the cache threshold must be a number from 0 to 10"),
        (["--cache", "magcache:0.1", "--cache-calibration", "OLD"], "holds no ratios for magcache"),
        (["--cache", "magcache:0.1", "--cache-calibration", "NEGATIVE"], "must all be positive"),
    ],
)
def test_bad_magcache_input_is_one_sentence(tmp_path, capsys, extra, needle):
    files = {
        "OLD": {"points": 8, "teacache": {"coefficients": [1, 0]}, "fbcache": {"coefficients": [1, 0]}},
        "NEGATIVE": {"magcache": {"ratios": [1.0, 0.9, -0.5]}},
    }
    for word, content in files.items():
        (tmp_path / f"{word}.json").write_text(json.dumps(content))
    extra = [str(tmp_path / f"{e}.json") if e in files else e for e in extra]
    code, err = _cli(_generate_args(tmp_path) + extra, capsys)
    assert code == 2 and len(err) == 1 and needle in err[0] and "Traceback" not in err[0], err
    assert not (tmp_path / "out").exists()


def test_api_batch_and_gui_choose_it(image, tmp_path, capsys):
    import framepack
    from framepack.gui.form import FormValues, form_from_settings, settings_from_form

    with pytest.raises(ValueError, match="magnitude ratios must all be positive"):
        framepack.generate(
            tiny_bundle_dir(),
            tmp_path / "api",
            image,
            prompt="a cat",
            cache="magcache",
            cache_coefficients=(1, 0),
        )
    assert not (tmp_path / "api").exists()
    done = framepack.generate(
        tiny_bundle_dir(), tmp_path / "api", image, prompt="a cat", sections=1, steps=8, cache="magcache",
        cache_threshold=0.5, cache_coefficients=FLAT,
    )  # fmt: skip
    assert done.info["cache"]["skipped"] == 5

    jobs = tmp_path / "jobs.jsonl"
    job = dict(prompt="a cat", sections=1, steps=6, cache="magcache", cache_threshold=0.1, name="b")
    jobs.write_text(json.dumps(job) + "\n")
    code, err = _cli(
        ["batch", str(jobs), "--model", str(tiny_bundle_dir()), "--out", str(tmp_path / "b")], capsys
    )
    assert code == 0, err
    assert json.loads((tmp_path / "b" / "b.json").read_text())["cache"]["name"] == "magcache"

    assert "magcache" in CACHES  # the GUI's cache dropdown lists CACHES
    form = FormValues(image=image, end_image=None, prompt="a cat", cache="magcache", cache_threshold=0.1)
    settings = settings_from_form(form, tmp_path / "gui")
    assert (settings.cache, settings.cache_threshold) == ("magcache", 0.1)
    values = form_from_settings(settings.to_dict(), tmp_path / "gui", load_bundle(tiny_bundle_dir()).manifest)
    assert values["cache"] == "magcache"
