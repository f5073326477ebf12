"""`framepack generate` refuses bad options before anything is created (issue 18): each is one
sentence and exit status 2, and the folder it was run in (its `--out` folder, present or not, an
`--events` file) is left exactly as it was: no job directory, no empty output folder."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from framepack.cli.main import main
from framepack.io import write_mp4
from framepack.testing import tiny_bundle_dir

REFUSED = [
    (["--shift", "0"], "shift must be a number from 0.01 to 1000"),
    (["--shift", "nan"], "shift must be"),
    (["--shift", "1e30"], "shift must be"),
    (["--resolution", "0"], "resolution must be a multiple of 16"),
    (["--one-frame-groups", "k2"], "--one-frame-groups is for one-frame mode"),
    (["--one-frame", "5", "--one-frame-groups", "bogus"], "unknown history group 'bogus'"),
    (["--one-frame", "5", "--end-image", "start.png", "--one-frame-groups", "k2"], "keep post in the groups"),
    (["--one-frame", "5", "--video", "clip.mp4"], "drop the video"),
    (["--video", "start.png"], "start.png is a still image, not a video to extend"),
    (["--video", "short.mp4"], "the video short.mp4 has only 20 frames; extending it takes at least 33"),
    (["--video", "nowhere.mp4"], "nowhere.mp4 does not exist"),
    (["--events", "missing/events.jsonl"], "cannot write the events file missing/events.jsonl"),
    (["--events", "folder"], "cannot write the events file folder"),
    (["--device", "meta"], "--device 'meta' cannot be used"),
    (["--model", "weightless"], "lacks its"),  # the settings are good: the load fails
]


def _tree(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*"))}


@pytest.fixture
def folder(tmp_path, image, monkeypatch) -> Path:
    Image.fromarray(image).save(tmp_path / "start.png")
    write_mp4(np.zeros((20, 64, 64, 3), np.uint8), tmp_path / "short.mp4", fps=24)
    (tmp_path / "folder").mkdir()
    (tmp_path / "weightless").mkdir()
    (tmp_path / "weightless" / "framepack.json").write_bytes(
        (tiny_bundle_dir() / "framepack.json").read_bytes()
    )
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("extra,needle", REFUSED, ids=[" ".join(r[0]) for r in REFUSED])
def test_refused_options_leave_the_folder_as_it_was(folder, capsys, extra, needle):
    args = ["generate", "--model", str(tiny_bundle_dir()), "--image", "start.png", "--prompt", "a cat",
            "--steps", "1", "--out", "out", "--events", "events.jsonl"]  # fmt: skip
    for i in range(0, len(extra), 2):  # later options replace earlier ones
        if extra[i] in args:
            args[args.index(extra[i]) + 1] = extra[i + 1]
        else:
            args += extra[i : i + 2]
    for out_exists in (False, True):  # the output folder absent, then present with a file in it
        if out_exists:
            (folder / "out").mkdir()
            (folder / "out" / "earlier.mp4").write_bytes(b"kept")
        before = _tree(folder)
        code = main(args)
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1, err
        assert lines[0].startswith("framepack: ") and needle.lower() in lines[0].lower(), lines[0]
        assert _tree(folder) == before
        assert (folder / "out").exists() == out_exists


def test_a_short_real_video_is_still_extended(folder, capsys):
    """One section's worth of frames is enough to extend (the forward order continues it)."""
    model = str(tiny_bundle_dir("forward"))
    frames = np.full((33, 64, 64, 3), (40, 60, 90), np.uint8)
    write_mp4(frames, folder / "clip.mp4", fps=24)
    args = ["generate", "--model", model, "--video", "clip.mp4", "--prompt", "it goes on", "--sections", "1",
            "--steps", "1", "--window", "9", "--out", "out", "--name", "longer"]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.strip() == os.path.join("out", "longer.mp4")


def test_serve_on_a_busy_port_names_the_port_and_the_option(tmp_path, capsys):
    """Refused before the bundle loads, in our words: Gradio's advice named its environment
    variable and `launch()`, not `--port`."""
    import socket

    model = str(tiny_bundle_dir())
    capsys.readouterr()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = main(["serve", "--model", model, "--port", str(port), "--outputs", str(tmp_path / "out")])
    taken = f"port {port} on 127.0.0.1 is in use by another program; choose a free one with --port."
    assert code == 2 and capsys.readouterr().err == f"framepack: {taken}\n"
    assert not (tmp_path / "out").exists()
