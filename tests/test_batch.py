"""`framepack batch`: parsing jobs files, reruns skip finished jobs, and two torchrun processes
split the jobs with none done twice."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from framepack.cli.main import main
from framepack.io import read_video, write_mp4
from framepack.pipeline.batch import is_finished, read_jobs, shard
from framepack.testing import tiny_bundle_dir

WS = 9


@pytest.fixture(scope="module")
def start(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("images") / "start.png"
    img = np.zeros((64, 64, 3), np.uint8)
    img[8:40, 16:48] = (220, 120, 20)
    Image.fromarray(img).save(path)
    return str(path)


def write_jobs(path, jobs: list[dict]) -> str:
    path.write_text("\n".join(json.dumps(j) for j in jobs) + "\n\n")  # a trailing blank line is fine
    return str(path)


def test_paths_are_relative_to_the_jobs_file(tmp_path, monkeypatch):
    folder = tmp_path / "project"
    (folder / "bundle").mkdir(parents=True)
    jobs = read_jobs(write_jobs(folder / "jobs.jsonl", [
        {"prompt": "a", "image": "in/start.png", "end_image": "/abs/end.png", "model": "bundle",
         "keyframes": [[1.0, "key.png"]], "loras": ["style.safetensors:0.5"]},
        {"prompt": "b", "video": "clip.mp4", "model": "some/repo"},
    ]))  # fmt: skip
    monkeypatch.chdir(tmp_path)  # the current folder does not matter
    base = folder.resolve()
    s = jobs[0].settings
    assert s.image == str(base / "in/start.png") and s.end_image == "/abs/end.png"
    assert s.keyframes == ((1.0, str(base / "key.png")),) and s.loras == (
        (str(base / "style.safetensors"), 0.5),
    )
    assert jobs[0].model == str(base / "bundle")
    assert jobs[1].video == str(base / "clip.mp4") and jobs[1].model == "some/repo"  # a repo id stays


def test_reading_jobs(tmp_path):
    jobs = read_jobs(write_jobs(tmp_path / "a.jsonl", [
        {"prompt": "a cat", "seed": 1},
        {"prompt": "a dog", "name": "dog", "loras": ["x.safetensors:0.5", ["y.safetensors", 2]]},
        {"prompt": "a pose", "one_frame": 9, "one_frame_groups": ["k4"], "model": "other"},
        {"prompt": "more", "video": "clip.mp4"},
    ]))  # fmt: skip
    assert [j.index for j in jobs] == [0, 1, 2, 3] and jobs[1].name == "dog"
    assert jobs[0].name.startswith("job0000-") and read_jobs(tmp_path / "a.jsonl")[0].name == jobs[0].name
    here = tmp_path.resolve()
    assert jobs[1].settings.loras == ((str(here / "x.safetensors"), 0.5), (str(here / "y.safetensors"), 2))
    assert jobs[2].one_frame == 9 and jobs[2].one_frame_groups == ("k4",) and jobs[2].model == "other"
    assert jobs[3].video == str(here / "clip.mp4") and jobs[3].one_frame is None
    assert [j.index for j in shard(jobs, 1, 2)] == [1, 3] and [j.index for j in shard(jobs, 0, 2)] == [0, 2]

    bad = {
        "{not json": "not valid JSON",
        "[1, 2]": "JSON object",
        '{"prompt": "a", "colour": 3}': "unknown key 'colour'",
        '{"seed": 3}': "no prompt",
        '{"prompt": "a", "steps": "many"}': "steps has the wrong type",
        '{"prompt": "a", "gif": 1}': "gif has the wrong type",
        '{"prompt": "a", "name": "../x"}': "plain file name",
        '{"prompt": "a", "one_frame": "9"}': "one_frame",
        '{"prompt": "a", "video": "v.mp4", "one_frame": 9}': "not a one-frame job",
    }
    for text, needle in bad.items():
        (tmp_path / "bad.jsonl").write_text('{"prompt": "fine"}\n' + text + "\n")
        with pytest.raises(ValueError, match=re.escape(needle)) as e:
            read_jobs(tmp_path / "bad.jsonl")
        assert "line 2" in str(e.value)
    (tmp_path / "dup.jsonl").write_text('{"prompt": "a", "name": "x"}\n{"prompt": "b", "name": "x"}\n')
    with pytest.raises(ValueError, match="already used on line 1"):
        read_jobs(tmp_path / "dup.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no jobs"):
        read_jobs(tmp_path / "empty.jsonl")


def _lines(out: str, kind: str) -> list[str]:
    return [line.split()[1] for line in out.splitlines() if line.startswith(kind + " ")]


def test_batch_runs_reruns_skip_finished_jobs(tmp_path, start, capsys):
    common = {"image": start, "sections": 1, "steps": 1}
    video = str(tmp_path / "clip.mp4")
    write_mp4(np.full((13, 64, 64, 3), 100, np.uint8), video, fps=20)
    path = write_jobs(tmp_path / "jobs.jsonl", [
        {"prompt": "a cat", "seed": 1, "name": "cat", **common},
        {"prompt": "a dog", "seed": 2, **common},
        {"prompt": "a cat waves", "one_frame": 5, "name": "wave", **common},
        {"prompt": "broken", "steps": 0, "name": "broken", "image": start},
        {"prompt": "more", "video": video, "model": str(tiny_bundle_dir("forward")), "window": 3, "sections": 1,
         "steps": 1, "name": "longer"},
    ])  # fmt: skip
    out = str(tmp_path / "out")
    args = ["batch", path, "--model", str(tiny_bundle_dir()), "--out", out, "--device", "cpu"]
    assert main(args) == 2  # the broken job fails, the others run
    captured = capsys.readouterr()
    jobs = read_jobs(path)
    assert _lines(captured.out, "done") == [j.name for j in jobs[:3]] + ["longer"]
    assert "job broken (line 4)" in captured.err and "1 of 5 jobs failed" in captured.err
    assert read_video(tmp_path / "out" / "longer.mp4")[0].shape[0] == 13 + 4 * 3  # the extended video
    assert read_video(tmp_path / "out" / "cat.mp4")[0].shape[0] == 4 * (WS + 1) - 3
    assert (tmp_path / "out" / "wave.png").is_file() and is_finished(jobs[2], out)
    assert not is_finished(jobs[3], out)

    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}
    (tmp_path / "out" / "cat.json").unlink()  # as if stopped before the end: runs again
    assert main(args) == 2
    captured = capsys.readouterr()
    assert _lines(captured.out, "done") == ["cat"]
    assert _lines(captured.out, "skipped") == [jobs[1].name, "wave", "longer"]
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}
    assert all(after[n] == t for n, t in before.items() if not n.startswith("cat"))
    assert main([*args, "--list"]) == 0
    states = capsys.readouterr().out.splitlines()
    assert len(states) == 5 and states[3].startswith("broken (line 4") and states[3].endswith("to do")
    assert sum(line.endswith("finished") for line in states) == 4


def test_batch_without_a_model_uses_the_demo_model(tmp_path, capsys):
    """As `framepack generate`: a job that names no model, without --model, runs on the shipped one."""
    example = sorted(
        (Path(__file__).resolve().parents[1] / "framepack" / "demo_model" / "examples").glob("*.png")
    )[0]
    path = write_jobs(tmp_path / "jobs.jsonl", [{"prompt": "a red circle moves right", "image": str(example),
                                                   "sections": 1, "steps": 1, "name": "demo"}])  # fmt: skip
    assert main(["batch", path, "--out", str(tmp_path / "out"), "--device", "cpu"]) == 0, (
        capsys.readouterr().err
    )
    sidecar = json.loads((tmp_path / "out" / "demo.json").read_text())
    assert Path(sidecar["bundle"]).name == "demo_model"


def test_bad_jobs_file_is_one_sentence(tmp_path, capsys):
    (tmp_path / "jobs.jsonl").write_text('{"prompt": "a", "sedd": 3}\n')
    assert main(["batch", str(tmp_path / "jobs.jsonl"), "--out", str(tmp_path / "out")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "unknown key 'sedd'" in err[0] and not (tmp_path / "out").exists()


def test_two_torchrun_processes_split_the_jobs(tmp_path, start):
    jobs = [{"prompt": f"shape {i}", "seed": i, "image": start, "sections": 1, "steps": 1} for i in range(5)]
    path = write_jobs(tmp_path / "jobs.jsonl", jobs)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "framepack", "batch", path, "--model", str(tiny_bundle_dir()), "--out", str(tmp_path / "out"),
           "--device", "cpu"]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    done = re.findall(r"^done (\S+) \S+ \(rank (\d)\)$", run.stdout, flags=re.M)
    names = [j.name for j in read_jobs(path)]
    assert sorted(n for n, _ in done) == sorted(names)  # all done, none twice
    assert {n: int(r) for n, r in done} == {n: i % 2 for i, n in enumerate(names)}  # job i on rank i % 2
    assert all(is_finished(j, tmp_path / "out") for j in read_jobs(path))
