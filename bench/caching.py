"""Step caching: evaluations skipped vs PSNR to the uncached video, per cache and threshold.

Runs `framepack.pipeline.run.open_run(...).run(...)` on a bundle (`--model`; default the tiny random
bundle, until the demo model ships at framepack/demo_model) once without a cache and once per
(cache, threshold), same seed and inputs, with lossless PNG frames. Prints, per run: model
evaluations skipped, the PSNR of the video to the uncached one (over all frames, 8-bit), and the
sampling time ratio to the uncached run. `--calibrate` first fits both caches' polynomials on
the same bundle (another seed and prompt, `framepack.training.calibrate`) and adds "-cal" variants.

    python bench/caching.py [--model DIR] [--sections 2] [--steps 25] [--thresholds 0 0.1 0.15 0.2]
                            [--caches teacache fbcache] [--calibrate] [--record]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from _record import append_rows, command, machine, today  # noqa: E402

from framepack.caching import CACHES  # noqa: E402
from framepack.pipeline.bundle import load_bundle  # noqa: E402
from framepack.pipeline.events import Stage, StepEvent  # noqa: E402
from framepack.pipeline.run import Request, open_run  # noqa: E402
from framepack.pipeline.settings import GenerationSettings  # noqa: E402
from framepack.training.calibrate import KEYS, calibrate, demo_image  # noqa: E402

HEADING = "## Step caching: skipped evaluations vs PSNR (`bench/caching.py`)"
INTRO = """
Same bundle, seed, image and prompt; PSNR of the 8-bit frames (PNG, lossless) against the
uncached run; time ratio = CPU time of sampling (all model calls) / the uncached run's, in one run
(on the tiny bundle the model is so small that hooks and the sampler dominate it). "-cal" caches use polynomials fitted by `framepack.training.calibrate` on another seed and
prompt. The issue's target: TeaCache at 0.15 skips >= 40% on the demo model (the tiny bundle is
random weights, so its numbers only show the mechanics).

| date | machine | bundle | sections x steps | cache | threshold | skipped | PSNR dB | sampling time ratio | command |
| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"""


def frames(directory: Path) -> np.ndarray:
    files = sorted(directory.glob("*.png"))
    return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def run(bundle, image, out: Path, name: str, **settings) -> tuple[np.ndarray, dict, float]:
    """One generation; returns (frames, sidecar info, seconds spent sampling)."""
    sampling = [0.0]
    state = {"start": None}

    def on_event(event):
        now = time.process_time()  # CPU seconds of all threads: steadier on shared cores
        if isinstance(event, Stage) and event.name == "sampling":
            state["start"] = now
        elif isinstance(event, StepEvent) and event.step == event.steps - 1 and state["start"] is not None:
            sampling[0] += now - state["start"]
            state["start"] = None

    request = Request(GenerationSettings(name=name, png=True, **settings), image)
    done = open_run(bundle, request).run(out, on_event=on_event)
    return frames(out / f"{name}_frames"), done.info, sampling[0]


def main() -> None:
    warnings.filterwarnings("ignore")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="bundle directory (default: the tiny random bundle)")
    parser.add_argument("--sections", type=int, default=2)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--prompt", default="a red square moves to the right")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.15, 0.2, 0.3])
    parser.add_argument(
        "--caches", nargs="+", default=["teacache", "fbcache", "magcache"], choices=list(CACHES)
    )
    parser.add_argument("--calibrate", action="store_true", help="add caches with fitted polynomials")
    parser.add_argument("--record", action="store_true", help="append the rows to bench/RESULTS.md")
    args = parser.parse_args()
    if args.model is None:
        from framepack.testing import tiny_bundle_dir

        args.model = str(tiny_bundle_dir())
        label = "tiny (random)"
    else:
        label = Path(args.model).name
    bundle = load_bundle(args.model)
    image = demo_image(64, 96)
    common = dict(prompt=args.prompt, sections=args.sections, steps=args.steps)

    variants = [(c, None) for c in args.caches]
    if args.calibrate:
        fitted = calibrate(bundle, demo_image(64, 96)[:, ::-1].copy(), "a blue circle", 2, args.steps)
        for c in args.caches:
            values = tuple(fitted[c][KEYS[c]])  # a polynomial; MagCache: its ratio curve
            fit = f", R^2 {fitted[c]['r2']:.3f}" if "r2" in fitted[c] else ""
            print(f"calibrated {c}: {[round(v, 5) for v in values]}{fit}")
            variants.append((c, values))

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        reference, _, t_ref = run(bundle, image, Path(tmp), "uncached", **common)
        print(f"uncached: {reference.shape[0]} frames, sampling {t_ref:.2f} s")
        for cache, coefficients in variants:
            name = cache + ("-cal" if coefficients else "")
            for th in args.thresholds:
                video, info, t = run(
                    bundle,
                    image,
                    Path(tmp),
                    f"{name}-{th}",
                    cache=cache,
                    cache_threshold=th,
                    cache_coefficients=coefficients,
                    **common,
                )
                stats = info["cache"]
                skipped = stats["skipped"] / stats["evaluations"]
                quality = psnr(video, reference)
                print(
                    f"{name:>12} {th:5.3f}: skipped {stats['skipped']}/{stats['evaluations']} ({skipped:.0%}), "
                    f"PSNR {quality:.2f} dB, sampling time ratio {t / t_ref:.3f}"
                )
                rows.append(
                    f"| {today()} | {machine()} | {label} | {args.sections} x {args.steps} | {name} | {th:g} | "
                    f"{stats['skipped']}/{stats['evaluations']} (**{skipped:.0%}**) | {quality:.2f} | "
                    f"{t / t_ref:.3f} | `{command()}` |"
                )
    if args.record:
        append_rows(HEADING, INTRO, rows)


if __name__ == "__main__":
    main()
