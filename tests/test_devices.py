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


def test_a_name_torch_knows_is_kept_and_any_other_is_one_sentence():
    assert resolve_device("cpu") == "cpu" and resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(ValueError, match=r"^--device 'gpu' is not a device name such as cpu or cuda\.$"):
        resolve_device("gpu")
    with pytest.raises(ValueError, match=r"^device 'gpu' is not"):
        resolve_device("gpu", what="device")
