"""Output names: `name` is a plain file name in every front end (the CLI's `--name`, the Python
API, the GUI's job queue, batch jobs), checked by one function, `framepack.io.check_file_name`.
Anything else is one sentence naming the value, and nothing is written anywhere."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import framepack
from framepack.cli.main import main
from framepack.gui.jobs import FAILED, QUEUE_FILE
from framepack.io import MAX_NAME_BYTES, InputError, check_file_name
from framepack.pipeline.batch import read_jobs
from framepack.pipeline.settings import GenerationSettings
from framepack.testing import tiny_bundle_dir

# Each escaped the output folder, or named no file, before the check.
BAD = ["../escape", "a/b", "", "a\\b", ".", "..", ".hidden", " x", "x\n", "x\x00y", "é" * 101]


@pytest.mark.parametrize("name", BAD, ids=repr)
def test_check_file_name_refuses_what_is_not_a_plain_file_name(name):
    with pytest.raises(InputError) as e:
        check_file_name(name)
    message = str(e.value)
    assert message.startswith(f"the name {name[:40]!r}"[:-1]) and "is not a plain file name: use" in message
    assert message.endswith("at either end.") and "\n" not in message  # one sentence, the value escaped


def test_check_file_name_keeps_plain_names():
    for name in (
        "clip",
        "a cat, walking (v2)",
        "framepack_20250101-120000_5",
        "é" * 100,
        "x" * MAX_NAME_BYTES,
    ):
        assert check_file_name(name) == name
    with pytest.raises(InputError, match="the name 5 is not"):
        check_file_name(5)
    with pytest.raises(InputError, match=re.escape("'xxxxxxxxxx")) as e:
        check_file_name("x" * (MAX_NAME_BYTES + 1))
    assert len(str(e.value)) < 200  # a long name is shortened in the message


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if not p.is_dir()]


@pytest.mark.parametrize("name", ["../escape", "a/b", ""], ids=repr)
def test_cli_refuses_the_name_before_loading_and_writes_nothing(name, tmp_path, capsys):
    out = tmp_path / "deep" / "out"  # ../escape wrote two levels up from the folder
    code = main(["generate", "--prompt", "a cat", "--sections", "1", "--steps", "1"] + ["--out", str(out)] + ["--name", name])  # fmt: skip
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"framepack: the name {name!r} is not a plain file name: use 1 to 200 bytes")
    assert not _files(tmp_path) and not out.exists()


def test_api_refuses_the_name(image, tmp_path):
    out = tmp_path / "deep" / "out"
    with pytest.raises(InputError, match=re.escape("the name '../x' is not a plain file name")):
        framepack.generate(
            tiny_bundle_dir(), out, image=image, prompt="a cat", sections=1, steps=1, name="../x"
        )
    assert not _files(tmp_path)


def test_gui_queue_refuses_the_name_and_queues_nothing(queue, image, tmp_path):
    settings = GenerationSettings(prompt="a cat", sections=1, steps=1, name="../x")
    job = queue.submit(settings, image=image)
    assert job.state == FAILED and job.started is None and queue.position(job.id) is None
    assert job.error.startswith("the name '../x' is not a plain file name:") and "\n" not in job.error
    # Nothing but the queue's own job numbering (which survives a restart) is written.
    assert [j.id for j in queue.jobs()] == [job.id] and [p.name for p in _files(tmp_path)] == [QUEUE_FILE]


@pytest.mark.parametrize("name", ["../x", "a\\b", "", " x", ".."], ids=repr)
def test_batch_refuses_the_name_with_its_line(name, tmp_path):
    (tmp_path / "jobs.jsonl").write_text(
        '{"prompt": "fine"}\n' + json.dumps({"prompt": "a", "name": name}) + "\n"
    )
    with pytest.raises(ValueError, match=r"^jobs\.jsonl line 2: the name .* is not a plain file name"):
        read_jobs(tmp_path / "jobs.jsonl")
