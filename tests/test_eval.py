"""framepack eval: drift measures behave, and the demo checks read motion and colour right."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from framepack.io import write_json_atomic, write_mp4
from framepack.training.evaluate import drift, evaluate_frames, sharpness
from framepack.training.world import render, scene_from_caption


def test_drift_of_constant_and_changing_measures():
    assert drift(np.ones(20)) == 0
    assert drift(np.r_[np.zeros(10), np.ones(10)]) == pytest.approx(1.0)


def test_blur_lowers_sharpness():
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 255, (1, 32, 32, 3)).astype(np.uint8)
    blurred = ((frame[:, :-1, :-1].astype(int) + frame[:, 1:, 1:]) // 2).astype(np.uint8)
    assert sharpness(blurred)[0] < sharpness(frame[:, :-1, :-1])[0]


@pytest.mark.parametrize("motion", ["left", "right", "up", "down"])
def test_demo_checks_on_rendered_world(motion):
    caption = f"a red square moves {motion} on a blue background"
    frames = render(scene_from_caption(caption, seed=1, frames=37), 37, size=64)
    report = evaluate_frames(frames, caption)
    assert report.motion_ok and report.colour_kept and report.measured_motion == motion
    assert report.drift_size < 1e-3  # a moving square keeps its size
    wrong = evaluate_frames(frames[::-1].copy(), caption)  # played backwards: the other way
    assert not wrong.motion_ok


def test_cli_reads_caption_from_sidecar(tmp_path):
    caption = "a yellow circle moves left on a black background"
    frames = render(scene_from_caption(caption, seed=2, frames=37), 37, size=64)
    write_mp4(frames, tmp_path / "v.mp4", fps=30)
    write_json_atomic({"settings": {"prompt": caption}}, tmp_path / "v.json")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    r = subprocess.run(
        [sys.executable, "-m", "framepack", "eval", str(tmp_path / "v.mp4"), "--json"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["videos"][0]["motion_ok"] is True and out["summary"]["motion_ok"] == 1.0
    bad = subprocess.run(
        [sys.executable, "-m", "framepack", "eval", str(tmp_path / "none.mp4")],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
