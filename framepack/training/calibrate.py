"""Calibrate the step caches on a model: `python -m framepack.training.calibrate`.

TeaCache's release coefficients map HunyuanVideo's input change to its output change; another
model (the demo model, a fine-tune) needs its own. A `Recorder` computes every step and records,
for each pair of consecutive steps, both caches' signals (the relative L1 change of block 0's
modulated input, and of block 0's residual) and what skipping would have got wrong (the relative
L1 change of the blocks' residual on the read-out tokens). `fit` maps each signal to that change
with a least-squares polynomial, as TeaCache's authors fitted theirs. For MagCache it records the
magnitude ratio of the blocks' residual to the previous step's at every step, and `fit_ratios`
keeps the mean over sections (and CFG branches) of each step: MagCache's curve.

    python -m framepack.training.calibrate --model BUNDLE [--sections 2] [--steps 25] --out calib.json
    framepack generate ... --cache fbcache:0.05 --cache-calibration calib.json
    framepack generate ... --cache magcache:0.1 --cache-calibration calib.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from ..caching.step_cache import (
    StepCache,
    first_block_residual,
    image_tokens,
    magnitude_ratio,
    modulated_input,
    rel_l1,
)

__all__ = ["Recorder", "fit", "fit_ratios", "load_coefficients", "calibrate", "main"]

DEGREES = {"teacache": 4, "fbcache": 2}
KEYS = {"teacache": "coefficients", "fbcache": "coefficients", "magcache": "ratios"}  # in the JSON


class Recorder(StepCache):
    """Computes every step (threshold 0) and records (teacache signal, fbcache signal, change),
    and MagCache's magnitude ratio per step (`ratios[step]`, one value per section and branch)."""

    name = "recorder"

    def __init__(self) -> None:
        self.rows: list[tuple[float, float, float]] = []
        self.ratios: dict[int, list[float]] = {}
        super().__init__(0.0)

    def decide(self, st, block, forward, args, kwargs, forced):
        x, temb, n = image_tokens(block, args, kwargs)
        modulated = modulated_input(block, x, temb)
        out = forward(*args, **kwargs)
        _, residual = first_block_residual(block, x, out, n)
        prev = st.extra
        st.extra = {"modulated": modulated, "residual": residual}
        if prev:
            st.extra["pending"] = (
                rel_l1(modulated, prev["modulated"]),
                rel_l1(residual, prev["residual"]),
            )
        st.anchor = x
        return out, False

    def finish(self, block, st, out, args, kwargs):
        previous = st.residual
        out = super().finish(block, st, out, args, kwargs)
        pending = st.extra.pop("pending", None)
        if previous is not None and pending is not None:
            self.rows.append((*pending, rel_l1(st.residual, previous)))
        if previous is not None and st.step > 0:  # st.step: this call's step + 1
            self.ratios.setdefault(st.step - 1, []).append(magnitude_ratio(st.residual, previous))
        return out


def fit(rows: list[tuple[float, float, float]]) -> dict:
    """Least-squares polynomials from each signal to the output change, with their R^2."""
    data = np.asarray(rows, dtype=np.float64)
    if len(data) < 6:
        raise ValueError(f"{len(data)} recorded step pairs are too few to fit; run more steps or sections.")
    out = {"points": len(data)}
    target = data[:, 2]
    for col, (name, degree) in enumerate(DEGREES.items()):
        coeffs = np.polyfit(data[:, col], target, degree)
        pred = np.polyval(coeffs, data[:, col])
        ss = float(((target - target.mean()) ** 2).sum()) or 1.0
        out[name] = {
            "coefficients": [float(c) for c in coeffs],
            "r2": 1 - float(((target - pred) ** 2).sum()) / ss,
        }
    return out


def fit_ratios(ratios: dict[int, list[float]]) -> dict:
    """MagCache's curve: the mean magnitude ratio of each step (step 0: 1) and its spread."""
    if len(ratios) < 2:
        raise ValueError(f"{len(ratios) + 1} steps are too few for MagCache's curve; run more steps.")
    steps = max(ratios) + 1
    missing = [i for i in range(1, steps) if i not in ratios]
    if missing:
        raise ValueError(f"no magnitude ratio was recorded for step {missing[0]}; calibrate again.")
    mean = [1.0] + [float(np.mean(ratios[i])) for i in range(1, steps)]
    std = [0.0] + [float(np.std(ratios[i])) for i in range(1, steps)]
    return {"ratios": mean, "std": std, "steps": steps}


def load_coefficients(path: str | Path, name: str) -> tuple[float, ...]:
    """The coefficients for cache `name` from a calibration file (MagCache: its ratio curve);
    ValueError (one sentence) if unusable."""
    key = KEYS.get(name, "coefficients")
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"the cache calibration file {path} does not exist.") from None
    except (OSError, ValueError):
        raise ValueError(f"{path} is not a cache calibration file (not readable JSON).") from None
    if not isinstance(data, dict) or name not in data:
        raise ValueError(
            f"{path} holds no {key} for {name}; rerun python -m framepack.training.calibrate to record them."
        )
    try:
        coeffs = tuple(float(c) for c in data[name][key])
    except (KeyError, ValueError, TypeError):
        raise ValueError(f"{path} is not a cache calibration file with {key} for {name}.") from None
    if not coeffs:
        raise ValueError(f"{path} holds no {key} for {name}.")
    return coeffs


def calibrate(
    bundle,
    image: np.ndarray | str,
    prompt: str,
    sections: int = 2,
    steps: int | None = None,
    vram_budget: str | float | None = None,
) -> dict:
    """Run an uncached generation on `bundle` (start `image`: an array or a path; weights streamed
    under `vram_budget` GiB) with a `Recorder` attached, and fit the three caches."""
    from ..pipeline.run import Request, open_run
    from ..pipeline.settings import GenerationSettings

    recorder = Recorder().attach(bundle.transformer)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = image if isinstance(image, str) else None
            settings = GenerationSettings(
                prompt, path, sections=sections, steps=steps, name="calibration", vram_budget=vram_budget
            )
            open_run(bundle, Request(settings, None if path else image)).run(tmp)
    finally:
        recorder.detach()
    return {**fit(recorder.rows), "magcache": fit_ratios(recorder.ratios)}


def demo_image(height: int = 64, width: int = 96) -> np.ndarray:
    """A plain test picture (a gradient with a square), for calibrating without an image file."""
    y, x = np.mgrid[0:height, 0:width]
    img = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], -1)
    img[height // 4 : 3 * height // 4, width // 4 : width // 2] = (230, 40, 40)
    return img.astype(np.uint8)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", required=True, help="bundle directory or name ('tiny': a tiny random bundle)"
    )
    parser.add_argument("--image", help="start image (default: a generated test picture)")
    parser.add_argument("--prompt", default="a red square moves to the right")
    parser.add_argument("--sections", type=int, default=2)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--vram-budget", metavar="GB|auto", help="stream the weights under this budget")
    parser.add_argument("--out", required=True, help="JSON file to write")
    args = parser.parse_args(argv)
    from ..io import write_json_atomic
    from ..pipeline.bundle import load_bundle

    try:
        if args.model == "tiny":
            from ..testing import tiny_bundle_dir

            args.model = str(tiny_bundle_dir())
        bundle = load_bundle(args.model, device=args.device, vram_budget=args.vram_budget)
        image = args.image or demo_image()
        result = calibrate(bundle, image, args.prompt, args.sections, args.steps, args.vram_budget)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_json_atomic(result, Path(args.out))
    for name in DEGREES:
        r = result[name]
        print(f"{name}: coefficients {[round(c, 6) for c in r['coefficients']]}, R^2 {r['r2']:.3f}")
    print(f"magcache: ratios {[round(c, 5) for c in result['magcache']['ratios']]}")
    print(f"{result['points']} step pairs; written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
