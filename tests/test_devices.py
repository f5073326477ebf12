"""`resolve_device`: the one reading of a user's device name, for every front end."""

from __future__ import annotations

import pytest
import torch

from framepack.devices import resolve_device


def test_auto_is_the_gpu_when_torch_sees_one_else_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu" and resolve_device("auto", rank=1) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == "cuda"
    assert resolve_device("auto", rank=3) == "cuda:1"  # a torchrun process's own GPU


def test_a_name_torch_knows_is_kept_and_any_other_is_one_sentence(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cpu") == "cpu" and resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(ValueError, match=r"^--device 'gpu' is not a device name such as cpu or cuda\.$"):
        resolve_device("gpu")
    with pytest.raises(ValueError, match=r"^device 'gpu' is not"):
        resolve_device("gpu", what="device")


def test_a_device_this_torch_cannot_use_is_one_sentence(monkeypatch):
    """Issue 18: `--device cuda` on a torch without CUDA was torch's AssertionError, later."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: False)
    with pytest.raises(
        ValueError, match=r"^--device 'cuda' cannot be used: this torch was built without CUDA"
    ):
        resolve_device("cuda")
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    with pytest.raises(ValueError, match=r"^device 'cuda:0' cannot be used: torch sees no CUDA GPU here\.$"):
        resolve_device("cuda:0", what="device")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match=r"torch sees 2 CUDA GPUs here \(cuda:0 to cuda:1\)\.$"):
        resolve_device("cuda:2")
    with pytest.raises(ValueError, match=r"^--device 'meta' cannot be used"):
        resolve_device("meta")


def test_cli_refuses_a_device_this_torch_cannot_use(monkeypatch, capsys, tmp_path):
    """In the command line the refusal is one sentence and exit status 2, before any loading."""
    from framepack.cli.main import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: False)
    monkeypatch.chdir(tmp_path)
    code = main(["generate", "--prompt", "a cat", "--sections", "1", "--device", "cuda", "--out", "out"])
    err = capsys.readouterr().err
    assert (
        code == 2
        and err.startswith("framepack: --device 'cuda' cannot be used")
        and len(err.splitlines()) == 1
    )
    assert not (tmp_path / "out").exists()
