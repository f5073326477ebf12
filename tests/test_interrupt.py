"""Ctrl-C stops `framepack` at every moment (issue 18): exit status 130 and one sentence, even when
the KeyboardInterrupt lands in a finalizer (which Python prints as "Exception ignored" and
drops) or in a library that turns it into its own error."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from framepack.cli.common import UserError, run_command

DEMO = Path(__file__).resolve().parent.parent / "framepack" / "demo_model"


class _Finalized:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)  # the handler runs here, inside __del__
        sum(range(1000))


def test_an_interrupt_inside_a_finalizer_still_stops_the_command(capsys):
    ran_on = []

    def command(args):
        _Finalized()
        gc.collect()
        for _ in range(100):  # the rest of the command: a moment is enough to stop it
            time.sleep(0.01)
        ran_on.append("end")

    assert run_command(command, None) == 130
    err = capsys.readouterr().err
    assert err == "framepack: interrupted.\n" and ran_on == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back


def test_an_interrupt_a_library_turns_into_its_error_is_still_an_interrupt(capsys):
    def command(args):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        except BaseException as e:  # noqa: BLE001 - as a loader that wraps every failure
            raise UserError(f"the vae component could not be loaded ({type(e).__name__}).") from None

    assert run_command(command, None) == 130
    assert capsys.readouterr().err == "framepack: interrupted.\n"


def _state(pid: int) -> str:
    """The files a process has mapped or open: how far its loading has got."""
    try:
        text = Path(f"/proc/{pid}/maps").read_text()
        text += " ".join(os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd"))
    except OSError:  # it went on (a file closed) or ended meanwhile
        return ""
    return text


# Moments of `framepack generate`'s start: torch imported, then each component's weights loading.
MOMENTS = [
    "libtorch_cpu",
    f"{DEMO / 'text_encoder'}/",
    f"{DEMO / 'image_encoder'}/",
    f"{DEMO / 'vae'}/",
    f"{DEMO / 'transformer'}/",
]


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads a process's progress from /proc")
@pytest.mark.parametrize(
    "moment", MOMENTS, ids=["imports", "text_encoder", "image_encoder", "vae", "transformer"]
)
def test_ctrl_c_while_loading_stops_with_130(tmp_path, moment):
    image = next(iter(sorted((DEMO / "examples").glob("*.png"))))
    cmd = [sys.executable, "-m", "framepack", "generate", "--image", str(image), "--prompt", "a red circle",
           "--sections", "1", "--steps", "2", "--out", str(tmp_path / "out")]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while moment not in _state(proc.pid):
            assert proc.poll() is None and time.monotonic() < deadline, f"never reached {moment}"
            time.sleep(0.002)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "Exception ignored" not in err, err[-3000:]
    # "interrupted." while loading; on a slow machine the transformer's weights may still be seen
    # once the run has begun, which says where the video so far is.
    assert err.strip().splitlines()[-1].startswith("framepack: interrupted"), err[-3000:]
    assert out == ""
