"""The GUI in a real browser (the system's Chromium, driven by Playwright) against `framepack serve`
on a tiny bundle: generate with a live preview and a playable video, the Queue tab's controls, the
prompt's timeline, a form that cannot be queued, loading settings back (and refusing files that are
not sidecars), presets, resuming. Screenshots go to test-artifacts/gui/; with
FRAMEPACK_DOCS_SCREENSHOTS=1 the tab screenshots also go to docs/ for the README."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
from gui_server import (
    ARTIFACTS,
    Server,
    cancel_after_a_section,
    chromium_path,
    fill_form,
    pick_option,
    play_video,
    show_tab,
    type_number,
    wait_note,
    wait_progress,
    wait_run_order,
    write_start_image,
)

from framepack.io import read_video
from framepack.testing import tiny_bundle_dir

playwright = pytest.importorskip("playwright.sync_api")

WS = 9
DOCS = Path(__file__).resolve().parent.parent / "docs"
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


def _video_frames(page, tmp_path) -> int:
    """Fetch the shown video through the server, decode it, return its frame count."""
    src = page.locator("#fp-video video").get_attribute("src")
    data = page.request.get(src).body()
    path = tmp_path / "shown.mp4"
    path.write_bytes(data)
    return read_video(path)[0].shape[0]


def test_generate_shows_the_preview_then_a_playable_video(page, image_file, tmp_path):
    fill_form(page, image_file, "a cat walks in the rain", seconds=2.4, steps=16)  # 2 sections
    page.locator("#fp-generate").click()
    page.wait_for_function(
        "document.querySelector('#fp-progress .fp-progress')?.dataset.state === 'running'"
        " && document.querySelector('#fp-preview img')?.naturalWidth > 0",
        timeout=TIMEOUT,
    )
    _shot(page, "1-running-with-preview")
    _, text = wait_progress(page, "done")
    assert re.search(r"done in .*: 73 frames \(2\.4 s of video\)", text), text
    page.wait_for_selector("#fp-files a, #fp-files [download]")
    _shot(page, "2-done")
    playable = play_video(page)
    assert playable["ready"] >= 2 and playable["width"] > 0 and playable["time"] > 0, playable
    assert abs(playable["duration"] - 73 / 30) < 0.1, playable
    assert _video_frames(page, tmp_path) == 4 * (WS * 2 + 1) - 3
    assert "mp4" in page.locator("#fp-files").inner_text()


def test_queue_a_second_job_and_cancel_both(page, image_file, tmp_path):
    fill_form(page, image_file, "a dog runs down the street", seconds=6, steps=30)  # 5 long sections
    page.locator("#fp-generate").click()
    first, _ = wait_progress(page, "running")
    page.locator("#fp-prompt textarea").fill("a man walks")
    page.locator("#fp-generate").click()
    second, text = wait_progress(page, "queued", first + 1)
    assert "queued" in text
    show_tab(page, "Queue")
    page.wait_for_selector(f"#fp-queue tr[data-job='{second}'][data-state='queued']")
    _shot(page, "3-second-job-queued")
    show_tab(page, "Generate")

    page.locator("#fp-cancel").click()  # the watched job: the queued one
    _, text = wait_progress(page, "cancelled", second)
    assert "before it started" in text
    show_tab(page, "Queue")
    page.wait_for_selector(f"#fp-queue tr[data-job='{second}'][data-state='cancelled']")
    show_tab(page, "Generate")

    page.locator("#fp-watch input").click()  # watch the running one again, and cancel it
    page.locator("[role=option]", has_text=f"#{first} ").click()
    text = cancel_after_a_section(page, first)
    kept = re.search(r"kept (\d+) finished section\(s\): (\d+) frames", text)
    assert kept and 1 <= int(kept[1]) < 5, text
    page.wait_for_selector("#fp-video video")
    _shot(page, "4-cancelled-keeps-finished-sections")
    assert _video_frames(page, tmp_path) == int(kept[2])


def _jobs_listed(page) -> int:
    """How many jobs the Queue tab lists, after a few of the page's ticks (0.5 s) have updated it."""
    show_tab(page, "Queue")
    page.wait_for_timeout(2000)
    count = page.locator("#fp-queue tr[data-job]").count()
    show_tab(page, "Generate")
    return count


def test_a_form_that_cannot_be_queued_says_why_beside_the_button_and_makes_no_job(page, image_file):
    before = _jobs_listed(page)
    fill_form(page, image_file, "   ", seconds=1.2, steps=4)  # an empty prompt
    page.locator("#fp-generate").click()
    assert "The prompt is empty" in wait_note(page, "fp-form-message", "error", "prompt is empty")
    page.locator("#fp-prompt textarea").fill("[1s-0.5s: a cat]")  # a timed prompt that cannot run
    assert "not after its start at 1 s" in page.locator("#fp-timeline [data-state='error']").inner_text()
    page.locator("#fp-generate").click()
    text = wait_note(page, "fp-form-message", "error", "not after its start at 1 s")
    assert text.endswith("ends at 0.5 s, not after its start at 1 s."), text
    _shot(page, "5-bad-input-error")
    page.wait_for_timeout(1500)  # a job, had one been made, would be listed by now
    assert _jobs_listed(page) == before
    assert page.locator("span.error").count() == 0  # no field is marked as failed

    page.locator("#fp-prompt textarea").fill("a cat walks")
    page.locator("#fp-generate").click()
    job, text = wait_progress(page, "done")
    assert "37 frames" in text
    assert page.locator("#fp-form-message").inner_text().strip() == ""  # the message is cleared
    show_tab(page, "Queue")
    page.wait_for_selector(f"#fp-queue tr[data-job='{job}'][data-state='done']")
    show_tab(page, "Finished")
    page.wait_for_selector("#fp-gallery video, #fp-gallery img")  # finished videos are listed


def test_settings_load_back_from_a_sidecar(page, server, image_file):
    fill_form(page, image_file, "a woman dancing", seconds=1.2, steps=3)
    page.locator("#fp-seed textarea, #fp-seed input").first.fill("4242")
    page.locator("#fp-generate").click()
    wait_progress(page, "done")
    sidecar = max(server.outputs.glob("*.json"), key=lambda p: p.stat().st_mtime)
    page.locator("#fp-prompt textarea").fill("something else")
    page.locator("#fp-seed textarea, #fp-seed input").first.fill("1")
    type_number(page, "fp-steps", 9)
    show_tab(page, "Finished")
    page.locator("#fp-sidecar input[type=file]").set_input_files(str(sidecar))
    wait_note(page, "fp-load-message", "ok", sidecar.name)
    page.wait_for_selector("#fp-tab-generate", state="visible")  # loading shows the form
    page.wait_for_function("document.querySelector('#fp-prompt textarea').value === 'a woman dancing'")
    assert page.locator("#fp-seed textarea, #fp-seed input").first.input_value() == "4242"
    # The form's steps come back from the sidecar, not from the 9 typed in before loading.
    assert json.loads(sidecar.read_text())["settings"]["steps"] == 3
    assert page.locator("#fp-steps input[type=number]").input_value() == "3"
    _shot(page, "6-settings-loaded")


def test_modes_loop_then_one_frame(page, server, image_file):
    fill_form(page, image_file, "a top spins", seconds=1.2, steps=3)
    page.get_by_text("Modes: text-to-video, loop").click()
    page.locator("#fp-loop input[type=checkbox]").check()
    page.locator("#fp-generate").click()
    job, text = wait_progress(page, "done")
    assert "37 frames" in text, text
    sidecar = max(server.outputs.glob("*.json"), key=lambda p: p.stat().st_mtime)
    info = json.loads(sidecar.read_text())
    assert info["settings"]["loop"] is True and info["settings"]["steps"] == 3 and "loop_seam" in info

    page.locator("#fp-loop input[type=checkbox]").uncheck()
    page.locator("#fp-one-frame input[type=checkbox]").check()
    page.locator("#fp-generate").click()
    _, text = wait_progress(page, "done", job + 1)
    assert "one frame at time index 9" in text, text
    page.wait_for_function("document.querySelector('#fp-preview img')?.naturalWidth > 0", timeout=TIMEOUT)
    page.wait_for_selector("#fp-files a, #fp-files [download]")
    assert ".png" in page.locator("#fp-files").inner_text()
    png = max(server.outputs.glob("*.png"), key=lambda p: p.stat().st_mtime)
    assert json.loads(png.with_suffix(".json").read_text())["one_frame"]["index"] == 9
    _shot(page, "7-one-frame")
    show_tab(page, "Finished")
    page.wait_for_selector(f"#fp-gallery img[src*='{png.stem}']")  # the frame is in the gallery

    # Its settings load back, the mode included: selected in the gallery, then Load.
    show_tab(page, "Generate")
    page.locator("#fp-one-frame input[type=checkbox]").uncheck()
    page.locator("#fp-prompt textarea").fill("something else")
    show_tab(page, "Finished")
    page.locator(f"#fp-gallery img[src*='{png.stem}']").first.click()
    page.locator("#fp-reuse").click()
    page.wait_for_selector("#fp-tab-generate", state="visible")
    page.wait_for_function("document.querySelector('#fp-prompt textarea').value === 'a top spins'")
    assert page.locator("#fp-one-frame input[type=checkbox]").is_checked()
    assert not page.locator("#fp-loop input[type=checkbox]").is_checked()


def test_cancel_a_running_job_then_resume_it(page, image_file, tmp_path):
    prompt = "a fox crosses a snowy field"
    fill_form(page, image_file, prompt, seconds=4.8, steps=24)  # 4 sections
    page.locator("#fp-generate").click()
    first, _ = wait_progress(page, "running")
    text = cancel_after_a_section(page, first)
    kept = re.search(r"kept (\d+) finished section", text)
    assert kept and 1 <= int(kept[1]) < 4, text

    # The cancelled job is listed as unfinished, with its sections done; Resume queues the rest.
    show_tab(page, "Queue")
    page.locator("#fp-resume-pick input").click()
    option = page.locator("[role=option]", has_text=prompt)
    assert f"{kept[1]}/4 sections done" in option.inner_text()
    option.click()
    _shot(page, "8-unfinished-job-picked")
    page.locator("#fp-resume-button").click()
    show_tab(page, "Generate")
    _, text = wait_progress(page, "done", first + 1)
    assert "145 frames" in text, text
    page.wait_for_selector("#fp-video video")
    playable = play_video(page)
    assert playable["ready"] >= 2 and playable["width"] > 0 and playable["time"] > 0, playable
    assert _video_frames(page, tmp_path) == 4 * (WS * 4 + 1) - 3
    _shot(page, "9-resumed-done")


def test_the_generate_button_stays_put_when_the_panels_open(page):
    assert [t.inner_text() for t in page.get_by_role("tab").all()] == [
        "Generate",
        "Queue",
        "Finished",
        "Settings",
    ]
    top = "document.querySelector('#fp-generate').getBoundingClientRect().top + window.scrollY"
    before = page.evaluate(top)
    page.get_by_text("More settings").click()
    page.get_by_text("Modes: text-to-video, loop").click()
    page.wait_for_selector("#fp-one-frame", state="visible")
    page.evaluate("window.scrollTo(0, 0)")
    assert page.evaluate(top) == before
    page.mouse.wheel(0, 1500)  # the button (and the live panel) stay in view while the form scrolls
    page.wait_for_function("window.scrollY > 500")
    box = page.locator("#fp-generate").bounding_box()
    assert 0 <= box["y"] < 100, box


def test_the_timeline_shows_each_sections_prompt_and_syntax_errors(page):
    page.locator("#fp-prompt textarea").fill("[0s: a cat sits] [2s: the cat walks away]")
    type_number(page, "fp-seconds", 4.8)  # 4 sections of 1.2 s
    page.wait_for_function("document.querySelector('#fp-timeline .fp-timeline')?.dataset.sections === '4'")
    sections = page.locator("#fp-timeline .fp-section")
    assert sections.evaluate_all("els => els.map(e => e.dataset.prompt)") == ["0", "0", "1", "1"]
    assert (
        "2.4-3.6 s" in sections.nth(2).inner_text() and "the cat walks away" in sections.nth(2).inner_text()
    )
    assert "4 sections, 2 prompts, 4.8 s" in page.locator("#fp-timeline").inner_text()

    page.locator("#fp-prompt textarea").fill("[0s: a cat sits] [2s the cat")
    error = page.locator("#fp-timeline .fp-timeline[data-state='error']")
    error.wait_for()
    assert "is not closed" in error.inner_text()
    page.locator("#fp-prompt textarea").fill("[0s: a cat sits] [9s: the cat walks away]")
    page.wait_for_function(
        "document.querySelector('#fp-timeline').innerText.includes('starts at 9 s, outside the 4.8 s video')"
    )


def test_a_random_seed_per_job_is_shown_and_recorded(page, server, image_file):
    fill_form(page, image_file, "a bird flies", seconds=1.2, steps=2)
    seed_box = page.locator("#fp-seed textarea, #fp-seed input").first
    seed_box.fill("7")
    page.locator("#fp-random-seed input[type=checkbox]").check()
    seeds = []
    for _ in range(2):
        page.locator("#fp-generate").click()
        job, _ = wait_progress(page, "done", None if not seeds else seeds[-1][0] + 1)
        seeds.append((job, seed_box.input_value()))
        sidecar = max(server.outputs.glob("*.json"), key=lambda p: p.stat().st_mtime)
        assert str(json.loads(sidecar.read_text())["settings"]["seed"]) == seeds[-1][1]
    assert seeds[0][1] != "7" and seeds[0][1] != seeds[1][1], seeds
    assert seeds[1][1].isdigit()


def test_the_queue_tab_reorders_removes_cancels_and_clears(page, image_file):
    fill_form(page, image_file, "a long walk", seconds=30, steps=30)  # 25 sections: it runs to the end
    page.locator("#fp-generate").click()
    first, _ = wait_progress(page, "running")
    for prompt in ("the second job", "the third job"):
        page.locator("#fp-prompt textarea").fill(prompt)
        page.locator("#fp-generate").click()
    second, third = first + 1, first + 2
    wait_progress(page, "queued", third)
    show_tab(page, "Queue")
    # The running job's progress and latent preview show on this tab too.
    page.wait_for_function(
        f"document.querySelector('#fp-queue-running .fp-progress')?.dataset.job === '{first}'"
        " && document.querySelector('#fp-queue-preview img')?.naturalWidth > 0"
    )
    wait_run_order(page, [first, second, third])
    # Each job has the prompt of the moment its Generate was pressed, though the next was typed at once.
    assert "the second job" in page.locator(f"#fp-queue tr[data-job='{second}']").inner_text()
    assert "the third job" in page.locator(f"#fp-queue tr[data-job='{third}']").inner_text()
    pick_option(page, "fp-queue-pick", f"#{third} ")
    page.locator("#fp-queue-up").click()
    wait_note(page, "fp-queue-message", "ok", f"Moved job #{third} up.")
    wait_run_order(page, [first, third, second])
    page.locator("#fp-queue-up").click()
    wait_note(page, "fp-queue-message", "error", "already next in line")
    page.locator("#fp-queue-down").click()
    wait_run_order(page, [first, second, third])

    pick_option(page, "fp-queue-pick", f"#{first} ")
    page.locator("#fp-queue-remove").click()
    wait_note(page, "fp-queue-message", "error", f"Job #{first} is running; cancel it first.")
    pick_option(page, "fp-queue-pick", f"#{second} ")
    page.locator("#fp-queue-remove").click()
    wait_run_order(page, [first, third])
    page.wait_for_selector(f"#fp-queue tr[data-job='{second}']", state="detached")
    pick_option(page, "fp-queue-pick", f"#{third} ")
    page.locator("#fp-queue-cancel").click()
    page.wait_for_selector(f"#fp-queue tr[data-job='{third}'][data-state='cancelled']")
    pick_option(page, "fp-queue-pick", f"#{first} ")
    page.locator("#fp-queue-cancel").click()
    page.wait_for_selector(f"#fp-queue tr[data-job='{first}'][data-state='cancelled']")
    page.wait_for_selector("#fp-queue-running .fp-progress[data-state='none']")
    page.wait_for_selector("#fp-queue-order .fp-order[data-empty='1']")

    page.locator("#fp-queue-clear").click()
    wait_note(page, "fp-queue-message", "ok", "Cleared")
    page.wait_for_selector(f"#fp-queue tr[data-job='{first}']", state="detached")
    assert page.locator("#fp-queue tr[data-job][data-state='cancelled']").count() == 0


def test_presets_save_load_and_delete(page, server):
    page.locator("#fp-prompt textarea").fill("a preset prompt")
    page.get_by_text("More settings").click()
    type_number(page, "fp-steps", 7)
    page.locator("#fp-random-seed input[type=checkbox]").check()
    show_tab(page, "Settings")
    name_box = page.locator("#fp-preset-name textarea, #fp-preset-name input").first
    name_box.fill("../escape")
    page.locator("#fp-preset-save").click()
    assert "not a plain file name" in wait_note(page, "fp-preset-message", "error", "plain file name")
    assert not (server.outputs / "escape.json").exists()
    name_box.fill("slow walk")
    page.locator("#fp-preset-save").click()
    wait_note(page, "fp-preset-message", "ok", "Saved the preset 'slow walk'.")
    saved = json.loads((server.outputs / "presets" / "slow walk.json").read_text())
    assert saved["prompt"] == "a preset prompt" and saved["steps"] == 7 and saved["random_seed"] is True
    assert "image" not in saved  # uploads belong to one video

    show_tab(page, "Generate")
    page.locator("#fp-prompt textarea").fill("something else")
    type_number(page, "fp-steps", 20)
    page.locator("#fp-random-seed input[type=checkbox]").uncheck()
    show_tab(page, "Settings")
    pick_option(page, "fp-preset-pick", "slow walk")
    page.locator("#fp-preset-load").click()
    page.wait_for_selector("#fp-tab-generate", state="visible")  # loading shows the form
    page.wait_for_function("document.querySelector('#fp-prompt textarea').value === 'a preset prompt'")
    assert page.locator("#fp-steps input[type=number]").input_value() == "7"
    assert page.locator("#fp-random-seed input[type=checkbox]").is_checked()

    show_tab(page, "Settings")
    pick_option(page, "fp-preset-pick", "slow walk")
    page.locator("#fp-preset-delete").click()
    wait_note(page, "fp-preset-message", "ok", "Deleted the preset 'slow walk'.")
    assert not (server.outputs / "presets" / "slow walk.json").exists()
    page.locator("#fp-preset-pick input").click()
    assert page.locator("[role=option]", has_text="slow walk").count() == 0


@pytest.mark.parametrize(
    "content, needle",
    [
        ({"notes": "not settings"}, "is not a FramePack sidecar"),
        ({"settings": {"prompt": "x", "loras": ["path"]}}, "loras are not a list of [path, scale] pairs"),
        ({"settings": {"prompt": "x", "steps": "many"}}, "values of the wrong kind"),
    ],
)
def test_loading_a_file_that_is_not_a_sidecar_leaves_the_form_alone(page, tmp_path, content, needle):
    page.locator("#fp-prompt textarea").fill("keep me")
    path = tmp_path / "not-a-sidecar.json"
    path.write_text(json.dumps(content))
    show_tab(page, "Finished")
    page.locator("#fp-sidecar input[type=file]").set_input_files(str(path))
    text = wait_note(page, "fp-load-message", "error", needle)
    assert text.endswith("The form is unchanged.") and "Traceback" not in text, text
    page.wait_for_timeout(500)
    assert page.locator("span.error").count() == 0  # no field is marked as failed
    show_tab(page, "Generate")
    assert page.locator("#fp-prompt textarea").input_value() == "keep me"
    assert page.locator("span.error").count() == 0
    _shot(page, "10-not-a-sidecar")


def _docs_shot(page, name: str) -> None:
    """A tab's screenshot, for the README when FRAMEPACK_DOCS_SCREENSHOTS=1."""
    path = ARTIFACTS / f"gui-{name}.png"
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("FRAMEPACK_DOCS_SCREENSHOTS"):
        shutil.copyfile(path, DOCS / path.name)


def test_screenshots_of_each_tab(browser, server, image_file):
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT)
    page.goto(server.url)
    page.wait_for_selector("#fp-generate")
    fill_form(page, image_file, "The cat sits down and looks around.", seconds=2.4, steps=3)
    page.locator("#fp-generate").click()
    done, _ = wait_progress(page, "done")
    type_number(page, "fp-seconds", 20)  # 17 sections: it runs until cancelled
    type_number(page, "fp-steps", 30)
    page.get_by_text("More settings").click()  # closed again, for a shorter page
    page.locator("#fp-prompt textarea").fill("[0s: The cat sits.] [8s: The cat walks away.]")
    page.locator("#fp-generate").click()
    page.locator("#fp-prompt textarea").fill("A dog runs along the beach.")
    page.locator("#fp-generate").click()
    page.wait_for_function(
        f"document.querySelector('#fp-progress .fp-progress')?.dataset.job === '{done + 2}'"
    )
    pick_option(page, "fp-watch", f"#{done + 1} ")
    page.wait_for_function(
        "document.querySelector('#fp-progress .fp-progress')?.dataset.state === 'running'"
        " && document.querySelector('#fp-preview img')?.naturalWidth > 0"
        " && document.querySelector('#fp-progress span').textContent.includes('so far')"
    )
    page.locator("#fp-prompt textarea").fill("[0s: The cat sits.] [8s: The cat walks away.]")
    page.wait_for_timeout(800)
    _docs_shot(page, "generate")
    show_tab(page, "Queue")
    page.wait_for_function("document.querySelector('#fp-queue-preview img')?.naturalWidth > 0")
    pick_option(page, "fp-queue-pick", f"#{done + 2} ")
    page.wait_for_timeout(800)  # the options list has faded out
    _docs_shot(page, "queue")
    for job in (done + 2, done + 1):
        pick_option(page, "fp-queue-pick", f"#{job} ")
        page.locator("#fp-queue-cancel").click()
        page.wait_for_selector(f"#fp-queue tr[data-job='{job}'][data-state='cancelled']")
    show_tab(page, "Finished")
    page.locator("#fp-gallery video, #fp-gallery img").first.click()
    page.wait_for_timeout(1500)
    _docs_shot(page, "finished")
    show_tab(page, "Settings")
    page.locator("#fp-preset-name textarea, #fp-preset-name input").first.fill("docs example")
    page.locator("#fp-preset-save").click()
    wait_note(page, "fp-preset-message", "ok", "docs example")
    _docs_shot(page, "settings")
    page.locator("#fp-preset-delete").click()
    wait_note(page, "fp-preset-message", "ok", "Deleted")
    context.close()
    for name in ("generate", "queue", "finished", "settings"):
        assert (ARTIFACTS / f"gui-{name}.png").stat().st_size < 600_000
