"""End to end on a tiny bundle in the real layout: frame counts, the mp4, seeds, constant
context per section, cancellation, and the `framepack generate` command's errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from framepack.io import read_video
from framepack.pipeline.events import SectionDone
from framepack.pipeline.run import Request, open_run
from framepack.pipeline.settings import GenerationSettings
from framepack.sampling import Cancelled
from framepack.testing import tiny_bundle_dir

WS = 9


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    img = np.zeros((64, 96, 3), np.uint8)
    img[16:48, 24:56] = rng.integers(0, 255, 3)
    return img


def _run(bundle, image, tmp_path, **kw):
    settings = GenerationSettings(prompt=kw.pop("prompt", "a cat walks"), steps=kw.pop("steps", 2), **kw)
    events = []
    done = open_run(bundle, Request(settings, image)).run(tmp_path, on_event=events.append)
    return done, events


@pytest.mark.parametrize("order", ["inverted", "forward", "anti-drifting"])
@pytest.mark.parametrize("sections", [1, 2, 5])
def test_frame_count_fps_and_bucket(bundle, image, tmp_path, order, sections, request):
    end = None
    if order == "anti-drifting":
        end = str(tmp_path / "end.png")
        Image.fromarray(image[:, ::-1].copy()).save(end)
    context = []
    hook = bundle.transformer.transformer_blocks[0].register_forward_pre_hook(
        lambda mod, args: context.append(args[0].shape[1])  # image-stream tokens entering block 0
    )
    try:
        done, events = _run(bundle, image, tmp_path, sections=sections, order=order, end_image=end, fps=24)
    finally:
        hook.remove()
    expected = 4 * (WS * sections + 1) - 3
    frames, fps, meta = read_video(done.video)
    assert done.frames == expected and frames.shape[0] == expected
    assert fps == pytest.approx(24)
    assert frames.shape[1:3] == (48, 64)  # 64x96 at the 64 base: (48, 80) and (48, 64) tie; the later wins
    assert len(set(context)) == 1 and len(context) == sections * 2  # same context length every call
    assert json.loads(meta["framepack"])["settings"]["order"] == order
    assert sum(isinstance(e, SectionDone) for e in events) == sections
    sidecar = json.loads(done.sidecar.read_text())
    assert sidecar["frames"] == expected and sidecar["video"] == done.video.name


def test_same_seed_same_video_other_seed_differs(bundle, image, tmp_path):
    a, _ = _run(bundle, image, tmp_path / "a", sections=2, seed=7)
    b, _ = _run(bundle, image, tmp_path / "b", sections=2, seed=7)
    c, _ = _run(bundle, image, tmp_path / "c", sections=2, seed=8)
    fa, fb, fc = (read_video(x.video)[0] for x in (a, b, c))
    assert np.array_equal(fa, fb)
    assert not np.array_equal(fa, fc)


def test_cancel_keeps_finished_sections(bundle, image, tmp_path):
    sections_done = []

    def on_event(event):
        if isinstance(event, SectionDone):
            sections_done.append(event)

    settings = GenerationSettings(prompt="a dog runs", sections=3, steps=2, name="cancelled")
    with pytest.raises(Cancelled):
        open_run(bundle, Request(settings, image)).run(
            tmp_path, cancel=lambda: len(sections_done) >= 1, on_event=on_event
        )
    frames, _, _ = read_video(tmp_path / "cancelled.mp4")
    assert frames.shape[0] == sections_done[0].frames == 4 * WS - 3  # the first section, playable
    assert not list(tmp_path.glob(".*.tmp"))


def test_cfg_and_timed_prompts_run(bundle, image, tmp_path):
    done, _ = _run(
        bundle,
        image,
        tmp_path,
        sections=2,
        prompt="[0s-0.6s: a cat walks] [0.6s: a dog runs]",
        cfg=2.0,
        negative_prompt="rain",
    )
    assert done.frames == 4 * (WS * 2 + 1) - 3


def test_the_manifest_cfg_is_the_default(bundle, image, tmp_path):
    import dataclasses

    from framepack.pipeline.settings import prepare

    assert prepare(bundle, GenerationSettings(prompt="x", sections=1), image).cfg == 1.0
    guided = dataclasses.replace(bundle, manifest=bundle.manifest.replace(cfg=2.0))
    assert prepare(guided, GenerationSettings(prompt="x", sections=1), image).cfg == 2.0
    assert prepare(guided, GenerationSettings(prompt="x", sections=1, cfg=1.0), image).cfg == 1.0
    by_default, _ = _run(guided, image, tmp_path / "a", sections=1)
    explicit, _ = _run(bundle, image, tmp_path / "b", sections=1, cfg=2.0)
    plain, _ = _run(bundle, image, tmp_path / "c", sections=1)
    a, b, c = (read_video(d.video)[0] for d in (by_default, explicit, plain))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


# ---------------------------------------------------------------- the command line
def _cli(*args, cwd):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", "framepack", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=120,
    )


def test_cli_generates_with_events(image, tmp_path):
    model = tiny_bundle_dir()
    Image.fromarray(image).save(tmp_path / "start.png")
    r = _cli(
        "generate", "--model", str(model), "--image", "start.png", "--prompt", "a cat walks",
        "--seconds", "3", "--steps", "2", "--out", "out", "--events", "events.jsonl", "--gif", "--png", "--name", "clip",
        cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    # 3 s is 2.5 sections of 1.2 s, rounded (as the release rounds, half to even) to 2: it says so.
    assert (
        "framepack: 2 section(s) of 9 latents: 73 frames, 2.43 s at 30 fps (asked for 3 s; the length "
        "is a whole number of 1.20 s sections)." in r.stderr.splitlines()
    ), r.stderr
    mp4 = tmp_path / r.stdout.splitlines()[0]
    assert mp4.suffix == ".mp4" and read_video(mp4)[0].shape[0] == 4 * (WS * 2 + 1) - 3
    assert (tmp_path / r.stdout.splitlines()[1]).suffix == ".gif"
    assert len(list((tmp_path / "out" / "clip_frames").glob("frame_*.png"))) == 4 * (WS * 2 + 1) - 3
    kinds = [json.loads(line)["event"] for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert kinds.count("step") == 4 and kinds.count("section") == 2 and kinds[-1] == "finished"


def test_cli_out_of_device_memory_is_one_sentence_and_keeps_the_job(image, tmp_path, monkeypatch, capsys):
    """A CUDA OOM in the middle of a run (raised here after the first section, as a card too small
    for an unbudgeted run would) names the budget option and the resume command; the section stays."""
    import torch

    from framepack.cli.main import main
    from framepack.pipeline.run import Run

    real = Run.events

    def runs_out(self, *args, **kwargs):
        for event in real(self, *args, **kwargs):
            yield event
            if isinstance(event, SectionDone):
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Run, "events", runs_out)
    Image.fromarray(image).save(tmp_path / "start.png")
    code = main(
        ["generate", "--model", str(tiny_bundle_dir()), "--image", str(tmp_path / "start.png"), "--prompt", "a cat",
         "--sections", "2", "--steps", "1", "--out", str(tmp_path / "out"), "--name", "clip"]
    )  # fmt: skip
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after the progress bars
    assert code == 2 and "Traceback" not in err and last.startswith("framepack: the device ran out of memory")
    assert "--vram-budget auto" in last and "--resume" in last
    assert read_video(tmp_path / "out" / "clip.mp4")[0].shape[0] > 0
    assert (tmp_path / "out" / "clip.job").is_dir()


BAD = [
    (["--image", "missing.png"], "missing.png"),
    (["--image", "corrupt.png"], "corrupt.png"),
    (["--seconds", "0"], "second"),
    (["--seconds", "-3"], "second"),
    (["--seconds", "1e9"], "second"),
    (["--model", "no/such-model-here"], "no/such-model-here"),
    (["--keyframe", "99:start.png"], "keyframe"),
    (["--keyframe", "soon:start.png"], "TIME:IMAGE"),
    (["--width", "100", "--height", "64"], "16"),
    (["--steps", "0"], "steps"),
    (["--lora", "nowhere.safetensors"], "nowhere.safetensors does not exist"),
    (["--sections", "1", "--seconds", "3"], "not both"),
    (["--lora", "start.png:abc"], "scale 'abc'"),
    (["--model", "weightless"], "lacks its"),  # the settings are good: then the load fails
]


@pytest.mark.parametrize("extra,needle", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_cli_bad_input_is_one_sentence_and_writes_nothing(image, tmp_path, extra, needle):
    """Every bad setting is refused before the weights load: the model is a bundle folder with its
    manifest and no weights, which only the last case gets as far as loading."""
    Image.fromarray(image).save(tmp_path / "start.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    (tmp_path / "weightless").mkdir()
    (tmp_path / "weightless" / "framepack.json").write_bytes(
        (tiny_bundle_dir() / "framepack.json").read_bytes()
    )
    args = [
        "generate",
        "--model",
        "weightless",
        "--image",
        "start.png",
        "--prompt",
        "a cat",
        "--out",
        "out",
    ]
    for i in range(0, len(extra), 2):  # later options override earlier ones
        if extra[i] in args:
            args[args.index(extra[i]) + 1] = extra[i + 1]
        else:
            args += extra[i : i + 2]
    r = _cli(*args, cwd=tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("framepack: "), r.stderr
    assert "Traceback" not in r.stderr and needle.lower() in lines[0].lower(), lines[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_context_is_bounded_for_long_histories(bundle, image, tmp_path):
    """The history grows with every section, the image-stream tokens do not (FramePack's promise)."""
    tokens = []
    hook = bundle.transformer.transformer_blocks[0].register_forward_pre_hook(
        lambda mod, args: tokens.append(args[0].shape[1])
    )
    try:
        _run(bundle, image, tmp_path, sections=8, steps=1, order="forward")
    finally:
        hook.remove()
    assert len(tokens) == 8 and len(set(tokens)) == 1


def test_python_api_generate_and_iter(image, tmp_path):
    import framepack
    from framepack.pipeline.events import StepEvent

    model = tiny_bundle_dir()
    Image.fromarray(image).save(tmp_path / "start.png")
    done = framepack.generate(
        model, tmp_path / "out", image=str(tmp_path / "start.png"), prompt="a cat", sections=1, steps=2
    )
    assert read_video(done.video)[0].shape[0] == 4 * (WS + 1) - 3
    sidecar = json.loads(done.sidecar.read_text())
    assert sidecar["settings"]["image"] == str(tmp_path / "start.png")
    assert sidecar["settings"]["window"] is None and sidecar["used"]["window"] == WS  # the model's
    assert sidecar["used"]["steps"] == 2 and sidecar["used"]["order"] == "inverted"
    assert sidecar["wall_seconds"] == done.wall_seconds > 0 and "seconds" not in sidecar  # not the length
    events = list(
        framepack.generate_iter(model, tmp_path / "out2", image=image, prompt="a cat", sections=1, steps=2)
    )
    assert sum(isinstance(e, StepEvent) for e in events) == 2
    with pytest.raises(ValueError, match="unknown generation setting"):
        framepack.generate(model, tmp_path / "out3", image=image, prompt="a cat", frobnicate=1)


def test_python_api_picks_the_device_as_the_cli_and_gui_do(tmp_path, monkeypatch):
    """`framepack.generate` defaults to "auto", resolved by `resolve_device` (a CUDA GPU when there
    is one), not to the CPU (issue 18); a bad name is one sentence."""
    import inspect

    import torch

    import framepack
    from framepack.pipeline import api

    for call in (framepack.generate, framepack.generate_iter):
        assert inspect.signature(call).parameters["device"].default == "auto"
    loads = []

    class Stop(Exception):
        pass

    def loaded_bundle(model, device, vram_budget=None, ram_budget=None, transformer_only=False):
        loads.append(device)
        raise Stop  # before any weights load

    monkeypatch.setattr(api, "loaded_bundle", loaded_bundle)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for kwargs in ({}, {"device": "auto"}, {"device": "cpu"}):
        with pytest.raises(Stop):
            framepack.generate(out_dir=tmp_path, prompt="a cat", **kwargs)
    assert loads == ["cuda", "cuda", "cpu"]
    with pytest.raises(ValueError, match=r"^device 'gpu' is not a device name such as cpu or cuda\.$"):
        framepack.generate(out_dir=tmp_path, prompt="a cat", device="gpu")


def test_download_offline_is_one_sentence(tmp_path):
    r = _cli("download", "hunyuan-i2v", "--cache-dir", str(tmp_path / "hub"), cwd=tmp_path)
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "offline" in lines[0], r.stderr
