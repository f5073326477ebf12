"""One-frame inference: one latent at the chosen time index, the start frame as clean history,
the chosen history groups, a PNG + sidecar; and `framepack generate --one-frame`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from framepack.pipeline.conditioning import vae_encode
from framepack.pipeline.decode import from_uint8_frames
from framepack.pipeline.one_frame import check_one_frame
from framepack.pipeline.run import Request, Run, open_run
from framepack.pipeline.settings import GenerationSettings, prepare
from framepack.testing import tiny_bundle_dir

WS = 9


def _frame(bundle, image, tmp_path, calls=None, settings=None, index=None, groups=("post", "k2", "k4")):
    settings = settings or GenerationSettings(prompt="the cat raises a paw", steps=3, name="f")
    if index is None:  # the default index: the window's last slot
        plan = prepare(bundle, settings, image=image).plan
        index = check_one_frame(plan.schedule, plan.window, None, ())[0]
    request = Request(settings, image, one_frame=index, one_frame_groups=tuple(groups))
    model = bundle.transformer
    forward = model.forward_packed

    def record(noisy, noisy_indices, history, *args):
        calls.append(
            (
                noisy.shape,
                noisy_indices.tolist(),
                [(g.kernel, g.indices.tolist(), g.latents) for g in history],
            )
        )
        return forward(noisy, noisy_indices, history, *args)

    if calls is not None:
        model.forward_packed = record
    try:
        return open_run(bundle, request).run(tmp_path)
    finally:
        if calls is not None:
            del model.forward_packed


def test_one_latent_at_the_index_with_the_start_frame_as_history(bundle, image, tmp_path):
    calls = []
    done = _frame(bundle, image, tmp_path, calls, index=5)
    assert len(calls) == 3  # one model call per step
    shape, noisy_indices, history = calls[0]
    assert shape[2] == 1 and noisy_indices == [5]
    assert [(k, i) for k, i, _ in history] == [
        ("k1", [0, WS + 1]),
        ("k2", [WS + 2, WS + 3]),
        ("k4", list(range(WS + 4, WS + 20))),
    ]
    with torch.no_grad():
        start = vae_encode(
            bundle,
            from_uint8_frames(prepare(bundle, GenerationSettings(prompt="x"), image=image).image[None]),
        )
    torch.testing.assert_close(history[0][2][:, :, 0].cpu(), start[:, :, 0].float())
    assert all(not lat.any() for _, _, lat in history[1:]) and not history[0][2][:, :, 1].any()

    png = np.asarray(Image.open(done.image))
    # 64x96 at the 64 base: (48, 80) and (48, 64) tie at 512; the later bucket wins, as in the release
    assert png.shape == (48, 64, 3) and np.array_equal(png, done.frame)
    info = json.loads(done.sidecar.read_text())
    assert info["one_frame"]["index"] == 5 and info["one_frame"]["groups"] == ["post", "k2", "k4"]
    assert info["image"] == done.image.name and info["settings"]["prompt"] == "the cat raises a paw"
    assert info["wall_seconds"] > 0 and "seconds" not in info  # the run's time, not a video length

    again = _frame(bundle, image, tmp_path / "again", index=5)
    assert np.array_equal(again.frame, done.frame)  # same seed, same frame
    assert not np.array_equal(_frame(bundle, image, tmp_path / "other", index=WS).frame, done.frame)


def test_history_groups_and_the_reference_image(bundle, image, tmp_path):
    calls = []
    _frame(bundle, image, tmp_path, calls, groups=["k4"])
    assert [(k, i) for k, i, _ in calls[0][2]] == [("k1", [0]), ("k4", list(range(WS + 4, WS + 20)))]
    assert calls[0][1] == [WS]  # default index: the window's last slot

    ref = tmp_path / "ref.png"
    Image.fromarray(image[:, ::-1].copy()).save(ref)
    calls = []
    settings = GenerationSettings(prompt="a cat in a red coat", steps=2, end_image=str(ref))
    done = _frame(bundle, image, tmp_path, calls, settings=settings, groups=["post"])
    (k, idx, latents), = calls[0][2]  # fmt: skip
    assert k == "k1" and idx == [0, WS + 1] and latents[:, :, 1].abs().sum() > 0  # the reference as post
    assert json.loads(done.sidecar.read_text())["one_frame"]["reference"] == str(ref)

    for kw, needle in (({"index": 0}, "index"), ({"groups": ["k3"]}, "k3")):
        with pytest.raises(ValueError, match=needle):
            _frame(bundle, image, tmp_path / "bad", **kw)
    with pytest.raises(ValueError, match="post"):
        _frame(bundle, image, tmp_path / "bad", settings=settings, groups=["k2"])
    with pytest.raises(ValueError, match="post"):  # a Run built directly is checked too
        Run(bundle, prepare(bundle, settings, image=image), one_frame=(WS, ("k2",)))
    assert not (tmp_path / "bad").exists()


def test_cli_one_frame(image, tmp_path):
    Image.fromarray(image).save(tmp_path / "start.png")
    env = dict(os.environ, HF_HUB_OFFLINE="1")

    def cli(*extra):
        cmd = [sys.executable, "-m", "framepack", "generate", "--model", str(tiny_bundle_dir()), "--image",
               "start.png", "--prompt", "a cat", "--steps", "2", "--out", "out", *extra]  # fmt: skip
        return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)

    r = cli("--one-frame", "7", "--one-frame-groups", "post,k4", "--name", "edit")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("edit.png") and (tmp_path / "out" / "edit.json").exists()
    assert json.loads((tmp_path / "out" / "edit.json").read_text())["one_frame"]["groups"] == ["post", "k4"]
    r = cli("--one-frame", "0", "--name", "bad")
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "index" in lines[0], r.stderr
    assert not list((tmp_path / "out").glob("bad*"))
    r = cli("--one-frame", "7", "--gif", "--seconds", "30")
    assert r.returncode == 2 and r.stderr.strip() == (
        "framepack: --one-frame makes one image, not a video; drop --gif, --seconds."
    ), r.stderr
