"""Helpers for the GUI tests: a `framepack serve` subprocess, the system's Chromium, and the
steps a browser test takes on the page (Playwright pages)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "gui"


def write_start_image(path: Path) -> str:
    """A 64x96 start image (a coloured square on black) for the GUI tests; returns its path."""
    import numpy as np
    from PIL import Image

    img = np.zeros((64, 96, 3), np.uint8)
    img[16:48, 24:56] = (220, 120, 40)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chromium_path() -> str:
    """The system Chromium (Debian's `chromium`), or skip; CI sets FRAMEPACK_REQUIRE_BROWSER=1 to fail."""
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name) if name else None
        if path:
            return path
    if os.environ.get("FRAMEPACK_REQUIRE_BROWSER"):
        raise RuntimeError("no chromium executable found (apt-get install -y chromium).")
    pytest.skip("no chromium executable (apt-get install -y chromium)")


class Server:
    """`framepack serve` in a subprocess on a free loopback port; stopped by `close()`."""

    def __init__(
        self, model: Path, outputs: Path, *extra: str, port: int | None = None, timeout: float = 120
    ):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.outputs = outputs
        self.log = outputs.parent / f"serve-{self.port}.log"
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
            "GRADIO_ANALYTICS_ENABLED": "False",
        }
        cmd = [sys.executable, "-m", "framepack", "serve", "--model", str(model), "--outputs", str(outputs)]
        cmd += ["--port", str(self.port), "--device", "cpu", *extra]
        self._log_file = open(self.log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log_file, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"framepack serve exited with {self.proc.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(self.url + "/", timeout=2) as r:
                    if r.status == 200:
                        break
            except urllib.error.HTTPError:
                break  # it answers (e.g. 401 with --auth)
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"framepack serve did not answer within {timeout} s:\n{self.output()}")
            time.sleep(0.3)

    def output(self) -> str:
        if not self._log_file.closed:
            self._log_file.flush()
        return self.log.read_text(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()


# ------------------------------------------------------------------ steps on the page (Playwright)
def type_number(page, elem_id: str, value: float) -> None:
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


def show_tab(page, name: str) -> None:
    """Show the page's tab `name` (Generate, Queue, Finished, Settings)."""
    page.get_by_role("tab", name=name).click()
    page.wait_for_selector(f"#fp-tab-{name.lower()}", state="visible")


def pick_option(page, elem_id: str, text: str) -> None:
    """Choose the option of dropdown `elem_id` whose label holds `text`."""
    page.locator(f"#{elem_id} input").click()
    page.locator("[role=option]", has_text=text).first.click()


def wait_note(page, elem_id: str, kind: str, text: str) -> str:
    """Wait until the message line `elem_id` says `text` (as a `kind` message); its text. (The line
    may be on a tab that is not shown: loading settings switches to the Generate tab.)"""
    note = page.locator(f"#{elem_id} .fp-note[data-kind='{kind}']", has_text=text)
    note.wait_for(state="attached")
    return note.text_content()


def wait_run_order(page, jobs: list[int]) -> None:
    """Wait until the Queue tab's run order lists `jobs` (running first, then queued, in order)."""
    page.wait_for_function(
        "want => JSON.stringify([...document.querySelectorAll('#fp-queue-order li')]"
        ".map(li => +li.dataset.job).filter(id => want.includes(id))) === JSON.stringify(want)",
        arg=jobs,
    )


def fill_form(page, image_file: str, prompt: str, seconds: float, steps: int) -> None:
    """On the Generate tab: the start image (unless one is there), the prompt, seconds and steps."""
    if not page.locator("#fp-image img").count():
        page.locator("#fp-image input[type=file]").set_input_files(image_file)
        page.wait_for_selector("#fp-image img")
    page.locator("#fp-prompt textarea").fill(prompt)
    type_number(page, "fp-seconds", seconds)
    if not page.locator("#fp-steps").is_visible():
        page.get_by_text("More settings").click()
    type_number(page, "fp-steps", steps)


def wait_progress(page, state: str, job: int | None = None) -> tuple[int, str]:
    """Wait until the watched job (`job`, or any) is in `state`; its id and progress line."""
    where = f"[data-job='{job}']" if job is not None else ""
    page.wait_for_selector(f"#fp-progress .fp-progress{where}[data-state='{state}']")
    el = page.locator("#fp-progress .fp-progress")
    return int(el.get_attribute("data-job")), el.locator("span").inner_text()


def cancel_after_a_section(page, job: int) -> str:
    """Wait until the watched job `job` has finished a section, press Stop; its final progress text."""
    page.wait_for_function(
        f"document.querySelector('#fp-progress .fp-progress[data-job=\"{job}\"] span')"
        "?.textContent.includes('frames')",
    )
    page.locator("#fp-cancel").click()
    return wait_progress(page, "cancelled", job)[1]


def play_video(page) -> dict:
    """Play the panel's video (muted) for a moment; its readyState, width, duration and time."""
    return page.evaluate(
        """async () => {
            const v = document.querySelector('#fp-video video');
            v.muted = true;
            for (let i = 0; i < 100 && v.readyState < 2; i++) await new Promise(r => setTimeout(r, 100));
            await v.play();
            await new Promise(r => setTimeout(r, 400));
            return {ready: v.readyState, width: v.videoWidth, duration: v.duration, time: v.currentTime};
        }"""
    )
