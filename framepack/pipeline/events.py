"""The typed events of a run, which every front end reads: no UI code is imported here.

A run yields `Stage`s, a `StepEvent` after every sampling step (with a latent preview), a
`SectionDone` after every finished section (with the video written so far), and last `Finished`
(a video) or `FrameDone` (one-frame mode: a PNG).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["Stage", "StepEvent", "SectionDone", "Finished", "FrameDone", "Event"]


@dataclass
class Stage:
    name: str  # "encoding", "sampling", "decoding", "writing"


@dataclass
class StepEvent:
    section: int  # 0-based, in generation order
    sections: int
    step: int  # 0-based
    steps: int
    preview: np.ndarray  # (T, h, w, 3) uint8 x0 preview at latent resolution


@dataclass
class SectionDone:
    section: int
    sections: int
    video: Path | None  # the mp4 written so far (None if this section is not visible yet)
    frames: int  # frames in that video
    seconds: float  # wall time of the section


@dataclass
class Finished:
    video: Path
    frames: int
    sidecar: Path
    gif: Path | None = None
    wall_seconds: float = 0.0  # the run's wall time, resumed runs included (the sidecar's too)
    info: dict = field(default_factory=dict)


@dataclass
class FrameDone:
    """The end of a one-frame run (`framepack.pipeline.one_frame`)."""

    image: Path  # the PNG
    sidecar: Path  # its JSON settings, written last
    frame: np.ndarray  # (H, W, 3) uint8
    info: dict


Event = Stage | StepEvent | SectionDone | Finished | FrameDone
