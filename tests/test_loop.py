"""Seamless loops: the start image is also the end image, and the seam is measured into the sidecar."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from framepack.pipeline.loop import loop_seam
from framepack.pipeline.run import Request, open_run
from framepack.pipeline.settings import GenerationSettings, prepare
from framepack.testing import tiny_bundle_dir


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    img = np.full((64, 64, 3), 60, np.uint8)
    img[20:44, 20:44] = (240, 180, 30)
    return img


def test_seam_measure():
    t = np.arange(12)
    cyclic = (10 * np.minimum(t, 12 - t))[:, None, None, None] * np.ones((1, 4, 4, 3))  # a triangle wave
    ramp = (20 * t)[:, None, None, None] * np.ones((1, 4, 4, 3))
    good, bad = loop_seam(cyclic.astype(np.uint8)), loop_seam(ramp.astype(np.uint8))
    assert (
        good == {"seam": 10, "typical_step": 10, "ratio": 1}
        and bad["seam"] == 220
        and bad["typical_step"] == 20
        and bad["ratio"] == 11
    )


def test_a_loop_ends_on_its_start_frame(bundle, image, tmp_path):
    calls = []
    model = bundle.transformer
    forward = model.forward_packed

    def record(noisy, noisy_indices, history, *args):
        calls.append(history[0].latents.detach().cpu())  # k1: [start, nearest history latent]
        return forward(noisy, noisy_indices, history, *args)

    model.forward_packed = record
    try:
        settings = GenerationSettings(prompt="a spinning top", sections=2, steps=1, loop=True, name="loop")
        done = open_run(bundle, Request(settings, image)).run(tmp_path)
    finally:
        del model.forward_packed
    first = calls[0]  # the last section (generated first) continues into the end frame: the start
    torch.testing.assert_close(first[:, :, 1], first[:, :, 0])
    seam = json.loads(done.sidecar.read_text())["loop_seam"]
    assert seam == done.info["loop_seam"] and set(seam) == {"seam", "typical_step", "ratio"}

    with pytest.raises(ValueError, match="drop the end image"):
        prepare(bundle, GenerationSettings(prompt="a", loop=True, end_image="end.png"), image=image)
    with pytest.raises(ValueError, match="forward order"):
        prepare(bundle, GenerationSettings(prompt="a", loop=True, order="forward"), image=image)


def test_cli_loop(image, tmp_path):
    Image.fromarray(image).save(tmp_path / "start.png")
    cmd = [sys.executable, "-m", "framepack", "generate", "--model", str(tiny_bundle_dir()), "--image", "start.png",
           "--prompt", "a top", "--sections", "1", "--steps", "1", "--loop", "--name", "l", "--out", "out"]  # fmt: skip
    r = subprocess.run(
        cmd, capture_output=True, text=True, cwd=tmp_path, env=dict(os.environ, HF_HUB_OFFLINE="1")
    )
    assert r.returncode == 0, r.stderr
    assert "loop_seam" in json.loads((tmp_path / "out" / "l.json").read_text())
