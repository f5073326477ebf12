"""The GUI queue's operations (remove, move, clear the finished jobs), job numbers that go on after
a restart, a thumbnail per job in the queue table, and a live preview a person can read."""

from __future__ import annotations

import base64
import io
import json
import re
import threading
import time

import numpy as np
import pytest
from PIL import Image

from framepack.gui.jobs import CANCELLED, DONE, FAILED, QUEUE_FILE, QUEUED, RUNNING, JobQueue
from framepack.gui.pictures import readable, resize_frames, stretch_contrast, thumbnail
from framepack.gui.view import live_preview, preview_grid, progress_text, queue_html
from framepack.pipeline.settings import GenerationSettings


def _settings(**kw) -> GenerationSettings:
    return GenerationSettings(**{"prompt": "a cat walks", "sections": 1, "steps": 2, **kw})


@pytest.fixture
def held(bundle, tmp_path):
    """A queue whose worker is not started: its jobs stay queued."""
    q = JobQueue(bundle, tmp_path / "held", start=False)
    yield q
    q.close()


def _order(queue) -> list[int]:
    return [j.id for j in queue.jobs() if j.state == QUEUED]


# ------------------------------------------------------------------------------ queue operations
def test_move_reorders_the_queued_jobs_clamped(held, image):
    a, b, c, d = (held.submit(_settings(seed=i), image=image).id for i in range(4))
    version = held.version
    assert held.move(d, -2) and _order(held) == [a, d, b, c] and held.version > version
    assert [held.position(i) for i in (a, d, b, c)] == [0, 1, 2, 3]
    before = held.get(b).version
    assert held.move(a, -5) and _order(held) == [a, d, b, c]  # already first: stays
    assert held.move(b, 10) and _order(held) == [a, d, c, b]  # clamped to the end
    assert held.get(b).version > before  # its place changed: its view refreshes
    assert "(3 ahead)" in progress_text(held.get(b), held.position(b))
    held.cancel(c)
    assert not held.move(c, -1) and not held.move(999, 1)  # not queued
    assert [j.id for j in held.jobs()] == [c, a, d, b]  # ended ones, then the queue in run order


def test_remove_and_clear_finished(held, image):
    a, b, c = (held.submit(_settings(seed=i), image=image).id for i in range(3))
    bad = held.submit(_settings(vram_budget="lots"), image=image)
    assert bad.state == FAILED
    waited = []
    waiter = threading.Thread(target=lambda: waited.append(held.wait(b, 30)))
    waiter.start()
    version = held.version
    assert held.remove(b)  # a queued job: cancelled, then taken off the list
    waiter.join(30)
    assert waited[0].state == CANCELLED and waited[0].cancel_requested.is_set()
    assert held.get(b) is None and held.version > version and _order(held) == [a, c]
    assert held.position(c) == 1 and not held.remove(b) and not held.remove(999)
    assert held.remove(bad.id) and held.get(bad.id) is None  # an ended one is simply removed
    assert held.cancel(a)
    held.reject("bad", "the prompt is empty.")
    version = held.version
    assert held.clear_finished() == 2 and held.version > version
    assert [(j.id, j.state) for j in held.jobs()] == [(c, QUEUED)]
    version = held.version
    assert held.clear_finished() == 0 and held.version == version


def test_a_running_job_is_not_removed(queue, image):
    running = queue.submit(_settings(sections=4, steps=40), image=image)
    queued = queue.submit(_settings(seed=2), image=image)
    rejected = queue.submit(_settings(vram_budget="lots"), image=image)
    while queue.get(running.id).state == QUEUED:
        time.sleep(0.01)
    assert queue.get(running.id).state == RUNNING
    assert [j.id for j in queue.jobs()] == [running.id, rejected.id, queued.id]
    assert not queue.remove(running.id) and queue.clear_finished() == 1  # only the rejected one
    assert queue.get(running.id).state == RUNNING
    assert queue.cancel(running.id) and queue.remove(queued.id)
    assert queue.wait(running.id, 60).state == CANCELLED
    assert queue.remove(running.id) and queue.jobs() == []


# ---------------------------------------------------------------------------------- job numbers
def test_job_numbers_go_on_after_a_restart(bundle, image, tmp_path):
    out = tmp_path / "out"
    first = JobQueue(bundle, out, start=False)
    jobs = [first.submit(_settings(), image=image), first.reject("x", "bad."), first.resume("ghost")]
    assert [j.id for j in jobs] == [1, 2, 3] and jobs[2].state == FAILED
    first.close()
    assert json.loads((out / QUEUE_FILE).read_text()) == {"next_id": 4}
    second = JobQueue(bundle, out, start=False)  # the server restarted on the same outputs folder
    assert second.reject("y", "bad.").id == 4 and second.submit(_settings(), image=image).id == 5
    second.close()
    assert json.loads((out / QUEUE_FILE).read_text()) == {"next_id": 6}
    (out / QUEUE_FILE).write_text("{broken")  # an unreadable file: numbers start over, no failure
    third = JobQueue(bundle, out, start=False)
    assert third.reject("z", "bad.").id == 1
    third.close()


# ----------------------------------------------------------------------------------- thumbnails
def _shown_thumbnails(table: str) -> dict[int, np.ndarray]:
    """The PNG of each row's thumbnail in a queue table, by job id."""
    found = {}
    for row in re.findall(r"<tr data-job=.*?</tr>", table):
        job = int(re.search(r'data-job="(\d+)"', row)[1])
        src = re.search(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', row)
        if src:
            found[job] = np.asarray(Image.open(io.BytesIO(base64.b64decode(src[1]))).convert("RGB"))
    return found


def test_each_job_has_a_thumbnail_in_the_queue_table(queue, image):
    job = queue.submit(_settings(prompt='a "cat" <b>walks</b>'), image=image)
    assert job.frame_size == (48, 64)  # the start image at its bucket, as the video will be
    assert job.thumbnail.dtype == np.uint8 and job.thumbnail.shape == (72, 96, 3)
    assert np.array_equal(job.thumbnail, thumbnail(job.run.prepared.image))
    table = queue_html([job])
    assert np.array_equal(_shown_thumbnails(table)[job.id], job.thumbnail)
    assert 'width="96" height="72"' in table and "<b>" not in table and "&quot;cat&quot;" in table
    assert "<td>#" in table and "<th>progress</th>" in table  # the columns before it stay

    done = queue.wait(job.id, 120)
    assert done.state == DONE, done.error
    mid = done.preview[len(done.preview) // 2]
    assert np.array_equal(done.thumbnail, thumbnail(readable(mid)))  # the last step's preview
    bad = queue.reject("no image", "bad.")
    shown = _shown_thumbnails(queue_html(queue.jobs()))
    assert set(shown) == {job.id} and bad.thumbnail is None
    assert '<td class="fp-thumb"></td>' in queue_html([bad])


def test_thumbnail_size_and_pictures():
    tall = np.zeros((300, 150, 3), np.uint8)
    assert thumbnail(tall).shape == (96, 48, 3) and thumbnail(np.zeros((8, 12, 3), np.uint8)).shape == (
        64,
        96,
        3,
    )
    with pytest.raises(ValueError, match="uint8 RGB"):
        thumbnail(np.zeros((8, 8), np.float32))
    frames = np.arange(2 * 4 * 6 * 3, dtype=np.uint8).reshape(2, 4, 6, 3)
    assert resize_frames(frames, (8, 12), nearest=True).shape == (2, 8, 12, 3)
    assert np.array_equal(resize_frames(frames, (8, 12), nearest=True)[:, ::2, ::2], frames)


# ------------------------------------------------------------------------------- live preview
def test_contrast_is_stretched_only_when_dark():
    rng = np.random.default_rng(0)
    dark = rng.integers(0, 120, (3, 8, 8, 3), dtype=np.uint8)
    out = stretch_contrast(dark)
    assert np.percentile(out, 99) >= 250 and np.percentile(out, 1) <= 3
    order = np.argsort(dark.ravel(), kind="stable")
    assert np.all(np.diff(out.ravel()[order].astype(int)) >= 0)  # brighter stays brighter
    bright = rng.integers(0, 255, (3, 8, 8, 3), dtype=np.uint8)
    flat = np.full((3, 8, 8, 3), 7, np.uint8)
    assert stretch_contrast(bright) is bright and stretch_contrast(flat) is flat
    grid = preview_grid(dark, height=0, frame_size=(64, 64))
    assert grid.shape == (128, 128, 3) and grid.dtype == np.uint8  # 2x2 frames at frame size
    assert np.array_equal(grid[:64, :64], readable(dark, (64, 64))[0]) and grid[64:, 64:].max() == 0


def test_a_demo_model_preview_is_readable(tmp_path):
    """A real demo-model run: its step preview is an 8x smaller, dark picture; the live preview
    shows it at the video's frame size, bright enough to see the scene."""
    from framepack.io import read_video
    from framepack.pipeline.bundle import load_bundle
    from framepack.pipeline.named import DEFAULT_MODEL
    from framepack.training.demo import EXAMPLES

    title, caption, seed = EXAMPLES[0]
    start = np.array(
        Image.open(DEFAULT_MODEL / "examples" / (title.replace(" ", "_") + ".png")).convert("RGB")
    )
    queue = JobQueue(load_bundle(DEFAULT_MODEL), tmp_path / "out")
    try:
        job = queue.wait(queue.submit(_settings(prompt=caption, steps=6, seed=seed), image=start).id, 300)
    finally:
        queue.close()
    assert job.state == DONE, job.error
    frames = read_video(job.video)[0]
    t, h, w, _ = job.preview.shape
    assert job.frame_size == frames.shape[1:3] == (8 * h, 8 * w)
    assert np.percentile(job.preview, 99) < 192  # dark: the latent-to-RGB map is not the demo VAE's

    shown = live_preview(job)
    rows, cols = -(-t // int(np.ceil(np.sqrt(t)))), int(np.ceil(np.sqrt(t)))
    assert shown.dtype == np.uint8 and shown.shape == (rows * 8 * h, cols * 8 * w, 3)
    cell = shown[: 8 * h, : 8 * w]
    bright, raw = np.percentile(shown, 99), np.percentile(job.preview, 99)
    assert bright >= 200 and bright > 1.4 * raw, (bright, raw)  # brightened
    assert cell.std() > 1.4 * job.preview[0].std()  # more contrast
    # The same picture, only scaled and brightened: its block means follow the preview's.
    blocks = cell.reshape(h, 8, w, 8, 3).mean(axis=(1, 3))
    corr = np.corrcoef(blocks.ravel(), job.preview[0].astype(float).ravel())[0, 1]
    assert corr > 0.9, corr
    assert live_preview(job, max_side=96).shape[:2] == (rows * 32, cols * 32)  # kept under max_side
