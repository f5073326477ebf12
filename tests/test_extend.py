"""Video extension: the new sections continue the source; the output starts with the source's
frames (up to codec loss), keeps its fps, and has the source's frames plus 4 * ws per section."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from framepack.io import read_video, write_mp4
from framepack.pipeline.events import Finished
from framepack.pipeline.extend import load_source, prepare_extension
from framepack.pipeline.run import Run
from framepack.pipeline.settings import GenerationSettings
from framepack.testing import tiny_bundle, tiny_bundle_dir

WS = 3  # a small window: a short blend and fast sections
SOURCE_FRAMES = 45


@pytest.fixture(scope="module")
def bundle():
    return tiny_bundle("forward")


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> str:
    """A square crossing a 64x64 frame, 45 frames at 24 fps."""
    frames = np.zeros((SOURCE_FRAMES, 64, 64, 3), np.uint8)
    frames[:] = (40, 60, 90)
    for t in range(SOURCE_FRAMES):
        frames[t, 20:40, t : t + 16] = (230, 200, 40)
    path = tmp_path_factory.mktemp("source") / "clip.mp4"
    write_mp4(frames, path, fps=24)
    return str(path)


def _extend(bundle, source, out, **kw):
    settings = GenerationSettings(prompt="the square keeps moving", steps=2, window=WS, name="ext", **kw)
    prepared, src = prepare_extension(bundle, settings, source)
    events = list(Run(bundle, prepared, src).events(out))
    assert isinstance(events[-1], Finished)
    return events, src


def test_extension_keeps_the_source_and_adds_sections(bundle, source, tmp_path):
    history = []
    model = bundle.transformer
    forward = model.forward_packed

    def record(noisy, noisy_indices, packed, *args):
        history.append([g.latents.clone() for g in packed])
        return forward(noisy, noisy_indices, packed, *args)

    model.forward_packed = record
    try:
        events, src = _extend(bundle, source, tmp_path, sections=2)
    finally:
        del model.forward_packed
    done = events[-1]
    frames, fps, _ = read_video(done.video)
    assert fps == pytest.approx(24) and done.frames == frames.shape[0] == SOURCE_FRAMES + 2 * 4 * WS
    assert frames.shape[1:3] == src.frames.shape[1:3]
    kept = SOURCE_FRAMES - (4 * WS - 3)  # before the overlap blend, the frames are the source's
    diff = np.abs(frames[:kept].astype(int) - src.frames[:kept].astype(int))
    assert diff.mean() < 2.0, diff.mean()
    assert not np.array_equal(
        frames[SOURCE_FRAMES:], np.repeat(frames[SOURCE_FRAMES - 1 : SOURCE_FRAMES], 24, 0)
    )

    # The first section's history is the source: its k1 group holds the start and the last source latent.
    from framepack.pipeline.conditioning import vae_encode
    from framepack.pipeline.decode import from_uint8_frames

    with torch.no_grad():
        tail = vae_encode(bundle, from_uint8_frames(src.frames[SOURCE_FRAMES - (4 * 12 - 3) :])).float()
        start = vae_encode(bundle, from_uint8_frames(src.frames[:1])).float()
    k1 = history[0][0].cpu()
    torch.testing.assert_close(k1[:, :, 0], start[:, :, 0])
    torch.testing.assert_close(k1[:, :, 1], tail[:, :, -1])
    info = json.loads(done.sidecar.read_text())
    assert info["extension"]["source_frames"] == SOURCE_FRAMES and info["frames"] == done.frames


def test_leading_into_a_video(source, tmp_path):
    """The inverted order: new sections from a start image towards the video, then the video."""
    bundle = tiny_bundle()
    image = np.full((64, 64, 3), 200, np.uint8)
    start_path = tmp_path / "start.png"
    from PIL import Image

    Image.fromarray(image).save(start_path)
    history = []
    model = bundle.transformer
    forward = model.forward_packed

    def record(noisy, noisy_indices, packed, *args):
        history.append(packed[0].latents.clone())
        return forward(noisy, noisy_indices, packed, *args)

    model.forward_packed = record
    try:
        events, src = _extend(bundle, source, tmp_path, sections=2, image=str(start_path))
    finally:
        del model.forward_packed
    done = events[-1]
    frames, fps, _ = read_video(done.video)
    # The start latent is one frame, each new latent four, then the source's frames: its first
    # latent, decoded after the new ones, stays one frame (the decoder's fourth of it).
    assert fps == pytest.approx(24) and done.frames == frames.shape[0] == SOURCE_FRAMES + 2 * 4 * WS + 1
    kept = SOURCE_FRAMES - (4 * WS - 3)  # after the overlap blend, the frames are the source's
    diff = np.abs(frames[-kept:].astype(int) - src.frames[-kept:].astype(int))
    assert diff.mean() < 2.0, diff.mean()

    from framepack.pipeline.conditioning import vae_encode
    from framepack.pipeline.decode import from_uint8_frames

    with torch.no_grad():
        head = vae_encode(bundle, from_uint8_frames(src.frames[: 4 * 12 - 3])).float()
        start = vae_encode(bundle, from_uint8_frames(image[None])).float()
    k1 = history[0].cpu()  # the first section made (the last in time) leads into the source
    torch.testing.assert_close(k1[:, :, 0], start[:, :, 0])
    torch.testing.assert_close(k1[:, :, 1], head[:, :, 0])


def test_extension_errors(bundle, source, tmp_path):
    with pytest.raises(ValueError, match="needs a start image"):
        prepare_extension(tiny_bundle(), GenerationSettings(prompt="a", sections=1), source)
    with pytest.raises(ValueError, match="forward order"):
        prepare_extension(tiny_bundle(), GenerationSettings(prompt="a", order="anti-drifting"), source)
    with pytest.raises(ValueError, match="drop the start"):
        prepare_extension(bundle, GenerationSettings(prompt="a", image="x.png"), source)
    with pytest.raises(ValueError, match="missing.mp4"):
        prepare_extension(bundle, GenerationSettings(prompt="a"), tmp_path / "missing.mp4")
    src = load_source(source, 64, 48, 32)
    assert src.frames.shape == (SOURCE_FRAMES, 32, 48, 3)


def test_cli_extends_a_video(source, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "framepack", "generate", "--model", str(tiny_bundle_dir("forward")), "--video",
           source, "--prompt", "more", "--sections", "1", "--steps", "1", "--window", str(WS), "--out", "out"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert read_video(tmp_path / r.stdout.splitlines()[0])[0].shape[0] == SOURCE_FRAMES + 4 * WS
    r = subprocess.run(
        [*cmd, "--image", source], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120
    )
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "drop the start" in lines[0], r.stderr
