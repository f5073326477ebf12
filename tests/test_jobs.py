"""Job directories: segments that hold every frame once, remuxed mp4s, and resumes (after a cancel
and after kill -9) that give the same video as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from framepack.cli.main import main
from framepack.io import concat_mp4, read_video, write_mp4
from framepack.pipeline.decode import IncrementalDecoder, to_uint8_frames
from framepack.pipeline.events import SectionDone
from framepack.pipeline.jobs import JobDir, JobError, find_job
from framepack.pipeline.run import Request, Run, open_run, resume_job
from framepack.pipeline.settings import GenerationSettings
from framepack.pipeline.video_output import SegmentedVideo
from framepack.sampling import Cancelled
from framepack.testing import tiny_bundle, tiny_bundle_dir

WS = 9


def causal_decode(latents: torch.Tensor) -> torch.Tensor:
    """A causal 4x temporal, 8x spatial 'decoder' (latent 0 -> 1 frame, later latents -> 4)."""
    x = latents[:, :3].tanh()
    x = torch.cat([x[:, :, :1], x[:, :, 1:].repeat_interleave(4, dim=2)], dim=2)
    return x.repeat_interleave(8, dim=3).repeat_interleave(8, dim=4)  # (1, 3, 4n - 3, 8h, 8w)


def _frames(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 200, (1, 32, 48, 3))
    return (base + 2 * np.arange(n)[:, None, None, None]).astype(np.uint8)


def test_concat_mp4_is_the_parts_decoded_in_order(tmp_path):
    """Parts shorter than the encoder's B-frame delay (1, 2 frames) join too; metadata is kept."""
    parts = []
    for i, n in enumerate([33, 2, 36, 1, 5]):
        parts.append(write_mp4(_frames(n, i), tmp_path / f"part{i}.mp4", fps=24))
    joined = concat_mp4(parts, tmp_path / "all.mp4", metadata={"framepack": "{}"})
    frames, fps, meta = read_video(joined)
    expected = np.concatenate([read_video(p)[0] for p in parts])
    assert np.array_equal(frames, expected) and fps == pytest.approx(24)
    assert meta == {"framepack": "{}"}
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("forward", [False, True])
def test_segments_and_tail_are_the_incremental_frames(tmp_path, forward):
    """After every update the stored segments + tail are exactly the full incremental decode."""
    ws, sections = 3, 4
    total = ws * sections + 1
    bank = torch.randn(1, 16, total, 2, 4, generator=torch.Generator().manual_seed(0))
    full = IncrementalDecoder(causal_decode, ws)
    video = SegmentedVideo(
        JobDir(tmp_path / "x.job"), IncrementalDecoder(causal_decode, ws), not forward, 30, 16, True
    )
    for k in range(sections):
        if forward:
            lo, hi = 0, 1 + (k + 1) * ws
        else:
            lo = 1 + (sections - 1 - k) * ws
            lo, hi = (lo if lo > 1 else 0), total
        final = k == sections - 1
        assert full.update(bank, lo, hi) and video.update(bank, lo, hi, k, final)
        folder = tmp_path / "x.job" / "segments"
        settled = [np.load(folder / f"{name}.npy") for name, _ in video.segments]
        tail_frames = video.decoder.frames
        tail = [to_uint8_frames(tail_frames)] if tail_frames.shape[2] else []
        stored = np.concatenate([*tail, *settled] if not forward else [*settled, *tail])
        expected = to_uint8_frames(full.frames)
        assert np.array_equal(stored, expected) and video.frames == len(expected)
        # only the blending tail stays in memory, as the decoder's floats (blends need them unrounded)
        assert tail_frames.shape[2] <= 4 * ws - 3 and tail_frames.dtype == torch.float32
        torch.testing.assert_close(
            tail_frames,
            full.frames[:, :, : tail_frames.shape[2]]
            if not forward
            else full.frames[:, :, len(expected) - tail_frames.shape[2] :],
            rtol=0,
            atol=0,
        )
        video.write(tmp_path / "x.mp4", {})
        assert read_video(tmp_path / "x.mp4")[0].shape[0] == len(expected)
    assert np.array_equal(video.all_frames(), to_uint8_frames(full.frames))


def test_the_commit_keeps_the_blending_tail_as_floats(tmp_path):
    """A resume blends the next section into the tail exactly as the uninterrupted run would: the
    commit stores the decoder's floats (out of range too), in the blend dtype, and only the last
    section's tail file stays."""
    ws = 3
    bank = torch.randn(1, 16, 2 * ws + 1, 2, 4, generator=torch.Generator().manual_seed(0))
    job = JobDir(tmp_path / "x.job")

    def loud(latents):  # a decoder that leaves [-1, 1]
        return 1.5 * causal_decode(latents) / causal_decode(latents).abs().amax()

    video = SegmentedVideo(job, IncrementalDecoder(loud, ws, torch.float16), True, 30, 16, False)
    rng = torch.Generator().get_state()
    for number, lo in enumerate((ws + 1, 0)):
        video.update(bank, lo, 2 * ws + 1, number, final=False)
        job.commit_section(number, bank[:, :, :1], video.state(number, rng, 0.0))
    tail = video.decoder.frames
    assert tail.abs().max() > 1 and tail.shape[2] == 4 * ws - 3
    _, state = job.load_sections([0, 1])
    assert state.tail.dtype == torch.float16 and torch.equal(state.tail.float(), tail)
    assert sorted(p.name for p in (job.root / "segments").glob("*.tail.safetensors")) == [
        "0001.tail.safetensors"
    ]
    resumed = SegmentedVideo(job, IncrementalDecoder(loud, ws, torch.float16), True, 30, 16, False)
    resumed.restore(state)
    assert torch.equal(resumed.decoder.frames, tail)


def _pngs(folder: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p)) for p in sorted(folder.glob("frame_*.png"))])


def test_cancelled_run_resumes_to_the_uninterrupted_video(tmp_path, image):
    bundle = tiny_bundle()
    settings = GenerationSettings(
        prompt="a cat walks", sections=3, steps=1, order="forward", name="a", png=True
    )
    ref = open_run(bundle, Request(settings, image)).run(tmp_path / "ref")
    assert not (tmp_path / "ref" / "a.job").exists()  # removed once the outputs are written

    done = []
    record = lambda e: done.append(e) if isinstance(e, SectionDone) else None  # noqa: E731
    with pytest.raises(Cancelled):
        open_run(bundle, Request(settings, image)).run(
            tmp_path / "run", cancel=lambda: len(done) >= 1, on_event=record
        )
    job = tmp_path / "run" / "a.job"
    assert find_job(tmp_path / "run" / "a.mp4") == job
    assert read_video(tmp_path / "run" / "a.mp4")[0].shape[0] == done[0].frames
    assert json.loads((job / "job.json").read_text())["settings"]["sections"] == 3

    prepared = resume_job(bundle, job)[0]
    events = list(Run(bundle, prepared, job_dir=job).events("ignored"))
    first = next(e for e in events if isinstance(e, SectionDone))
    assert first.section == 0 and first.frames == done[0].frames  # the restored state, reported first
    assert sum(isinstance(e, SectionDone) for e in events) == 3
    assert np.array_equal(read_video(tmp_path / "run" / "a.mp4")[0], read_video(ref.video)[0])
    assert np.array_equal(_pngs(tmp_path / "run" / "a_frames"), _pngs(tmp_path / "ref" / "a_frames"))
    assert json.loads((tmp_path / "run" / "a.json").read_text())["settings"] == json.loads(
        json.dumps(settings.to_dict())
    )
    assert not job.exists()


def test_same_settings_resume_other_settings_refused(tmp_path, image):
    bundle = tiny_bundle()
    settings = GenerationSettings(prompt="a cat", sections=2, steps=1, name="b")
    with pytest.raises(Cancelled):
        open_run(bundle, Request(settings, image)).run(tmp_path, cancel=lambda: True)
    other = GenerationSettings(prompt="a dog", sections=2, steps=1, name="b")
    with pytest.raises(JobError, match="other settings"):
        open_run(bundle, Request(other, image)).run(tmp_path)
    with pytest.raises(JobError, match="another start image"):
        open_run(bundle, Request(settings, 255 - image)).run(tmp_path)
    assert (tmp_path / "b.job" / "job.json").is_file()  # the unfinished job is left alone
    with pytest.raises(JobError, match="not an unfinished job"):
        find_job(tmp_path / "nothing-here")


def test_resume_of_a_non_job_is_one_sentence(tmp_path, capsys):
    assert main(["generate", "--resume", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not an unfinished job directory" in err[0]


def _wait_for(path: Path, predicate, timeout: float, proc) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:  # the run probes the file before writing it (`--events` checked before loading)
            lines = path.read_text().splitlines()
        except FileNotFoundError:
            lines = []
        events = []
        for line in lines:
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:  # the line being written
                break
        if predicate(events):
            return events
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early: {proc.stderr.read()}")
        time.sleep(0.05)
    raise AssertionError("timed out waiting for the run")


def test_kill_9_mid_section_then_resume_equals_uninterrupted(tmp_path, image, capsys):
    """kill -9 in the middle of the second section: the first section's video plays, and
    `--resume` finishes a video equal (frame for frame, raw and decoded) to an uninterrupted run."""
    model = str(tiny_bundle_dir())
    Image.fromarray(image).save(tmp_path / "start.png")
    args = ["generate", "--model", model, "--image", str(tmp_path / "start.png"), "--prompt", "a cat walks",
            "--sections", "3", "--steps", "2", "--name", "clip", "--png"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "ref")]) == 0
    capsys.readouterr()

    events = tmp_path / "events.jsonl"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "framepack", *args, "--out", str(tmp_path / "run"), "--events", str(events)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = _wait_for(  # the first section is committed and the second one is sampling
            events,
            lambda ev: any(e["event"] == "step" and e["section"] == 1 for e in ev),
            240,
            proc,
        )
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    first = next(e for e in seen if e["event"] == "section")
    job = tmp_path / "run" / "clip.job"
    assert not (tmp_path / "run" / "clip.json").exists()  # not finished
    frames, _, _ = read_video(tmp_path / "run" / "clip.mp4")  # playable: PyAV decodes all of it
    assert first["frames"] == 4 * WS - 3
    # Killed while sampling the second section (or, on a slow machine, while writing it).
    assert frames.shape[0] in (4 * WS - 3, 4 * 2 * WS - 3)
    assert (job / "sections" / "0000.safetensors").is_file()

    assert main(["generate", "--resume", str(job)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "run" / "clip.mp4")
    resumed, ref = read_video(tmp_path / "run" / "clip.mp4")[0], read_video(tmp_path / "ref" / "clip.mp4")[0]
    assert resumed.shape[0] == 4 * (3 * WS + 1) - 3 and np.array_equal(resumed, ref)
    assert np.array_equal(_pngs(tmp_path / "run" / "clip_frames"), _pngs(tmp_path / "ref" / "clip_frames"))
    assert not job.exists()


def test_ctrl_c_while_sampling_is_one_sentence_exit_130_and_resumes(tmp_path):
    """SIGINT in the middle of a section's sampling (the sampler runs in a worker thread): one
    sentence naming the video so far and the resume command, exit status 130, no abort from a
    sampling thread left running at shutdown; `--resume` then finishes the video."""
    example = Path(__file__).resolve().parent.parent / "framepack" / "demo_model" / "examples"
    image = next(iter(sorted(example.glob("*.png"))))
    events = tmp_path / "events.jsonl"
    cmd = [sys.executable, "-m", "framepack", "generate", "--image", str(image), "--prompt",
           "a red circle moves right on a blue background", "--seconds", "2.4", "--steps", "40",
           "--out", str(tmp_path), "--name", "clip", "--events", str(events)]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(events, lambda ev: any(e["event"] == "step" and e["section"] == 1 for e in ev), 240, proc)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    lines = [
        x for x in err.replace("\r", "\n").splitlines() if x.strip() and "step/s" not in x and "it/s" not in x
    ]
    assert proc.returncode == 130, err[-2000:]
    assert "terminate called" not in err and "Traceback" not in err, err[-2000:]
    job = tmp_path / "clip.job"
    assert lines[-1] == (
        f"framepack: interrupted; the video so far is {tmp_path / 'clip.mp4'}; "
        f"continue with framepack generate --resume {job}."
    ), lines[-3:]
    assert main(["generate", "--resume", str(job)]) == 0
    assert read_video(tmp_path / "clip.mp4")[0].shape[0] == 4 * (2 * WS + 1) - 3
