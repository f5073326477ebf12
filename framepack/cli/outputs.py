"""Where `framepack generate` writes besides its outputs' own files: the output folder and the
`--events` file, checked before any loading without leaving anything behind, and the events'
JSON lines."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["check_events_file", "check_out_folder", "event_json"]


def check_out_folder(out: str) -> None:
    """Refuse an output folder this process cannot create files in, before any work is done.
    Nothing is left behind: a missing folder is not created here (the run creates it), the
    nearest folder that exists is probed instead."""
    folder = Path(out)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"cannot write to the output folder {folder} ({existing} is not a folder).")
    try:
        Path(tempfile.mkdtemp(dir=existing, prefix=".framepack-probe-")).rmdir()
    except OSError as e:
        what = e.strerror or type(e).__name__
        raise ValueError(f"cannot write to the output folder {folder} ({what}).") from None


def check_events_file(path: str | None) -> None:
    """Refuse an `--events` file that cannot be written, before any loading; one that did not exist
    is not left behind."""
    if path is None:
        return
    file = Path(path)
    folder = file.parent
    if not folder.is_dir():
        raise ValueError(f"cannot write the events file {file}: the folder {folder} does not exist.")
    existed = file.exists()
    try:
        with open(file, "a"):
            pass
    except OSError as e:
        what = e.strerror or type(e).__name__
        raise ValueError(f"cannot write the events file {file} ({what}).") from None
    if not existed:
        os.unlink(file)


def event_json(event) -> dict:
    """One `--events` line: the event's kind and what a script watching the run needs of it."""
    from ..pipeline.events import Finished, FrameDone, SectionDone, Stage, StepEvent

    if isinstance(event, StepEvent):
        return {
            "event": "step",
            "section": event.section,
            "sections": event.sections,
            "step": event.step,
            "steps": event.steps,
        }
    if isinstance(event, SectionDone):
        return {
            "event": "section",
            "section": event.section,
            "sections": event.sections,
            "video": str(event.video) if event.video else None,
            "frames": event.frames,
            "seconds": round(event.seconds, 3),
        }
    if isinstance(event, Finished):
        return {
            "event": "finished",
            "video": str(event.video),
            "frames": event.frames,
            "sidecar": str(event.sidecar),
        }
    if isinstance(event, FrameDone):
        return {"event": "frame", "image": str(event.image), "sidecar": str(event.sidecar)}
    if isinstance(event, Stage):
        return {"event": "stage", "name": event.name}
    return {"event": type(event).__name__}
