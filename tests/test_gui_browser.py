"""The GUI in a real browser (the system's Chromium, driven by Playwright) against `framepack serve`
on a tiny bundle: generate with a live preview and a playable video, queue and cancel jobs from
another tab, a bad input's error. Screenshots go to test-artifacts/gui/."""

from __future__ import annotations

import json
import re

import pytest
from gui_server import ARTIFACTS, Server, chromium_path, write_start_image

from framepack.io import read_video
from framepack.testing import tiny_bundle_dir

playwright = pytest.importorskip("playwright.sync_api")

WS = 9
TIMEOUT = 120_000  # ms; the machine running the tests may be busy


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tiny_bundle_dir(), tmp_path_factory.mktemp("gui") / "outputs")
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def browser():
    executable = chromium_path()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> str:
    return write_start_image(tmp_path_factory.mktemp("img") / "start.png")


@pytest.fixture
def page(browser, server):
    """A new tab on the GUI; fails the test if the page asked anything of another server."""
    context = browser.new_context(viewport={"width": 1400, "height": 1500})
    tab = context.new_page()
    tab.set_default_timeout(TIMEOUT)
    outside = []
    tab.on(
        "request",
        lambda r: outside.append(r.url) if not r.url.startswith((server.url, "data:", "blob:")) else 0,
    )
    tab.goto(server.url)
    tab.wait_for_selector("#fp-generate")
    yield tab
    context.close()
    assert not outside, f"the page fetched from elsewhere: {outside[:3]}"


def _shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def _number(page, elem_id: str, value: float) -> None:
    """Type `value` into a slider's number box until the box and the slider's range input both hold
    it for two checks in a row. A slider in an accordion that has just opened is mounted then, and
    Gradio sets it back to its value once more shortly after: a number typed within about 0.1 s of
    the opening was lost (seen in Chromium with Gradio 6.31, more often under load)."""
    box = page.locator(f"#{elem_id} input[type=number]")
    holds = (
        f"[...document.querySelectorAll('#{elem_id} input')]"
        f".filter(e => e.type === 'number' || e.type === 'range')"
        f".every(e => Math.abs(parseFloat(e.value) - {value}) < 1e-9)"
    )
    for _ in range(20):
        box.fill(str(value))
        box.press("Enter")
        box.press("Tab")  # blur too, so the value reaches Gradio's state before the next click
        page.wait_for_timeout(300)
        if page.evaluate(holds):
            page.wait_for_timeout(300)
            if page.evaluate(holds):
                return
    raise AssertionError(f"#{elem_id} did not keep the typed value {value}")


def _fill(page, image_file: str, prompt: str, seconds: float, steps: int) -> None:
    if not page.locator("#fp-image img").count():
        page.locator("#fp-image input[type=file]").set_input_files(image_file)
        page.wait_for_selector("#fp-image img")
    page.locator("#fp-prompt textarea").fill(prompt)
    _number(page, "fp-seconds", seconds)
    if not page.locator("#fp-steps").is_visible():
        page.get_by_text("More settings").click()
    _number(page, "fp-steps", steps)


def _progress(page, state: str, job: int | None = None):
    where = f"[data-job='{job}']" if job is not None else ""
    page.wait_for_selector(f"#fp-progress .fp-progress{where}[data-state='{state}']")
    el = page.locator("#fp-progress .fp-progress")
    return int(el.get_attribute("data-job")), el.locator("span").inner_text()


def _cancel_after_a_section(page, job: int) -> str:
    """Wait until the watched job `job` has finished a section, press Stop; its final progress text."""
    page.wait_for_function(
        f"document.querySelector('#fp-progress .fp-progress[data-job=\"{job}\"] span')"
        "?.textContent.includes('frames')",
        timeout=TIMEOUT,
    )
    page.locator("#fp-cancel").click()
    return _progress(page, "cancelled", job)[1]


def _video_frames(page, tmp_path) -> int:
    """Fetch the shown video through the server, decode it, return its frame count."""
    src = page.locator("#fp-video video").get_attribute("src")
    data = page.request.get(src).body()
    path = tmp_path / "shown.mp4"
    path.write_bytes(data)
    return read_video(path)[0].shape[0]


def test_generate_shows_the_preview_then_a_playable_video(page, image_file, tmp_path):
    _fill(page, image_file, "a cat walks in the rain", seconds=2.4, steps=16)  # 2 sections
    page.locator("#fp-generate").click()
    page.wait_for_function(
        "document.querySelector('#fp-progress .fp-progress')?.dataset.state === 'running'"
        " && document.querySelector('#fp-preview img')?.naturalWidth > 0",
        timeout=TIMEOUT,
    )
    _shot(page, "1-running-with-preview")
    _, text = _progress(page, "done")
    assert re.search(r"done in .*: 73 frames \(2\.4 s of video\)", text), text
    page.wait_for_selector("#fp-files a, #fp-files [download]")
    _shot(page, "2-done")
    playable = page.evaluate(
        """async () => {
            const v = document.querySelector('#fp-video video');
            v.muted = true;
            for (let i = 0; i < 100 && v.readyState < 2; i++) await new Promise(r => setTimeout(r, 100));
            await v.play();
            await new Promise(r => setTimeout(r, 400));
            return {ready: v.readyState, width: v.videoWidth, duration: v.duration, time: v.currentTime};
        }"""
    )
    assert playable["ready"] >= 2 and playable["width"] > 0 and playable["time"] > 0, playable
    assert abs(playable["duration"] - 73 / 30) < 0.1, playable
    assert _video_frames(page, tmp_path) == 4 * (WS * 2 + 1) - 3
    assert "mp4" in page.locator("#fp-files").inner_text()


def test_queue_a_second_job_and_cancel_both(page, image_file, tmp_path):
    _fill(page, image_file, "a dog runs down the street", seconds=6, steps=30)  # 5 long sections
    page.locator("#fp-generate").click()
    first, _ = _progress(page, "running")
    page.locator("#fp-prompt textarea").fill("a man walks")
    page.locator("#fp-generate").click()
    second, text = _progress(page, "queued", first + 1)
    assert "queued" in text
    page.wait_for_selector(f"#fp-queue tr[data-job='{second}'][data-state='queued']")
    _shot(page, "3-second-job-queued")

    page.locator("#fp-cancel").click()  # the watched job: the queued one
    _, text = _progress(page, "cancelled", second)
    assert "before it started" in text
    page.wait_for_selector(f"#fp-queue tr[data-job='{second}'][data-state='cancelled']")

    page.locator("#fp-watch input").click()  # watch the running one again, and cancel it
    page.locator("[role=option]", has_text=f"#{first} ").click()
    text = _cancel_after_a_section(page, first)
    kept = re.search(r"kept (\d+) finished section\(s\): (\d+) frames", text)
    assert kept and 1 <= int(kept[1]) < 5, text
    page.wait_for_selector("#fp-video video")
    _shot(page, "4-cancelled-keeps-finished-sections")
    assert _video_frames(page, tmp_path) == int(kept[2])


def test_bad_input_shows_its_error_and_the_next_job_runs(page, image_file):
    _fill(page, image_file, "[1s-0.5s: a cat]", seconds=1.2, steps=4)
    page.locator("#fp-generate").click()
    failed, text = _progress(page, "failed")
    assert text.endswith("ends at 0.5 s, not after its start at 1 s."), text
    page.get_by_text("not after its start at 1 s").first.wait_for()  # also in the error toast
    page.wait_for_selector(f"#fp-queue tr[data-job='{failed}'][data-state='failed']")
    _shot(page, "5-bad-input-error")

    page.locator("#fp-prompt textarea").fill("a cat walks")
    page.locator("#fp-generate").click()
    _, text = _progress(page, "done", failed + 1)
    assert "37 frames" in text
    page.wait_for_selector(f"#fp-queue tr[data-job='{failed + 1}'][data-state='done']")
    page.wait_for_selector("#fp-gallery video, #fp-gallery img")  # finished videos are listed


def test_settings_load_back_from_a_sidecar(page, server, image_file):
    _fill(page, image_file, "a woman dancing", seconds=1.2, steps=3)
    page.locator("#fp-seed textarea, #fp-seed input").first.fill("4242")
    page.locator("#fp-generate").click()
    _progress(page, "done")
    sidecar = max(server.outputs.glob("*.json"), key=lambda p: p.stat().st_mtime)
    page.locator("#fp-prompt textarea").fill("something else")
    page.locator("#fp-seed textarea, #fp-seed input").first.fill("1")
    _number(page, "fp-steps", 9)
    page.get_by_text("Load settings of a finished video").click()
    page.locator("#fp-sidecar input[type=file]").set_input_files(str(sidecar))
    page.wait_for_function("document.querySelector('#fp-prompt textarea').value === 'a woman dancing'")
    assert page.locator("#fp-seed textarea, #fp-seed input").first.input_value() == "4242"
    # The form's steps come back from the sidecar, not from the 9 typed in before loading.
    assert json.loads(sidecar.read_text())["settings"]["steps"] == 3
    assert page.locator("#fp-steps input[type=number]").input_value() == "3"
    _shot(page, "6-settings-loaded")


def test_modes_loop_then_one_frame(page, server, image_file):
    _fill(page, image_file, "a top spins", seconds=1.2, steps=3)
    page.get_by_text("Modes: text-to-video, loop").click()
    page.locator("#fp-loop input[type=checkbox]").check()
    page.locator("#fp-generate").click()
    job, text = _progress(page, "done")
    assert "37 frames" in text, text
    sidecar = max(server.outputs.glob("*.json"), key=lambda p: p.stat().st_mtime)
    info = json.loads(sidecar.read_text())
    assert info["settings"]["loop"] is True and info["settings"]["steps"] == 3 and "loop_seam" in info

    page.locator("#fp-loop input[type=checkbox]").uncheck()
    page.locator("#fp-one-frame input[type=checkbox]").check()
    page.locator("#fp-generate").click()
    _, text = _progress(page, "done", job + 1)
    assert "one frame at time index 9" in text, text
    page.wait_for_function("document.querySelector('#fp-preview img')?.naturalWidth > 0", timeout=TIMEOUT)
    page.wait_for_selector("#fp-files a, #fp-files [download]")
    assert ".png" in page.locator("#fp-files").inner_text()
    png = max(server.outputs.glob("*.png"), key=lambda p: p.stat().st_mtime)
    assert json.loads(png.with_suffix(".json").read_text())["one_frame"]["index"] == 9
    page.wait_for_selector(f"#fp-gallery img[src*='{png.stem}']")  # the frame is in the gallery
    _shot(page, "7-one-frame")

    # Its settings load back, the mode included.
    page.locator("#fp-one-frame input[type=checkbox]").uncheck()
    page.locator("#fp-prompt textarea").fill("something else")
    page.get_by_text("Load settings of a finished video").click()
    page.locator("#fp-sidecar input[type=file]").set_input_files(str(png.with_suffix(".json")))
    page.wait_for_function("document.querySelector('#fp-prompt textarea').value === 'a top spins'")
    assert page.locator("#fp-one-frame input[type=checkbox]").is_checked()
    assert not page.locator("#fp-loop input[type=checkbox]").is_checked()


def test_cancel_a_running_job_then_resume_it(page, image_file, tmp_path):
    prompt = "a fox crosses a snowy field"
    _fill(page, image_file, prompt, seconds=4.8, steps=24)  # 4 sections
    page.locator("#fp-generate").click()
    first, _ = _progress(page, "running")
    text = _cancel_after_a_section(page, first)
    kept = re.search(r"kept (\d+) finished section", text)
    assert kept and 1 <= int(kept[1]) < 4, text

    # The cancelled job is listed as unfinished, with its sections done; Resume queues the rest.
    page.locator("#fp-resume-pick input").click()
    option = page.locator("[role=option]", has_text=prompt)
    assert f"{kept[1]}/4 sections done" in option.inner_text()
    option.click()
    _shot(page, "8-unfinished-job-picked")
    page.locator("#fp-resume-button").click()
    _, text = _progress(page, "done", first + 1)
    assert "145 frames" in text, text
    page.wait_for_selector("#fp-video video")
    playable = page.evaluate(
        """async () => {
            const v = document.querySelector('#fp-video video');
            v.muted = true;
            for (let i = 0; i < 100 && v.readyState < 2; i++) await new Promise(r => setTimeout(r, 100));
            await v.play();
            await new Promise(r => setTimeout(r, 400));
            return {ready: v.readyState, width: v.videoWidth, time: v.currentTime};
        }"""
    )
    assert playable["ready"] >= 2 and playable["width"] > 0 and playable["time"] > 0, playable
    assert _video_frames(page, tmp_path) == 4 * (WS * 4 + 1) - 3
    _shot(page, "9-resumed-done")
