"""The GUI's job queue, form and views on a tiny bundle (no Gradio, no browser)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from framepack.gui.form import (
    FormValues,
    demo_examples,
    form_from_settings,
    list_loras,
    load_sidecar,
    parse_seed,
    request_from_form,
    save_input_image,
    settings_from_form,
)
from framepack.gui.jobs import CANCELLED, DONE, FAILED, describe_error
from framepack.gui.pictures import thumbnail
from framepack.gui.view import (
    finished_videos,
    format_duration,
    preview_grid,
    progress_html,
    progress_text,
    queue_html,
)
from framepack.io import read_video
from framepack.pipeline.settings import GenerationSettings

WS = 9


def _settings(**kw) -> GenerationSettings:
    return GenerationSettings(prompt=kw.pop("prompt", "a cat walks"), **{"sections": 1, "steps": 2, **kw})


def test_jobs_run_in_order_with_live_state(queue, image):
    a = queue.submit(_settings(sections=2, steps=3), image=image)
    b = queue.submit(_settings(seed=5), image=image)
    assert (a.id, b.id) == (1, 2) and queue.position(b.id) >= 1
    a, b = queue.wait(a.id, 120), queue.wait(b.id, 120)
    assert a.state == DONE and b.state == DONE, (a.error, b.error)
    assert a.ended <= b.started  # one worker, in submission order
    assert (a.sections, a.steps, a.steps_done, a.sections_done) == (2, 3, 6, 2)
    assert a.frames == 4 * (WS * 2 + 1) - 3 and a.preview.dtype == np.uint8 and a.preview.ndim == 4
    frames, _, _ = read_video(a.video)
    assert frames.shape[0] == a.frames
    assert a.sidecar.is_file() and a.video.name != b.video.name  # each job its own file
    assert a.eta() is None and "done" in progress_text(a)


def test_cancel_queued_and_running_keeps_finished_sections(queue, image):
    running = queue.submit(_settings(sections=4, steps=40, prompt="a dog runs"), image=image)
    queued = queue.submit(_settings(), image=image)
    assert queue.cancel(queued.id)
    assert queue.get(queued.id).state == CANCELLED and queue.get(queued.id).started is None
    while (job := queue.get(running.id)).sections_done < 1 or job.steps_done < 45:
        assert not job.ended_state, job.error
    before = job.steps_done
    assert queue.cancel(running.id)
    job = queue.wait(running.id, 60)
    assert job.state == CANCELLED
    assert job.steps_done <= before + 1  # stopped within one sampling step
    assert job.sections_done >= 1 and job.video is not None and job.sidecar is None
    frames, _, _ = read_video(job.video)
    assert frames.shape[0] == job.frames > 0  # the finished sections are kept
    assert "kept" in progress_text(job)
    assert not queue.cancel(running.id) and not queue.cancel(999)


def test_bad_input_fails_as_one_sentence_and_the_worker_goes_on(queue, image, tmp_path):
    bad = queue.submit(_settings(prompt="[3s-1s: a cat]"), image=image)
    assert bad.state == FAILED and bad.error.count(".") >= 1 and "Traceback" not in bad.error
    assert "starts at 3 s, outside the 1.2 s video" in bad.error
    assert (
        "VRAM budget 'lots' is not a number" in queue.submit(_settings(vram_budget="lots"), image=image).error
    )
    # A failure inside the worker (a folder sits where the mp4 is to be written) ...
    (queue.out_dir / "blocked.mp4").mkdir(parents=True)
    broken = queue.submit(_settings(name="blocked"), image=image)
    after = queue.submit(_settings(), image=image)
    broken, after = queue.wait(broken.id, 120), queue.wait(after.id, 120)
    assert broken.state == FAILED and broken.error.endswith("blocked.mp4 because it is a directory.")
    assert "\n" not in broken.error
    # ... and the next job still runs.
    assert after.state == DONE and after.video.is_file()


def test_describe_error_is_one_sentence():
    assert describe_error(ValueError("the prompt is empty.")) == "the prompt is empty."
    assert describe_error(RuntimeError("CUDA out of memory. Tried")).startswith(
        "the device ran out of memory"
    )
    assert describe_error(torch.OutOfMemoryError("CUDA out of memory.")).startswith("the device ran out")
    assert describe_error(KeyError("x")) == "generation failed with KeyError: 'x'."
    assert describe_error(RuntimeError("first\nsecond")) == "generation failed with RuntimeError: first."


def test_seed_parsing():
    assert parse_seed("42") == 42 and parse_seed(7.0) == 7 and parse_seed(" 3 ") == 3
    for text in ("", "random", "RANDOM", None, "-1"):
        assert 0 <= parse_seed(text) < 2**31
    for bad in ("abc", 1.5, -5, True):
        with pytest.raises(ValueError, match="seed"):
            parse_seed(bad)


def test_form_validation_and_stored_images(image, tmp_path):
    form = FormValues(image=image, end_image=None, prompt="  a cat walks ", seed="9", steps=3.0, window=9.0)
    form.resolution = 64.0
    s = settings_from_form(form, tmp_path)
    assert s.prompt == "a cat walks" and s.seed == 9 and s.steps == 3 and isinstance(s.window, int)
    assert s.image == str(save_input_image(image, tmp_path))  # content-addressed, stored once
    assert len(list((tmp_path / "inputs").iterdir())) == 1
    for change, needle in [
        (dict(image=None, one_frame=True), "one-frame mode edits a start image"),
        (dict(one_frame=True, one_frame_index=0), "one-frame index must be from 1"),
        (dict(keyframe_images=["a.png"], keyframe_times=""), "one keyframe time .* per keyframe image"),
        (dict(keyframe_times="soon"), "keyframe times must be numbers"),
        (dict(loras=["nowhere.safetensors"]), "not in the LoRA folder"),
        (dict(lora_scales="x"), "LoRA scales must be numbers"),
        (dict(video=str(tmp_path / "gone.mp4")), "video gone.mp4 was not received"),
        (dict(prompt="  "), "prompt is empty"),
        (dict(seed="x"), "seed"),
        (dict(steps=2.5), "steps must be a whole number"),
        (dict(crf=60), "crf"),
        (dict(seconds=float("nan")), "seconds"),
        (dict(cache_threshold=-1.0), "cache threshold"),
    ]:
        with pytest.raises(ValueError, match=needle):
            settings_from_form(FormValues(**{**form.__dict__, **change}), tmp_path)


def test_settings_load_back_from_sidecar_and_mp4(queue, bundle, image, tmp_path):
    form = FormValues(image=image, end_image=None, prompt="[0s-1s: a cat] [1s: a dog]", seed="11", steps=2)
    form.seconds, form.resolution, form.crf, form.gif = 2.4, 64, 20, True
    form.cache, form.cache_threshold = "teacache", 0.1  # the step cache, a switch of the library
    job = queue.wait(queue.submit(settings_from_form(form, queue.out_dir)).id, 120)
    assert job.state == DONE and job.gif.is_file(), job.error
    from_json = load_sidecar(job.sidecar)
    assert from_json == load_sidecar(job.video)  # the mp4 carries the same settings
    values = form_from_settings(from_json, queue.out_dir, bundle.manifest)
    assert np.array_equal(values["image"], image) and values["end_image"] is None
    assert values["prompt"] == form.prompt and values["seed"] == "11" and values["steps"] == 2
    assert values["seconds"] == 2.4 and values["crf"] == 20 and values["gif"] is True
    assert values["order"] == bundle.manifest.order and values["window"] == bundle.manifest.window
    assert (values["cache"], values["cache_threshold"], values["vram_budget"]) == ("teacache", 0.1, "")
    assert json.loads(job.sidecar.read_text())["cache"]["name"] == "teacache"
    # A sidecar may not make the server read files outside its outputs folder.
    elsewhere = save_input_image(image, tmp_path / "elsewhere")
    assert (
        form_from_settings({**from_json, "image": str(elsewhere)}, queue.out_dir, bundle.manifest)["image"]
        is None
    )
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="not a FramePack sidecar"):
        load_sidecar(bad)
    assert finished_videos(queue.out_dir)[0] == (job.video, job.gif, job.sidecar)


def test_views():
    assert format_duration(3.2) == "3 s" and format_duration(65) == "1 min 05 s"
    assert format_duration(7380) == "2 h 03 min"
    grid = preview_grid(np.full((9, 8, 12, 3), 7, np.uint8), height=240)
    assert grid.shape == (240, 360, 3) and grid.dtype == np.uint8
    grid = preview_grid(np.ones((5, 10, 10, 3), np.uint8), height=20)
    assert grid.shape == (20, 30, 3) and grid[10:, 20:].max() == 0  # 3x2 grid, last cell blank
    from framepack.gui.jobs import QueuedJob

    job = QueuedJob(
        id=3, prompt="<script>alert(1)</script>", settings=None, state=FAILED, error="bad <b>input</b>."
    )
    html = queue_html([job]) + progress_html(job)
    assert "<script>" not in html and "&lt;script&gt;" in html and "<b>" not in html
    assert 'data-state="failed"' in html and "No job yet" in progress_html(None)


# ------------------------------------------------------------------------------------------ modes
def _form(image, **kw) -> FormValues:
    return FormValues(
        image=image,
        end_image=None,
        **{"prompt": "a cat walks", "seconds": 1.2, "steps": 2, "resolution": 64, **kw},
    )


def _run(queue, form: FormValues, loras_dir=None):
    request = request_from_form(form, queue.out_dir, loras_dir)
    return queue.wait(queue.submit(request.settings, **request.submit_kwargs()).id, 120)


def _write_lora(bundle, path, seed: int = 4):
    """A kohya-named LoRA on two layers of the tiny transformer, large enough to change the video."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    mods = dict(bundle.transformer.named_modules())
    tensors = {}
    for name in ("transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.proj_out"):
        key = "lora_unet_" + name.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = torch.randn(4, mods[name].in_features, generator=g) * 0.5
        tensors[f"{key}.lora_up.weight"] = torch.randn(mods[name].out_features, 4, generator=g) * 0.5
        tensors[f"{key}.alpha"] = torch.tensor(4.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def _reload(job, queue, bundle, loras_dir=None) -> FormValues:
    """The form a person gets by loading the job's sidecar back."""
    values = form_from_settings(load_sidecar(job.sidecar), queue.out_dir, bundle.manifest, loras_dir)
    return FormValues(**values)


def test_text_to_video_loop_and_keyframes_round_trip(queue, bundle, image, tmp_path):
    t2v = _run(queue, _form(None, t2v_colour="#c03020", sampler="euler", png=True))
    assert t2v.state == DONE, t2v.error
    assert t2v.frames == read_video(t2v.video)[0].shape[0] == 4 * (WS + 1) - 3
    assert len(list(t2v.video.with_name(t2v.video.stem + "_frames").glob("*.png"))) == t2v.frames
    back = _reload(t2v, queue, bundle)
    assert (back.image, back.t2v_colour, back.sampler, back.png) == (None, "#c03020", "euler", True)
    assert settings_from_form(back, queue.out_dir).t2v_colour == "#c03020"
    back.t2v_colour = "rgba(192, 48, 32, 0.5)"  # as some colour pickers send it
    assert settings_from_form(back, queue.out_dir).t2v_colour == "#c03020"

    loop = _run(queue, _form(image, loop=True))
    assert loop.state == DONE and loop.frames == 4 * (WS + 1) - 3, loop.error
    assert "loop_seam" in json.loads(loop.sidecar.read_text())
    assert _reload(loop, queue, bundle).loop is True

    from PIL import Image

    key = tmp_path / "key.png"
    Image.fromarray(255 - image).save(key)
    keyed = _run(queue, _form(image, seconds=2.4, keyframe_images=[str(key)], keyframe_times="1.2"))
    assert keyed.state == DONE and keyed.frames == 4 * (2 * WS + 1) - 3, keyed.error
    back = _reload(keyed, queue, bundle)
    assert back.keyframe_times == "1.2" and len(back.keyframe_images) == 1
    again = settings_from_form(back, queue.out_dir)
    assert again.keyframes == keyed.settings.keyframes  # the same stored image, the same time


def test_one_frame_job_makes_a_png_listed_with_the_videos(queue, bundle, image):
    job = _run(queue, _form(image, one_frame=True, one_frame_index=5, one_frame_groups=["post", "k4"]))
    assert job.state == DONE, job.error
    assert job.video is None and job.image.suffix == ".png" and job.frames == 1
    assert job.steps_done == 2 and "one frame at time index 5" in progress_text(job)
    from framepack.io import load_image, prepare_image

    assert load_image(job.image).shape == prepare_image(image, resolution=64).shape  # the start's bucket
    assert np.array_equal(job.thumbnail, thumbnail(load_image(job.image)))  # the result, in the queue table
    assert finished_videos(queue.out_dir)[0] == (job.image, None, job.sidecar)
    back = _reload(job, queue, bundle)
    assert (back.one_frame, back.one_frame_index, back.one_frame_groups) == (True, 5, ["post", "k4"])
    request = request_from_form(back, queue.out_dir)
    assert (request.one_frame, request.one_frame_groups) == (5, ("post", "k4"))
    bad = _run(queue, _form(image, one_frame=True, one_frame_groups=["k8"]))
    assert bad.state == FAILED and bad.error == "unknown history group 'k8'; choose from post, k2, k4."


def test_extending_a_video_from_the_form(queue, bundle, image):
    source = _run(queue, _form(image, seed="3"))
    assert source.state == DONE, source.error
    job = _run(queue, _form(image, video=str(source.video), prompt="the cat sits down"))
    assert job.state == DONE, job.error
    frames = read_video(job.video)[0]
    # Inverted order: one section from the start image leads into the video (4 * WS + 1 frames).
    assert job.frames == frames.shape[0] == source.frames + 4 * WS + 1
    stored = job.video_source
    assert stored != str(source.video) and (queue.out_dir / "inputs") in Path(stored).parents
    back = _reload(job, queue, bundle)
    assert back.video == stored and back.t2v_colour == "#808080"
    assert request_from_form(back, queue.out_dir).video == stored
    bad = _run(queue, _form(image, video=str(source.video), loop=True))
    assert bad.state == FAILED and "takes no end image, keyframes, text-to-video colour or loop" in bad.error


def test_lora_scale_zero_is_no_lora_and_loras_round_trip(queue, bundle, image, tmp_path):
    folder = tmp_path / "loras"
    _write_lora(bundle, folder / "style.safetensors")
    upload = _write_lora(bundle, tmp_path / "upload" / "mine.safetensors", seed=5)
    assert list_loras(folder) == ["style.safetensors"] and list_loras(None) == []
    plain = _run(queue, _form(image, seed="8"))
    zero = _run(queue, _form(image, seed="8", loras=["style.safetensors"], lora_scales="0"), folder)
    one = _run(queue, _form(image, seed="8", lora_files=[str(upload)], lora_scales="1"), folder)
    assert (plain.state, zero.state, one.state) == (DONE, DONE, DONE), (zero.error, one.error)
    videos = [read_video(j.video)[0] for j in (plain, zero, one)]
    assert np.array_equal(videos[0], videos[1]) and not np.array_equal(videos[0], videos[2])
    assert zero.settings.loras == ((str((folder / "style.safetensors").resolve()), 0.0),)

    both = _form(image, loras=["style.safetensors"], lora_files=[str(upload)], lora_scales="0.5, 2")
    settings = settings_from_form(both, queue.out_dir, folder)
    back = FormValues(**form_from_settings(settings.to_dict(), queue.out_dir, bundle.manifest, folder))
    assert back.loras == ["style.safetensors"] and back.lora_scales == "0.5, 2"
    assert len(back.lora_files) == 1 and (queue.out_dir / "loras") in Path(back.lora_files[0]).parents
    assert settings_from_form(back, queue.out_dir, folder).loras == settings.loras
    with pytest.raises(ValueError, match="one LoRA scale for all or one per LoRA"):
        settings_from_form(_form(image, lora_files=[str(upload)], lora_scales="1, 2"), queue.out_dir)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    bad = _run(queue, _form(image, lora_files=[str(junk)]))
    assert bad.state == FAILED and "\n" not in bad.error and bad.error.endswith(".")


def test_examples_are_the_demo_models_when_serving_it():
    from framepack.pipeline.named import DEFAULT_MODEL
    from framepack.training.demo import EXAMPLES

    assert [p for _, p in demo_examples(None)][0].startswith("The cat walks")
    shown = demo_examples(DEFAULT_MODEL)
    assert [p for _, p in shown] == [caption for _, caption, _ in EXAMPLES]
    for image_path, _ in shown:  # the bundle (and its example images) may not be there yet
        assert image_path is None or Path(image_path).is_file()
