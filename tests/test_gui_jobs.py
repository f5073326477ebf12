"""The GUI's job queue, form and views on a tiny bundle (no Gradio, no browser)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from framepack.gui.form import (
    FormValues,
    form_from_settings,
    load_sidecar,
    parse_seed,
    save_input_image,
    settings_from_form,
)
from framepack.gui.jobs import CANCELLED, DONE, FAILED, JobQueue, describe_error
from framepack.gui.view import (
    finished_videos,
    format_duration,
    preview_grid,
    progress_html,
    progress_text,
    queue_html,
)
from framepack.io import read_video
from framepack.pipeline.generate import GenerationSettings
from framepack.testing import tiny_bundle

WS = 9


@pytest.fixture(scope="module")
def bundle():
    return tiny_bundle()


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    img = np.zeros((64, 96, 3), np.uint8)
    img[16:48, 24:56] = (200, 80, 30)
    return img


@pytest.fixture
def queue(bundle, tmp_path):
    q = JobQueue(bundle, tmp_path / "out")
    yield q
    q.close()


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
        (dict(image=None), "start image"),
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
    from framepack.gui.jobs import Job

    job = Job(
        id=3, prompt="<script>alert(1)</script>", settings=None, state=FAILED, error="bad <b>input</b>."
    )
    html = queue_html([job]) + progress_html(job)
    assert "<script>" not in html and "&lt;script&gt;" in html and "<b>" not in html
    assert 'data-state="failed"' in html and "No job yet" in progress_html(None)
