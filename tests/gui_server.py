"""Helpers for the GUI tests: a `framepack serve` subprocess and the system's Chromium."""

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
