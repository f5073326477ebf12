"""What the GUI shows of jobs: progress lines, the latent preview grid, the queue table (with a
thumbnail per job), the gallery.

Pure functions of `QueuedJob` copies (no Gradio). Every user-supplied text is HTML-escaped.
"""

from __future__ import annotations

import html
import math
import time
from pathlib import Path

import numpy as np

from .pictures import png_data_uri, readable
from .record import CANCELLED, DONE, FAILED, QUEUED, RUNNING, QueuedJob

__all__ = [
    "format_duration",
    "preview_grid",
    "live_preview",
    "progress_text",
    "progress_html",
    "queue_html",
    "finished_videos",
    "job_label",
]


def format_duration(seconds: float) -> str:
    """3 s, 1 min 05 s, 2 h 03 min."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def job_label(job: QueuedJob) -> str:
    prompt = " ".join(job.prompt.split())
    resumed = " (resumed)" if job.resumed else ""
    return f"#{job.id} {prompt[:48]}{'…' if len(prompt) > 48 else ''}{resumed}"


def preview_grid(
    preview: np.ndarray, height: int = 240, frame_size: tuple[int, int] | None = None
) -> np.ndarray:
    """(T, h, w, 3) latent preview -> the frames in a near-square grid (row by row, black padding),
    scaled up (nearest) to about `height` pixels. A dark preview has its contrast stretched, and
    with `frame_size` (height, width) each frame is first scaled (bilinear) to that size
    (`framepack.gui.pictures.readable`)."""
    preview = readable(preview, frame_size)
    t, h, w, c = preview.shape
    cols = math.ceil(math.sqrt(t))
    rows = math.ceil(t / cols)
    grid = np.zeros((rows * cols, h, w, c), np.uint8)
    grid[:t] = preview
    grid = grid.reshape(rows, cols, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)
    k = max(1, round(height / (rows * h)))
    return grid.repeat(k, axis=0).repeat(k, axis=1)


def live_preview(job: QueuedJob, max_side: int = 1280) -> np.ndarray | None:
    """The job's latest step preview as a person can read it (None before its first step): its
    frames at the video's frame size (smaller when the grid would be over `max_side` pixels), the
    contrast of a dark one stretched, in a near-square grid."""
    if job.preview is None:
        return None
    t, h, w, _ = job.preview.shape
    height, width = job.frame_size or (h, w)
    cols = math.ceil(math.sqrt(t))
    rows = math.ceil(t / cols)
    k = min(1.0, max_side / max(rows * height, cols * width))
    size = (max(h, int(height * k)), max(w, int(width * k)))
    return preview_grid(job.preview, height=rows * size[0], frame_size=size)


def _made(job: QueuedJob) -> str:
    if job.one_frame is not None:
        return f"one frame at time index {job.one_frame} ({job.image.name if job.image else 'PNG'})"
    return f"{job.frames} frames ({job.video_seconds:.1f} s of video)"


def progress_text(job: QueuedJob, position: int | None = None, now: float | None = None) -> str:
    """One line: what the job is doing, how far it is and how long it has left."""
    now = time.time() if now is None else now
    if job.state == QUEUED:
        ahead = "" if position is None else f" ({position} ahead)" if position else " (next)"
        resumes = f" to resume after {_restored(job)}" if job.resumed else ""
        return f"Job #{job.id} is queued{ahead}{resumes}."
    if job.state == RUNNING:
        parts = [f"Job #{job.id}: section {min(job.section + 1, job.sections)}/{job.sections}"]
        if job.steps_done:
            parts.append(f"step {job.step}/{job.steps}")
            eta = job.eta(now)
            if eta is not None:
                parts.append(f"ETA {format_duration(eta)}")
        else:
            if job.resumed:
                parts.append(f"resuming after {_restored(job)}")
            parts.append(job.stage or "starting")
        if job.frames:
            parts.append(f"{_made(job)} so far")
        return " · ".join(parts)
    return _ended_text(job, now) + (f" Resumed as job #{job.resumed_as}." if job.resumed_as else "")


def _restored(job: QueuedJob) -> str:
    return f"{job.restored_sections}/{job.sections} finished sections"


def _ended_text(job: QueuedJob, now: float) -> str:
    took = format_duration((job.ended or now) - job.started) if job.started else ""
    if job.state == DONE:
        resumed = f" (resumed after {_restored(job)})" if job.resumed else ""
        return f"Job #{job.id} done in {took}{resumed}: {_made(job)}."
    if job.state == FAILED:
        return f"Job #{job.id} failed: {job.error}"
    if job.state == CANCELLED:
        if job.frames:
            return f"Job #{job.id} cancelled; kept {job.sections_done} finished section(s): {_made(job)}."
        return f"Job #{job.id} cancelled" + (" before it started." if job.started is None else ".")
    return f"Job #{job.id}: {job.state}."


def progress_html(job: QueuedJob | None, position: int | None = None, now: float | None = None) -> str:
    """The progress bar and line of the watched job."""
    if job is None:
        return '<div class="fp-progress" data-state="none">No job yet: upload an image, write a prompt, press Generate.</div>'
    total = max(job.total_steps, 1)
    done = total if job.state == DONE else job.skipped_steps + job.steps_done
    text = html.escape(progress_text(job, position, now))
    return (
        f'<div class="fp-progress" data-job="{job.id}" data-state="{job.state}">'
        f'<progress value="{done}" max="{total}"></progress> <span>{text}</span></div>'
    )


def queue_html(jobs: list[QueuedJob], now: float | None = None) -> str:
    """Every job, newest first, with its state and its one-sentence error."""
    if not jobs:
        return '<p class="fp-queue-empty">No jobs yet.</p>'
    rows = []
    for job in reversed(jobs):
        if job.state == RUNNING:
            status = progress_text(job, now=now).split(": ", 1)[-1]
        elif job.state == FAILED:
            status = job.error or ""
        elif job.state in (DONE, CANCELLED) and job.frames:
            status = _made(job)
        else:
            status = ""
        if job.resumed_as:
            status = f"{status} · resumed as #{job.resumed_as}" if status else f"resumed as #{job.resumed_as}"
        rows.append(
            f'<tr data-job="{job.id}" data-state="{job.state}"><td>#{job.id}</td>'
            f'<td class="fp-state">{job.state}</td><td>{html.escape(" ".join(job.prompt.split()))}</td>'
            f"<td>{html.escape(status)}</td>{_thumbnail_cell(job)}</tr>"
        )
    head = "<tr><th>job</th><th>state</th><th>prompt</th><th>progress</th><th>preview</th></tr>"
    return f'<table class="fp-queue"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'


def _thumbnail_cell(job: QueuedJob) -> str:
    """The job's thumbnail as an inline PNG (an empty cell when it has none)."""
    if job.thumbnail is None:
        return '<td class="fp-thumb"></td>'
    h, w = job.thumbnail.shape[:2]
    src, alt = html.escape(png_data_uri(job.thumbnail)), html.escape(job_label(job))
    return f'<td class="fp-thumb"><img src="{src}" width="{w}" height="{h}" alt="{alt}"></td>'


def finished_videos(outputs: str | Path, limit: int = 24) -> list[tuple[Path, Path | None, Path]]:
    """(mp4 or one-frame PNG, gif or None, sidecar) of the finished results in `outputs`, newest first.

    A result is finished when its sidecar JSON exists (it is written last).
    """
    found = []
    for sidecar in Path(outputs).glob("*.json"):
        for suffix in (".mp4", ".png"):
            media = sidecar.with_suffix(suffix)
            if media.is_file():
                gif = sidecar.with_suffix(".gif")
                found.append((sidecar.stat().st_mtime, media, gif if gif.is_file() else None, sidecar))
                break
    found.sort(key=lambda item: item[0], reverse=True)
    return [(v, g, s) for _, v, g, s in found[:limit]]
