"""`framepack.generate(resume=...)`: a run cancelled after its first section, finished through the
Python API, equals the uninterrupted run; a cancel after the last sampling step still finishes."""

from __future__ import annotations

import json

import numpy as np
import pytest

import framepack
from framepack.io import read_video
from framepack.pipeline.events import SectionDone, StepEvent
from framepack.pipeline.jobs import JobError
from framepack.sampling import Cancelled
from framepack.testing import tiny_bundle_dir

WS = 9


@pytest.fixture(scope="module")
def model() -> str:
    return str(tiny_bundle_dir())


SETTINGS = dict(prompt="a cat walks", sections=3, steps=2, seed=7, name="clip")


def test_cancelled_run_resumed_through_the_api_equals_the_uninterrupted_one(tmp_path, model, image):
    ref = framepack.generate(model, tmp_path / "ref", image=image, **SETTINGS)

    done = []
    record = lambda e: done.append(e) if isinstance(e, SectionDone) else None  # noqa: E731
    with pytest.raises(Cancelled):
        framepack.generate(
            model, tmp_path / "run", image=image, on_event=record, cancel=lambda: len(done) >= 1, **SETTINGS
        )
    job = tmp_path / "run" / "clip.job"
    assert len(done) == 1 and (job / "job.json").is_file()

    # Mixing settings with a resume is one sentence, before anything runs.
    with pytest.raises(ValueError, match=r"^resume continues a job with its own settings .*drop seed\.$"):
        framepack.generate(resume=job, seed=1)
    with pytest.raises(ValueError, match="drop out_dir, image"):
        framepack.generate(model, tmp_path / "elsewhere", image=image, resume=job)
    with pytest.raises(JobError, match="not an unfinished job directory"):
        framepack.generate(resume=tmp_path / "nothing")

    events = list(framepack.generate_iter(resume=tmp_path / "run" / "clip.mp4"))  # the mp4 names it too
    first = next(e for e in events if isinstance(e, SectionDone))
    assert first.section == 0 and first.frames == done[0].frames  # the restored section, reported first
    finished = events[-1]
    assert finished.video == tmp_path / "run" / "clip.mp4" and not job.exists()
    frames, ref_frames = read_video(finished.video)[0], read_video(ref.video)[0]
    assert frames.shape[0] == 4 * (3 * WS + 1) - 3 and np.array_equal(frames, ref_frames)
    assert (
        json.loads(finished.sidecar.read_text())["settings"]
        == json.loads(ref.sidecar.read_text())["settings"]
    )


def test_cancel_after_the_last_sampling_step_finishes_the_video(tmp_path, model, image):
    """The last section's sampling is over, so its video is complete: the run ends done, not cancelled."""
    last = []

    def watch(event) -> None:
        if (
            isinstance(event, StepEvent)
            and event.section == event.sections - 1
            and event.step == event.steps - 1
        ):
            last.append(event)

    done = framepack.generate(
        model, tmp_path, image=image, on_event=watch, cancel=lambda: bool(last), **{**SETTINGS, "sections": 2}
    )
    assert last and done.frames == read_video(done.video)[0].shape[0] == 4 * (2 * WS + 1) - 3
    assert done.sidecar.is_file() and not (tmp_path / "clip.job").exists()
