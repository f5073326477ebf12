"""Seamless loops: the video ends leading back into its start frame, and the seam is measured.

With `loop` the start image is also the end image (FRAMEPACK.md section 4: the end frame is the
clean history after the last window), so the inverted and anti-drifting orders generate a last
section that continues into the first frame. After the run the seam is checked: the mean absolute
difference (0-255) between the last and the first frame, next to the median difference between
consecutive frames; a seam no bigger than a typical step plays without a visible jump.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

__all__ = ["loop_seam", "record_loop_seam"]


def loop_seam(frames: np.ndarray) -> dict:
    """`{"seam", "typical_step", "ratio"}` of `(T, H, W, 3)` uint8 frames played in a loop."""
    f = frames.astype(np.float32)
    steps = np.abs(np.diff(f, axis=0)).mean(axis=(1, 2, 3))  # (T - 1,)
    seam = float(np.abs(f[-1] - f[0]).mean())
    typical = float(np.median(steps)) if steps.size else 0.0
    return {
        "seam": round(seam, 3),
        "typical_step": round(typical, 3),
        "ratio": round(seam / max(typical, 1e-6), 3),
    }


def record_loop_seam(video: Path, sidecar: Path) -> dict:
    """Measure the seam of a finished video and add it to its sidecar (as `loop_seam`)."""
    from ..io import read_video, write_json_atomic

    seam = loop_seam(read_video(video)[0])
    info = json.loads(Path(sidecar).read_text())
    info["loop_seam"] = seam
    write_json_atomic(info, sidecar)
    return seam
