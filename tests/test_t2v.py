"""Text-to-video: no start image, the first section is anchored to the VAE encoding of a plain frame."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from framepack.io import pick_bucket, read_video
from framepack.pipeline.conditioning import vae_encode
from framepack.pipeline.run import Request, open_run
from framepack.pipeline.settings import GenerationSettings, prepare
from framepack.pipeline.text_to_video import neutral_frame, parse_colour
from framepack.testing import tiny_bundle, tiny_bundle_dir

WS = 9


@pytest.fixture(scope="module")
def bundle():
    return tiny_bundle()


def _pixels(frame: np.ndarray) -> torch.Tensor:
    return torch.tensor(frame, dtype=torch.float32).div(127.5).sub(1).permute(2, 0, 1)[None, :, None]


def test_colours():
    assert parse_colour(None) == (128, 128, 128)
    assert parse_colour("red") == (255, 0, 0)
    assert parse_colour("10, 20,30") == (10, 20, 30)
    assert parse_colour("#0a141e") == (10, 20, 30)
    for bad in ("bluish", "300,0,0", ""):
        with pytest.raises(ValueError, match="colour"):
            parse_colour(bad)
    assert neutral_frame("blue", 48, 80).shape == (48, 80, 3)


def test_prepare_without_an_image_uses_a_plain_frame(bundle):
    p = prepare(bundle, GenerationSettings(prompt="a red ball bounces", sections=1))
    assert p.image.shape[:2] == pick_bucket(9, 16, bundle.manifest.resolution)  # landscape by default
    assert (p.image == 128).all()
    p = prepare(
        bundle, GenerationSettings(prompt="a ball", sections=1, t2v_colour="navy", width=64, height=96)
    )
    assert p.image.shape == (96, 64, 3) and (p.image == (0, 0, 128)).all()
    with pytest.raises(ValueError, match="colour"):
        prepare(bundle, GenerationSettings(prompt="a ball", image="x.png", t2v_colour="grey"))


def test_generation_is_anchored_to_the_encoded_plain_frame(bundle, tmp_path):
    model = bundle.transformer
    anchors = []
    forward = model.forward_packed

    def record(noisy, noisy_indices, history, *args):
        anchors.append(history[0].latents[:, :, 0].detach().cpu())  # the k1 group's start latent
        return forward(noisy, noisy_indices, history, *args)

    model.forward_packed = record
    try:
        settings = GenerationSettings(prompt="a ball", sections=2, steps=2, width=80, height=48, name="t2v")
        done = open_run(bundle, Request(settings)).run(tmp_path)
    finally:
        del model.forward_packed
    frames = read_video(done.video)[0]
    assert done.frames == frames.shape[0] == 4 * (WS * 2 + 1) - 3
    assert frames.shape[1:3] == (48, 80)
    with torch.no_grad():
        expected = vae_encode(bundle, _pixels(neutral_frame(None, 48, 80))).float()[:, :, 0]
    assert len(anchors) == 2 * 2  # 2 sections x 2 steps, every call sees the plain start latent
    for anchor in anchors:
        torch.testing.assert_close(anchor, expected)

    again = open_run(bundle, Request(settings.__class__(**{**settings.to_dict(), "name": "again"}))).run(
        tmp_path
    )
    assert np.array_equal(read_video(again.video)[0], frames)  # deterministic
    other = GenerationSettings(
        prompt="a ball", sections=2, steps=2, width=80, height=48, t2v_colour="#204080"
    )
    assert not np.array_equal(read_video(open_run(bundle, Request(other)).run(tmp_path).video)[0], frames)


def _cli(*args, cwd):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "framepack", "generate", "--model", str(tiny_bundle_dir()), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


def test_cli_text_to_video_and_errors(tmp_path):
    r = _cli("--prompt", "a ball", "--sections", "1", "--steps", "1", "--t2v-colour", "teal", "--out", "out",
             cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert read_video(tmp_path / r.stdout.splitlines()[0])[0].shape[0] == 4 * (WS + 1) - 3
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "start.png")
    for extra in (["--t2v-colour", "bluish"], ["--t2v-colour", "grey", "--image", "start.png"]):
        r = _cli("--prompt", "a ball", "--out", "bad", *extra, cwd=tmp_path)
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert r.returncode == 2 and len(lines) == 1 and "colour" in lines[0], r.stderr
        assert not (tmp_path / "bad").exists()
