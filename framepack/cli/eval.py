"""`framepack eval`: drift measures (and demo-world checks) of generated videos."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import UserError

__all__ = ["add_parser"]


def _caption_of(video: Path, given: str | None) -> str | None:
    """The caption to check: given, or the prompt in the video's sidecar if it is a demo caption."""
    from ..training.world import scene_from_caption

    text = given
    sidecar = video.with_suffix(".json")
    if text is None and sidecar.is_file():
        try:
            text = json.loads(sidecar.read_text())["settings"]["prompt"]
        except (OSError, ValueError, KeyError, TypeError):
            text = None
    if text is None:
        return None
    try:
        scene_from_caption(text)
    except ValueError:
        if given is not None:
            raise
        return None  # not a demo-world prompt: drift measures only
    return text


def cmd_eval(args: argparse.Namespace) -> None:
    from ..training.evaluate import as_dict, evaluate_video, summarise

    reports = []
    for name in args.videos:
        path = Path(name)
        if not path.is_file():
            raise UserError(f"video {name} does not exist.")
        try:
            reports.append(evaluate_video(path, _caption_of(path, args.caption)))
        except ValueError as e:
            raise UserError(f"{name}: {e}") from None
    if args.json:
        print(json.dumps({"videos": [as_dict(r) for r in reports], "summary": summarise(reports)}, indent=2))
        return
    for r in reports:
        line = f"{r.path}: {r.frames} frames, drift sharpness {r.drift_sharpness:.2f}, colour mean {r.drift_colour_mean:.2f}"
        if r.caption is not None:
            line += (
                f", size {r.drift_size:.4f}; motion {r.measured_motion or 'none measured'} (asked {r.expected_motion}) "
                f"{'ok' if r.motion_ok else 'WRONG'}; colour {r.start_colour}->{r.end_colour} "
                f"{'kept' if r.colour_kept else 'CHANGED'}"
            )
        print(line)
    summary = summarise(reports)
    print(
        "summary: "
        + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items())
    )


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="drift measures of videos (and demo-world motion/colour checks)")
    p.add_argument("videos", nargs="+", help="mp4 files (a sidecar .json beside each gives its prompt)")
    p.add_argument("--caption", help="demo-world caption to check every video against")
    p.add_argument("--json", action="store_true", help="print a JSON report")
    p.set_defaults(func=cmd_eval)
