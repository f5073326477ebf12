"""Resuming from the GUI's job queue: a job cancelled in its second section is listed as unfinished
and `JobQueue.resume` finishes it to the uninterrupted video; bad job directories fail as jobs with
one sentence; a cancel after the last sampling step ends the job done."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from framepack.gui.jobs import CANCELLED, DONE, FAILED, QUEUED, JobQueue
from framepack.gui.resume import unfinished_jobs
from framepack.gui.view import job_label, progress_html, progress_text, queue_html
from framepack.io import read_video
from framepack.pipeline.events import StepEvent
from framepack.pipeline.settings import GenerationSettings

WS = 9


def _settings(**kw) -> GenerationSettings:
    return GenerationSettings(**{"prompt": "a dog runs", "sections": 3, "steps": 3, "seed": 5, **kw})


def _cancel_at(queue, monkeypatch, section: int, step: int) -> None:
    """Cancel the running job, once, right after the worker applies step `step` of section
    `section` (-1: the last)."""
    apply, fired = queue._apply, []

    def applying(job, event):
        apply(job, event)
        last = (event.sections - 1, event.steps - 1) if isinstance(event, StepEvent) else None
        wanted = (last[0] if section < 0 else section, last[1] if step < 0 else step) if last else None
        if last and (event.section, event.step) == wanted and not fired:
            fired.append(queue.cancel(job.id))

    monkeypatch.setattr(queue, "_apply", applying)


def test_job_cancelled_in_section_2_resumes_to_the_uninterrupted_video(queue, bundle, image, monkeypatch):
    ref = queue.wait(queue.submit(_settings(name="ref"), image=image).id, 120)
    assert ref.state == DONE, ref.error

    _cancel_at(queue, monkeypatch, section=1, step=0)
    run = queue.wait(queue.submit(_settings(name="run"), image=image).id, 120)
    assert run.state == CANCELLED and 1 <= run.sections_done < 3, (run.state, run.sections_done)
    job_dir = queue.out_dir / "run.job"
    (listed,) = unfinished_jobs(queue.out_dir, bundle.manifest, queue.job_dirs())
    assert (listed.path, listed.prompt, listed.sections) == (job_dir, "a dog runs", 3)
    assert (
        listed.sections_done == run.sections_done
        and f"a dog runs · {run.sections_done}/3 sections done · run" in listed.label
    )

    # A second queue (not started) holds it: it is not listed, and not queued twice.
    other = JobQueue(bundle, queue.out_dir, start=False)
    assert other.resume(job_dir).state == QUEUED
    assert unfinished_jobs(queue.out_dir, bundle.manifest, other.job_dirs()) == []
    twice = other.resume(queue.out_dir / "run.mp4")  # the mp4 names the job too
    assert twice.state == FAILED and twice.error == "the job run.job is already queued or running."
    other.close()

    job = queue.resume(job_dir)
    assert job.state == QUEUED and job.prompt == "a dog runs" and job.sections == 3, job.error
    job = queue.wait(job.id, 120)
    assert job.state == DONE, job.error
    assert job.sections_done == 3 and job.skipped_steps == 3 * run.sections_done
    assert 'value="9" max="9"' in progress_html(job)
    frames, ref_frames = read_video(job.video)[0], read_video(ref.video)[0]
    assert job.video == queue.out_dir / "run.mp4" and frames.shape[0] == job.frames == 4 * (3 * WS + 1) - 3
    assert np.array_equal(frames, ref_frames)
    assert not job_dir.exists() and unfinished_jobs(queue.out_dir, bundle.manifest) == []


def test_a_resumed_job_reads_as_running_with_its_restored_progress(queue, image, monkeypatch):
    """From the moment it is queued, a resumed job shows the sections its job directory holds; it
    reads as running, then done, never as cancelled; the stopped job it continues points to it."""
    _cancel_at(queue, monkeypatch, section=1, step=0)
    stopped = queue.wait(queue.submit(_settings(name="again"), image=image).id, 120)
    k = stopped.sections_done  # 1, or 2 when the cancel came after the section's last check
    assert stopped.state == CANCELLED and 1 <= k < 3, (stopped.state, k)
    monkeypatch.undo()

    seen, apply = [], queue._apply

    def applying(job, event):
        apply(job, event)
        seen.append((type(event).__name__, job.state, progress_text(job), progress_html(job), job_label(job)))

    monkeypatch.setattr(queue, "_apply", applying)
    job = queue.resume(queue.out_dir / "again.job")
    assert job.state == QUEUED and (job.sections_done, job.restored_sections, job.skipped_steps) == (
        k,
        k,
        3 * k,
    )
    assert progress_text(job, 0) == f"Job #{job.id} is queued (next) to resume after {k}/3 finished sections."
    assert f'value="{3 * k}" max="9"' in progress_html(job) and job_label(job).endswith(
        "a dog runs (resumed)"
    )
    done = queue.wait(job.id, 120)
    assert done.state == DONE, done.error
    # Every event, the restored section's (reported first) and the encoding before it included.
    assert seen[0][0] == "Stage" and any(name == "SectionDone" for name, *_ in seen[:3])
    for name, state, text, shown, label in seen:
        assert state == "running" and "cancel" not in text + shown and label.endswith("(resumed)")
        assert 'data-state="running"' in shown
        done_steps = int(shown.split('value="')[1].split('"')[0])
        assert done_steps >= 3 * k, (name, shown)  # never below the restored sections' steps
    resuming = f"Job #{job.id}: section {k + 1}/3 · resuming after {k}/3 finished sections · encoding"
    assert seen[0][2] == resuming
    assert progress_text(done).startswith(f"Job #{job.id} done in ")
    assert f"(resumed after {k}/3 finished sections): 109 frames" in progress_text(done)
    old = queue.get(stopped.id)
    assert old.resumed_as == job.id and progress_text(old).endswith(f"Resumed as job #{job.id}.")
    assert f"· resumed as #{job.id}</td>" in queue_html(queue.jobs())


def test_bad_job_directories_fail_as_jobs_with_one_sentence(queue, bundle, tmp_path):
    def resume(path) -> str:
        job = queue.resume(path)
        assert job.state == FAILED and "\n" not in job.error and job.error.endswith("."), job.error
        return job.error

    outside = tmp_path / "elsewhere.job"
    outside.mkdir()
    (outside / "job.json").write_text("{}")
    assert resume(outside) == "elsewhere.job is not a job directory in this server's outputs folder."
    assert resume(queue.out_dir / ".." / "elsewhere.job").startswith("elsewhere.job is not a job directory")
    assert (
        resume(queue.out_dir / "ghost.job")
        == "ghost.job is not an unfinished job directory (no job.json in it)."
    )

    queue.out_dir.mkdir(parents=True, exist_ok=True)
    foreign = queue.out_dir / "foreign.job"
    foreign.mkdir()
    settings = json.loads(json.dumps(_settings().to_dict()))
    data = {"version": 1, "name": "foreign", "bundle": str(tmp_path / "big-model"), "order": "inverted"}
    (foreign / "job.json").write_text(json.dumps({**data, "settings": settings}))
    assert resume(foreign) == (
        "the job foreign.job was made with another model (big-model); "
        "resume it with framepack generate --resume foreign.job --model MODEL."
    )
    broken = queue.out_dir / "broken.job"
    broken.mkdir()
    (broken / "job.json").write_text("{not json")
    assert "cannot be read" in resume(broken)
    # Listed (so a person sees them), by name when their settings cannot be read.
    listed = {u.path.name: u for u in unfinished_jobs(queue.out_dir, bundle.manifest)}
    assert sorted(listed) == ["broken.job", "foreign.job"] and listed["broken.job"].prompt == "broken"
    assert listed["foreign.job"].label.endswith("0/3 sections done · foreign")


def test_cancel_after_the_last_sampling_step_ends_the_job_done(queue, image, monkeypatch):
    _cancel_at(queue, monkeypatch, section=-1, step=-1)
    job = queue.wait(queue.submit(_settings(sections=2, name="late"), image=image).id, 120)
    assert job.state == DONE and job.cancel_requested.is_set(), (job.state, job.error)
    assert job.frames == read_video(job.video)[0].shape[0] == 4 * (2 * WS + 1) - 3
    assert job.sidecar.is_file() and not (queue.out_dir / "late.job").exists()


def test_resume_endpoint_finishes_a_job_left_before_the_server_started(tmp_path, image):
    """A job stopped outside the server (the CLI, an earlier server) is resumed through `/resume`,
    which answers as `/generate` does; a folder outside the outputs fails with its one sentence."""
    import framepack
    from framepack.pipeline.events import SectionDone
    from framepack.sampling import Cancelled
    from framepack.testing import tiny_bundle_dir

    pytest.importorskip("gradio_client")
    from gradio_client import Client
    from gradio_client.exceptions import AppError
    from gui_server import Server

    model, settings = tiny_bundle_dir(), dict(prompt="a bird flies", sections=2, steps=2, name="left")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the server runs (OMP_NUM_THREADS=1): sums in the same order
    try:
        ref = framepack.generate(model, tmp_path / "ref", image=image, **settings)
        done = []
        with pytest.raises(Cancelled):
            framepack.generate(
                model,
                tmp_path / "outputs",
                image=image,
                on_event=lambda e: done.append(e) if isinstance(e, SectionDone) else None,
                cancel=lambda: bool(done),
                **settings,
            )
    finally:
        torch.set_num_threads(threads)
    server = Server(model, tmp_path / "outputs")
    try:
        client = Client(server.url, verbose=False, download_files=str(tmp_path / "downloads"))
        job_id, video, info = client.predict(str(tmp_path / "outputs" / "left.mp4"), api_name="/resume")
        assert info["state"] == "done" and info["job"] == job_id and info["video"] == "left.mp4"
        assert np.array_equal(read_video(video)[0], read_video(ref.video)[0])
        with pytest.raises(AppError, match=r"^Job #\d+ failed: ref is not a job directory in this server's"):
            client.predict("../ref", api_name="/resume")
        with pytest.raises(AppError, match=r"failed: ghost.job is not an unfinished job directory"):
            client.predict("ghost.mp4", api_name="/resume")  # a name in the outputs folder
    finally:
        server.close()
