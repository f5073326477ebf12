"""Video extension in job directories: an extension cancelled after its first section and resumed
(API, CLI) equals the uninterrupted one frame for frame, in both orders; a job whose source video
changed, went missing or is another file is refused with one sentence (API, CLI, GUI)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import framepack
from framepack.cli.main import main
from framepack.gui.jobs import FAILED, QUEUED, JobQueue
from framepack.io import read_video, write_mp4
from framepack.pipeline.bundle import load_bundle
from framepack.pipeline.events import SectionDone, StepEvent
from framepack.pipeline.extend import prepare_extension
from framepack.pipeline.jobs import JobError
from framepack.pipeline.run import Run, resume_job
from framepack.pipeline.settings import GenerationSettings
from framepack.sampling import Cancelled
from framepack.testing import tiny_bundle_dir

WS = 3
SOURCE_FRAMES = 45


def _clip(shift: int = 0) -> np.ndarray:
    frames = np.zeros((SOURCE_FRAMES, 64, 64, 3), np.uint8)
    frames[:] = (40, 60, 90)
    for t in range(SOURCE_FRAMES):
        frames[t, 20:40, t + shift : t + shift + 16] = (230, 200, 40)
    return frames


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("source") / "clip.mp4"
    write_mp4(_clip(), path, fps=24)
    return str(path)


def _settings(**kw) -> GenerationSettings:
    return GenerationSettings(
        **{
            "prompt": "the square moves",
            "sections": 3,
            "steps": 2,
            "window": WS,
            "name": "ext",
            "png": True,
            **kw,
        }
    )


def _extend(bundle, settings, video, out, cancel=None) -> list:
    prepared, src = prepare_extension(bundle, settings, video)
    return list(Run(bundle, prepared, src).events(out, cancel))


def _cancelled(bundle, settings, video, out) -> list[SectionDone]:
    done = []

    def cancel() -> bool:
        return bool(done)

    prepared, src = prepare_extension(bundle, settings, video)
    with pytest.raises(Cancelled):
        for event in Run(bundle, prepared, src).events(out, cancel):
            if isinstance(event, SectionDone):
                done.append(event)
    return done


def _pngs(folder) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p)) for p in sorted(folder.glob("frame_*.png"))])


@pytest.mark.parametrize("order", ["forward", "inverted"])
def test_cancelled_extension_resumes_to_the_uninterrupted_one(tmp_path, source, order, capsys):
    model = tiny_bundle_dir(order)
    bundle = load_bundle(model)
    kw = {}
    if order == "inverted":  # leading into the video from a start image
        Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(tmp_path / "start.png")
        kw["image"] = str(tmp_path / "start.png")
    ref = _extend(bundle, _settings(**kw), source, tmp_path / "ref")[-1]

    done = _cancelled(bundle, _settings(**kw), source, tmp_path / "run")
    job = tmp_path / "run" / "ext.job"
    assert len(done) == 1 and (job / "sections" / "0000.safetensors").is_file()
    assert read_video(tmp_path / "run" / "ext.mp4")[0].shape[0] == done[0].frames
    recorded = json.loads((job / "job.json").read_text())["video"]
    assert recorded["path"] == str(Path(source).resolve()) and len(recorded["sha256"]) == 64

    if order == "forward":  # through the API
        events = list(framepack.generate_iter(resume=job))
        steps = sum(isinstance(e, StepEvent) for e in events)
        assert events[-1].video == tmp_path / "run" / "ext.mp4"
    else:  # through the CLI
        log = tmp_path / "events.jsonl"
        assert main(["generate", "--resume", str(job), "--events", str(log)]) == 0
        assert capsys.readouterr().out.strip() == str(tmp_path / "run" / "ext.mp4")
        events = [json.loads(line) for line in log.read_text().splitlines()]
        steps = sum(e["event"] == "step" for e in events)
    assert steps == 2 * 2  # only the two sections left are sampled
    frames, fps, _ = read_video(tmp_path / "run" / "ext.mp4")
    assert fps == pytest.approx(24) and np.array_equal(frames, read_video(ref.video)[0])
    assert frames.shape[0] == ref.frames
    assert np.array_equal(_pngs(tmp_path / "run" / "ext_frames"), _pngs(tmp_path / "ref" / "ext_frames"))
    info = json.loads((tmp_path / "run" / "ext.json").read_text())
    assert info["extension"] == json.loads(ref.sidecar.read_text())["extension"]
    assert not job.exists()


def test_changed_missing_or_other_source_is_refused(tmp_path, source, capsys):
    model = tiny_bundle_dir("forward")
    bundle = load_bundle(model)
    video = tmp_path / "clip.mp4"
    shutil.copy(source, video)
    out = tmp_path / "out"
    _cancelled(bundle, _settings(), video, out)
    job = out / "ext.job"
    queue = JobQueue(bundle, out, start=False)
    resumed = queue.resume(job)  # the GUI dispatches on what the job holds
    assert resumed.state == QUEUED and resumed.video_source == str(video.resolve())
    queue.close()

    write_mp4(_clip(shift=5), video, fps=24)  # the source changes
    changed = (
        f"the video {video.resolve()} has changed since the job {job} began (its size or contents "
        "differ); put the original back or delete the job."
    )
    with pytest.raises(JobError) as e:
        resume_job(bundle, job)
    assert str(e.value) == changed
    assert main(["generate", "--resume", str(job)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"framepack: {changed}"]
    refused = JobQueue(bundle, out, start=False).resume(job)
    assert refused.state == FAILED and refused.error == changed
    with pytest.raises(JobError, match="has changed since"):  # the same extension again, by name
        _extend(bundle, _settings(), video, out)

    other = tmp_path / "other.mp4"
    shutil.copy(source, other)
    with pytest.raises(JobError, match=r"holds an unfinished extension of another video"):
        _extend(bundle, _settings(), other, out)

    video.unlink()
    with pytest.raises(JobError, match=r"extends is missing; put it back to resume\.$"):
        framepack.generate(resume=job)
    assert (job / "job.json").is_file()  # the unfinished job is left alone
