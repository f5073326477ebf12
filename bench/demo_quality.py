"""Demo-model quality: prompted motion on unseen scenes, and drift by section order.

    python bench/demo_quality.py motion --prompts 20 --seconds 10 --record
    python bench/demo_quality.py drift --run inverted=framepack/demo_model \\
        --run forward=demo-work/forward-bundle --prompts 10 --seconds 30 --record

`motion`: start images and captions of demo-world scenes drawn from seeds the training never used
(the demo clips use seeds 1000..1399, the VAE's scenes are drawn per step from 0 up); the same
number of scenes for each of left/right/up/down. For each generated video it checks, with
`framepack eval`'s measures, that the tracked centroid moved in the prompted direction, that the
shape's colour at the end is still the prompted one, and that the shape is still there at the end
with its area within a factor of two of the start (the demo VAE is too blurry at 64 pixels to
tell a triangle from a circle reliably, so size stands in for shape).

`drift`: the FramePack paper's drift measure `|M(first 15%) - M(last 15%)|` of long videos for each
`--run NAME=BUNDLE` (the bundle's manifest gives its order), means over the same scenes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from framepack.training.evaluate import evaluate_video  # noqa: E402
from framepack.training.world import DIRECTIONS, first_frame, measure, sample_scene  # noqa: E402

KEYS = ("drift_sharpness", "drift_colour_mean", "drift_colour_std", "drift_size", "motion_ok")
HELDOUT_SEED = 500_000  # far from every seed the demo training drew


def heldout_scenes(count: int, motions: tuple[str, ...] = DIRECTIONS):
    """`count` scenes from unused seeds, cycling through `motions` so each gets its share."""
    scenes, seed, want = [], HELDOUT_SEED, 0
    while len(scenes) < count:
        scene = sample_scene(seed)
        if scene.motion == motions[want % len(motions)]:
            scenes.append((seed, scene))
            want += 1
        seed += 1
    return scenes


def run_video(model: str, out: Path, seed: int, scene, seconds: float, size: int, cfg: float | None = None):
    import framepack

    image = first_frame(scene, size=size)
    started = time.perf_counter()
    done = framepack.generate(
        model,
        out,
        image=image,
        prompt=scene.caption,
        seconds=seconds,
        seed=seed,
        name=f"scene{seed}",
        cfg=cfg,
    )
    return Path(done.video), time.perf_counter() - started


def size_kept(path: Path) -> bool:
    from framepack.io import read_video

    frames, _, _ = read_video(path)
    area = measure(frames)["area"]
    return bool(area[-1] > 0 and 0.5 <= area[-1] / area[0] <= 2.0)


def cmd_motion(args) -> list[str]:
    rows, motion_ok, colour_ok, shape_ok, took = [], 0, 0, 0, []
    for seed, scene in heldout_scenes(args.prompts):
        video, seconds = run_video(
            args.model, args.out / "motion", seed, scene, args.seconds, args.size, args.cfg
        )
        report = evaluate_video(video, scene.caption)
        kept = size_kept(video)
        motion_ok += bool(report.motion_ok)
        colour_ok += bool(report.colour_kept)
        shape_ok += kept
        took.append(seconds)
        print(
            f"{scene.caption:55s} moved {report.measured_motion!s:6s} "
            f"colour {report.start_colour}->{report.end_colour} size {'kept' if kept else 'LOST'} "
            f"({seconds:.0f} s)",
            flush=True,
        )
    n = args.prompts
    summary = (
        f"motion in the prompted direction {motion_ok}/{n} ({100 * motion_ok / n:.0f}%), "
        f"colour kept {colour_ok}/{n}, shape present with its size kept {shape_ok}/{n}; "
        f"{args.seconds:g} s videos, {np.mean(took):.0f} s each"
    )
    print(summary)
    command = "python bench/demo_quality.py " + " ".join(sys.argv[1:])
    from framepack.pipeline.bundle import Manifest

    cfg = args.cfg if args.cfg is not None else Manifest.load(Path(args.model) / "framepack.json").cfg
    rows.append(
        f"| {time.strftime('%Y-%m-%d')} | {Path(args.model).name} (cfg {cfg:g}) | {n} x {args.seconds:g} s | "
        f"{motion_ok}/{n} (**{100 * motion_ok / n:.0f}%**) | {colour_ok}/{n} | {shape_ok}/{n} | "
        f"{np.mean(took):.0f} | `{command}` |"
    )
    return rows


def cmd_drift(args) -> list[str]:
    from framepack.pipeline.bundle import Manifest

    table = ["| run | order | videos | sharpness | colour mean | colour std | object size | motion ok |"]
    table.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for spec in args.run:
        name, _, model = spec.partition("=")
        order = Manifest.load(Path(model) / "framepack.json").order
        reports = []
        for seed, scene in heldout_scenes(args.prompts):
            video, _ = run_video(
                model, args.out / f"drift-{name}", seed, scene, args.seconds, args.size, args.cfg
            )
            reports.append(evaluate_video(video, scene.caption))
        mean = {k: float(np.mean([getattr(r, k) for r in reports])) for k in KEYS}
        row = (
            f"| {name} | {order} | {len(reports)} | {mean['drift_sharpness']:.2f} | "
            f"{mean['drift_colour_mean']:.2f} | {mean['drift_colour_std']:.2f} | "
            f"{mean['drift_size']:.4f} | {mean['motion_ok']:.2f} |"
        )
        print(row, flush=True)
        table.append(row)
    return table


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    for name in ("motion", "drift"):
        s = sub.add_parser(name)
        s.add_argument("--prompts", type=int, default=20 if name == "motion" else 10)
        s.add_argument("--seconds", type=float, default=10.0 if name == "motion" else 30.0)
        s.add_argument("--size", type=int, default=64, help="start image side in pixels")
        s.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench-demo")
        s.add_argument("--record", action="store_true", help="append the result to bench/RESULTS.md")
        s.add_argument("--cfg", type=float, help="real CFG scale (default: each model's manifest)")
    sub.choices["motion"].add_argument("--model", default=str(ROOT / "framepack" / "demo_model"))
    sub.choices["drift"].add_argument("--run", action="append", required=True, help="NAME=BUNDLE_DIR")
    args = p.parse_args()
    rows = cmd_motion(args) if args.what == "motion" else cmd_drift(args)
    if args.record:  # rows under the matching table of bench/RESULTS.md (motion: the last one)
        with (ROOT / "bench" / "RESULTS.md").open("a") as f:
            if args.what == "drift":
                command = "python bench/demo_quality.py " + " ".join(sys.argv[1:])
                f.write(f"\nDrift, `{command}` ({time.strftime('%Y-%m-%d')}):\n\n")
            f.write("\n".join(rows) + "\n")
        print(json.dumps({"recorded": str(ROOT / "bench" / "RESULTS.md")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
