"""Default output names (issue 18): two runs started together into one folder without a name get
two names, the job directory's (or the PNG's) creation being the claim; a job that a live run
holds is refused naming that run's pid, never with "delete it"."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from contextlib import ExitStack

import pytest
from PIL import Image

from framepack.pipeline.joblock import JobLock
from framepack.pipeline.jobs import JobError, open_job
from framepack.pipeline.output_names import default_stem
from framepack.pipeline.run import Request, open_run
from framepack.pipeline.settings import GenerationSettings
from framepack.testing import tiny_bundle_dir

SAME_SECOND = "20250101-120000"


@pytest.fixture
def one_second(monkeypatch):
    """Every run starts in the same second."""
    real = time.strftime
    monkeypatch.setattr(time, "strftime", lambda fmt, *t: real(fmt.replace("%Y%m%d-%H%M%S", SAME_SECOND), *t))


def test_runs_in_the_same_second_get_their_own_job_directories(tmp_path, one_second):
    base = f"framepack_{SAME_SECOND}_31337"
    same = GenerationSettings(prompt="a cat")
    with ExitStack() as held:
        first = held.enter_context(open_job(tmp_path, None, same, None, "inverted"))
        second = held.enter_context(open_job(tmp_path, None, same, None, "inverted"))
        other = held.enter_context(
            open_job(tmp_path, None, GenerationSettings(prompt="a dog"), None, "inverted")
        )
        assert [j.root.name for j in (first, second, other)] == [
            f"{base}.job",
            f"{base}-2.job",
            f"{base}-3.job",
        ]
        assert [j.name for j in (first, second, other)] == [base, f"{base}-2", f"{base}-3"]
    for job in (first, second, other):  # finished: the job directories go, a video keeps its name
        job.remove()
    (tmp_path / f"{base}.mp4").write_bytes(b"")
    with open_job(tmp_path, None, same, None, "inverted") as later:
        assert later.name == base + "-2"


def test_a_job_a_live_run_holds_is_refused_with_its_pid(tmp_path):
    with open_job(tmp_path, None, GenerationSettings(prompt="a cat", name="clip"), None, "inverted") as job:
        with pytest.raises(JobError) as refused:
            with open_job(tmp_path, None, GenerationSettings(prompt="a dog", name="clip"), None, "inverted"):
                pass
    assert str(refused.value) == f"the job {job.root} is being run by another process (pid {os.getpid()})."


def test_one_frame_runs_in_the_same_second_write_two_pngs(tmp_path, one_second, bundle, image):
    settings = GenerationSettings(prompt="a cat waves", steps=1)
    done = [open_run(bundle, Request(settings, image, one_frame=5)).run(tmp_path) for _ in range(2)]
    base = f"framepack_frame_{SAME_SECOND}_31337"
    assert [d.image.name for d in done] == [f"{base}.png", f"{base}-2.png"]
    assert [d.sidecar.name for d in done] == [f"{base}.json", f"{base}-2.json"]


def test_two_cli_runs_started_together_into_one_folder_both_finish(tmp_path, image):
    """Real processes, started together without --name. So that they meet whatever the machine's
    speed, every default name of the next two minutes is already a job that this process runs
    (with other settings): each run takes a free name of its own and finishes."""
    out = tmp_path / "out"
    Image.fromarray(image).save(tmp_path / "start.png")
    now = time.time()
    with ExitStack() as held:
        for second in range(-2, 120):
            root = out / f"{default_stem(31337, when=now + second)}.job"
            root.mkdir(parents=True, exist_ok=True)
            (root / "job.json").write_text(json.dumps({"version": 1, "name": root.stem, "settings": {}}))
            lock = JobLock(root)
            assert lock.acquire() is None
            held.callback(lock.release)
        cmd = [sys.executable, "-m", "framepack", "generate", "--model", str(tiny_bundle_dir()), "--image",
               "start.png", "--prompt", "a cat", "--sections", "1", "--steps", "1", "--out", "out"]  # fmt: skip
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        runs = [
            subprocess.Popen(
                cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            for _ in range(2)
        ]
        results = [(p.communicate(timeout=300), p.returncode) for p in runs]
    for (_, err), code in results:
        assert code == 0, err[-2000:]
    videos = [tmp_path / stdout.strip() for (stdout, _), _ in results]
    assert videos[0] != videos[1] and all(v.is_file() and v.stem.endswith(("-2", "-3")) for v in videos)
    assert not [p for p in out.glob("*.job") if not (p / "job.json").is_file()]  # no stray job folder
