"""One job of the GUI's queue: its settings and live state (`QueuedJob`), its states, and the one
sentence a failed job shows (`describe_error`).

Only the queue (`framepack.gui.jobs`) changes a job; readers get copies. Nothing here imports Gradio.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..memory.runtime import is_out_of_memory
from ..pipeline.run import Run
from ..pipeline.settings import GenerationSettings

__all__ = ["QUEUED", "RUNNING", "DONE", "FAILED", "CANCELLED", "ENDED", "QueuedJob", "describe_error"]

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
ENDED = (DONE, FAILED, CANCELLED)


@dataclass
class QueuedJob:
    """One generation and its live state (readers get copies; only the queue mutates a job)."""

    id: int
    prompt: str
    settings: GenerationSettings | None  # None when the form itself was rejected
    state: str = QUEUED
    error: str | None = None
    submitted: float = field(default_factory=time.time)
    started: float | None = None
    ended: float | None = None
    stage: str = ""
    sections: int = 0  # S, from the section plan
    section: int = 0  # 0-based, in generation order, of the last step seen
    sections_done: int = 0
    step: int = 0  # 1-based step within the current section
    steps: int = 0
    steps_done: int = 0  # over every section
    fps: int = 30
    preview: np.ndarray | None = field(default=None, repr=False)  # (T, h, w, 3) uint8
    video: Path | None = None  # the mp4 so far (final once done)
    frames: int = 0
    gif: Path | None = None
    sidecar: Path | None = None
    image: Path | None = None  # a one-frame job's PNG
    one_frame: int | None = None  # one-frame mode: the latent time index
    one_frame_groups: tuple[str, ...] = ()
    video_source: str | None = None  # a video extension: the video being extended
    resume_dir: Path | None = None  # a resumed job: the job directory it continues
    skipped_steps: int = 0  # a resumed job: the steps of the sections finished before it
    restored_sections: int = 0  # a resumed job: the sections finished before it
    resumed_as: int | None = None  # a stopped job: the id of the job that continues its job directory
    frame_size: tuple[int, int] | None = None  # (height, width) of the video's frames
    thumbnail: np.ndarray | None = field(default=None, repr=False)  # (h, w, 3) uint8, at most 96 px
    version: int = 0  # bumped on every change, so a view can skip unchanged jobs
    video_version: int = 0  # bumped when the mp4 is rewritten
    run: Run | None = field(default=None, repr=False)  # the checked run, until it has ended
    cancel_requested: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def resumed(self) -> bool:
        """Whether the job continues an unfinished job directory (`JobQueue.resume`)."""
        return self.resume_dir is not None

    @property
    def total_steps(self) -> int:
        return self.sections * self.steps

    @property
    def ended_state(self) -> bool:
        return self.state in ENDED

    @property
    def video_seconds(self) -> float:
        """Seconds of video made so far."""
        return self.frames / self.fps if self.fps else 0.0

    def eta(self, now: float | None = None) -> float | None:
        """Seconds left, from the mean time per sampling step so far (None before the first step)."""
        if self.state != RUNNING or not self.steps_done or self.started is None:
            return None
        elapsed = (time.time() if now is None else now) - self.started
        left = self.total_steps - self.skipped_steps - self.steps_done
        return max(0.0, elapsed / self.steps_done * left)


def describe_error(e: BaseException) -> str:
    """One sentence for a failed job (tracebacks go to the server log, never to the page)."""
    if isinstance(e, ValueError):
        text = str(e)
    elif is_out_of_memory(e):
        text = (
            "the device ran out of memory; set a VRAM budget (auto, or a number of GiB) to stream the "
            "weights, or try a lower resolution or a smaller window"
        )
    elif isinstance(e, OSError):
        where = f" ({e.filename})" if e.filename else ""
        text = f"could not read or write a file{where}: {e.strerror or e}"
    else:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        text = f"generation failed with {type(e).__name__}" + (f": {first}" if first else "")
    text = " ".join(text.split())
    return text if text.endswith((".", "!", "?")) else text + "."
