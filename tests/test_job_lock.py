"""The lock on a running job directory: while another process runs a job, a second run of it (CLI
`--resume`, the same command again, the API, `Run.events`, the GUI) is refused with one
sentence naming that process, and the GUI does not list it; after a kill -9 of that process the job
resumes to the uninterrupted video."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import framepack
from framepack.cli.main import main
from framepack.gui.jobs import FAILED, QUEUED, JobQueue
from framepack.gui.resume import unfinished_jobs
from framepack.io import read_video
from framepack.pipeline.joblock import JobLock
from framepack.pipeline.jobs import JobError
from framepack.pipeline.run import Run, resume_job
from framepack.testing import tiny_bundle, tiny_bundle_dir

# `framepack generate ...` that pauses, its job's lock held, once it has committed its first section.
HOLDER = """
import sys, time
from framepack.cli.main import main
from framepack.pipeline.video_output import VideoOutput
commit = VideoOutput.commit
def paused(self, *args):
    done = commit(self, *args)
    print("section", flush=True)
    time.sleep(600)
VideoOutput.commit = paused
main(sys.argv[1:])
"""


def test_lock_is_exclusive_and_probed_without_taking_it(tmp_path):
    first, second = JobLock(tmp_path), JobLock(tmp_path)
    assert first.holder() is None and first.acquire() is None
    assert JobLock(tmp_path).holder() == os.getpid()  # another open file sees it, with the pid
    assert second.acquire(patience=0.05) == os.getpid()
    first.release()
    assert second.holder() is None and second.acquire() is None
    second.release()
    assert JobLock(tmp_path / "missing").holder() is None


def test_running_job_is_refused_then_resumes_after_kill_9(tmp_path, capsys):
    model = str(tiny_bundle_dir())
    image = np.zeros((64, 96, 3), np.uint8)
    image[16:48, 24:56] = (200, 40, 90)
    Image.fromarray(image).save(tmp_path / "start.png")
    args = ["generate", "--model", model, "--image", str(tmp_path / "start.png"), "--prompt", "a cat walks",
            "--sections", "3", "--steps", "2", "--name", "clip"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "ref")]) == 0
    capsys.readouterr()

    run = tmp_path / "run"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-c", HOLDER, *args, "--out", str(run)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    bundle = tiny_bundle()
    try:
        assert proc.stdout.readline().strip() == "section", proc.stderr.read()
        job = run / "clip.job"
        taken = f"the job {job} is being run by another process (pid {proc.pid})."

        assert main(["generate", "--resume", str(job)]) == 2  # refused before loading anything
        assert capsys.readouterr().err.strip().splitlines() == [f"framepack: {taken}"]
        assert main([*args, "--out", str(run)]) == 2  # the same command again: refused by the run's own lock
        assert capsys.readouterr().err.strip().splitlines()[-1] == f"framepack: {taken}"
        with pytest.raises(JobError, match=f"^{taken}$".replace("(", r"\(").replace(")", r"\)")):
            framepack.generate(resume=job)
        with pytest.raises(JobError, match="being run by another process"):
            list(Run(bundle, resume_job(bundle, job)[0], job_dir=job).events("ignored"))

        assert unfinished_jobs(run, bundle.manifest) == []  # the GUI leaves it out
        queue = JobQueue(bundle, run, start=False)
        refused = queue.resume(job)
        assert refused.state == FAILED and refused.error == taken
        assert (job / "sections" / "0000.safetensors").is_file() and not (
            job / "sections" / "0001.safetensors"
        ).exists()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()

    (listed,) = unfinished_jobs(run, bundle.manifest)  # the lock died with its process
    assert listed.path == job and listed.sections_done == 1
    assert queue.resume(job).state == QUEUED  # (this queue never starts; the CLI finishes it)
    queue.close()
    assert main(["generate", "--resume", str(job)]) == 0
    assert capsys.readouterr().out.strip() == str(run / "clip.mp4")
    assert np.array_equal(read_video(run / "clip.mp4")[0], read_video(tmp_path / "ref" / "clip.mp4")[0])
    assert not job.exists()
