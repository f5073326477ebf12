"""Drift and demo-world checks on generated videos (`framepack eval`).

Drift follows the FramePack paper (section 4.3): for a per-frame measure M, the drift is
`|M(first 15% of frames) - M(last 15%)|`. Measures: sharpness (variance of the Laplacian),
colour statistics (mean and std of each channel) and, in the demo world, the shape's size. For
demo-world videos with a caption, the shape's motion (its tracked centroid) is compared with the
prompted one, and its colour at the end with its colour at the start.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .world import classify_motion, measure, nearest_colour, scene_from_caption

__all__ = ["VideoReport", "sharpness", "drift", "evaluate_frames", "evaluate_video", "summarise"]

EDGE = 0.15  # the paper's share of frames at each end


def sharpness(frames: np.ndarray) -> np.ndarray:
    """Variance of the 4-neighbour Laplacian of each frame's luma, `(T,)`."""
    luma = frames.astype(np.float64) @ np.array([0.299, 0.587, 0.114])  # (T, H, W)
    lap = (
        -4 * luma[:, 1:-1, 1:-1]
        + luma[:, :-2, 1:-1]
        + luma[:, 2:, 1:-1]
        + luma[:, 1:-1, :-2]
        + luma[:, 1:-1, 2:]
    )
    return lap.reshape(lap.shape[0], -1).var(axis=1)


def drift(values: np.ndarray, edge: float = EDGE) -> float:
    """`|mean(first edge share) - mean(last edge share)|` of a per-frame measure (NaNs ignored)."""
    values = np.asarray(values, dtype=np.float64)
    n = max(1, int(round(len(values) * edge)))
    first, last = np.nanmean(values[:n], axis=0), np.nanmean(values[-n:], axis=0)
    return float(np.max(np.abs(first - last)))


@dataclass
class VideoReport:
    path: str
    frames: int
    drift_sharpness: float
    drift_colour_mean: float
    drift_colour_std: float
    drift_size: float | None = None
    caption: str | None = None
    expected_motion: str | None = None
    measured_motion: str | None = None
    motion_ok: bool | None = None
    start_colour: str | None = None
    end_colour: str | None = None
    colour_kept: bool | None = None
    extra: dict = field(default_factory=dict)


def evaluate_frames(frames: np.ndarray, caption: str | None = None, path: str = "") -> VideoReport:
    """Drift measures of `(T, H, W, 3)` uint8 frames, plus the demo checks given a caption."""
    rgb = frames.astype(np.float64)
    report = VideoReport(
        path=path,
        frames=int(frames.shape[0]),
        drift_sharpness=drift(sharpness(frames)),
        drift_colour_mean=drift(rgb.mean(axis=(1, 2))),
        drift_colour_std=drift(rgb.std(axis=(1, 2))),
    )
    if caption is None:
        return report
    scene = scene_from_caption(caption)  # ValueError for captions outside the demo grammar
    measured = measure(frames)
    report.caption = caption
    report.drift_size = drift(measured["area"])
    report.expected_motion = scene.motion
    report.measured_motion = classify_motion(measured)
    report.motion_ok = report.measured_motion == scene.motion
    colours = measured["colour"]
    ok = np.isfinite(colours).all(axis=1)
    if ok.any():
        report.start_colour = nearest_colour(colours[ok][0])
        report.end_colour = nearest_colour(colours[ok][-1])
        report.colour_kept = report.start_colour == report.end_colour == scene.colour
    else:
        report.colour_kept = False
    return report


def evaluate_video(path: str | Path, caption: str | None = None) -> VideoReport:
    """Read a video (mp4 or anything PyAV opens) and evaluate it."""
    from ..io import read_video

    frames, _, meta = read_video(path)
    return evaluate_frames(frames, caption, str(path))


def summarise(reports: list[VideoReport]) -> dict:
    """Means of the drift measures and the share of demo checks passed."""
    out: dict = {"videos": len(reports)}
    for key in ("drift_sharpness", "drift_colour_mean", "drift_colour_std", "drift_size"):
        values = [getattr(r, key) for r in reports if getattr(r, key) is not None]
        if values:
            out[key] = float(np.mean(values))
    for key in ("motion_ok", "colour_kept"):
        values = [getattr(r, key) for r in reports if getattr(r, key) is not None]
        if values:
            out[key] = float(np.mean(values))
    return out


def as_dict(report: VideoReport) -> dict:
    return asdict(report)
