"""The same model call on every rank: rank 0 runs the pipeline, the others only serve its calls.

Rank 0's `model.forward_packed` is wrapped (`Leader`, an instance attribute removed again by
`detach`): before each call it broadcasts the call's arguments (a pickled structure, then each
tensor by `dist.broadcast` on the group's device). Every other rank waits in `serve(model)`,
calls its own copy of the model with what arrives, and returns when rank 0 says stop. With
`SequenceParallel` attached on every rank, each call is split across them; rank 0 alone encodes,
decodes and writes. Rank 0 also says when a section starts (`Leader.new_section`), so that
every rank's step caches count the same steps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = ["Leader", "broadcast_call", "group_device", "leader_of", "receive_call", "serve"]

_STOP = "stop"


class _Section(NamedTuple):
    """A new section: the step caches start again (`StepCache.reset(steps, branches)`)."""

    steps: int
    branches: int


class _Slot(NamedTuple):
    """Where a tensor was in the structure: its index in the broadcast order, dtype and shape."""

    index: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def group_device(group=None) -> torch.device:
    """The device a collective of `group` works on: this rank's GPU for NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _map(obj, leaf):
    """`obj` rebuilt with `leaf(x)` for every tensor and `_Slot` in it (lists, tuples, dicts and
    dataclasses such as `HistoryGroup` are walked; anything else is kept)."""
    if isinstance(obj, (torch.Tensor, _Slot)):
        return leaf(obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map(o, leaf) for o in obj)
    if isinstance(obj, dict):
        return {k: _map(v, leaf) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = {f.name: _map(getattr(obj, f.name), leaf) for f in dataclasses.fields(obj)}
        return dataclasses.replace(obj, **fields)
    return obj


def _source(group) -> int:
    """The global rank of `group`'s rank 0."""
    return 0 if group is None else dist.get_global_rank(group, 0)


def _send_tensor(t: torch.Tensor, device: torch.device, src: int, group) -> None:
    wire = t.detach().to(device, torch.uint8 if t.dtype == torch.bool else t.dtype).contiguous()
    dist.broadcast(wire, src, group=group)


def _receive_tensor(slot: _Slot, device: torch.device, src: int, group) -> torch.Tensor:
    wire = torch.empty(
        slot.shape, dtype=torch.uint8 if slot.dtype == torch.bool else slot.dtype, device=device
    )
    dist.broadcast(wire, src, group=group)
    return wire.bool() if slot.dtype == torch.bool else wire


def broadcast_call(args: tuple, kwargs: dict, group=None) -> None:
    """Rank 0: send one call's `(args, kwargs)` to the other ranks of `group`."""
    tensors: list[torch.Tensor] = []

    def slot(t: torch.Tensor) -> _Slot:
        tensors.append(t)
        return _Slot(len(tensors) - 1, t.dtype, tuple(t.shape))

    structure = _map((args, kwargs), slot)
    src, device = _source(group), group_device(group)
    dist.broadcast_object_list([structure], src, group=group)
    for t in tensors:
        _send_tensor(t, device, src, group)


def _broadcast_stop(group=None) -> None:
    src = _source(group)
    dist.broadcast_object_list([_STOP], src, group=group)
    dist.barrier(group=group)  # every rank has the stop before any may tear the group down


def receive_call(group=None) -> tuple[tuple, dict] | _Section | None:
    """Another rank: the next call rank 0 sends (tensors on the group's device), a new section
    (`steps`, `branches`), or None for stop."""
    src, device = _source(group), group_device(group)
    box = [None]
    dist.broadcast_object_list(box, src, group=group)
    if isinstance(box[0], _Section):
        return box[0]
    if box[0] == _STOP:
        dist.barrier(group=group)  # the other half of `_broadcast_stop`'s
        return None
    slots: list[_Slot] = []
    _map(box[0], slots.append)
    tensors = [_receive_tensor(s, device, src, group) for s in sorted(slots, key=lambda s: s.index)]
    return _map(box[0], lambda s: tensors[s.index])


def serve(model: nn.Module, group=None, on_section: Callable[[int, int], None] | None = None) -> int:
    """Another rank: run rank 0's calls on `model` until it says stop; returns how many ran.
    `on_section(steps, branches)` follows rank 0's `Leader.new_section` (its step caches' reset)."""
    calls = 0
    while (call := receive_call(group)) is not None:
        if isinstance(call, _Section):
            if on_section is not None:
                on_section(call.steps, call.branches)
            continue
        args, kwargs = call
        with torch.no_grad():
            model.forward_packed(*args, **kwargs)
        calls += 1
    return calls


def leader_of(model: nn.Module) -> Leader | None:
    """The `Leader` wrapping `model`'s calls (rank 0 of several), else None."""
    return getattr(model.__dict__.get("forward_packed"), "leader", None)


class Leader:
    """Rank 0: `model.forward_packed` broadcasts each call to the other ranks before running it.

    `stop()` (also on `detach`, once) releases the ranks waiting in `serve`.
    """

    def __init__(self, model: nn.Module, group=None) -> None:
        self.model, self.group, self.stopped = model, group, False
        if "forward_packed" in model.__dict__:
            raise ValueError("the model's forward_packed is already wrapped.")
        original = type(model).forward_packed.__get__(model)

        def forward_packed(*args, **kwargs):
            broadcast_call(args, kwargs, group)
            return original(*args, **kwargs)

        forward_packed.leader = self  # `leader_of`
        model.__dict__["forward_packed"] = forward_packed

    def new_section(self, steps: int, branches: int) -> None:
        """A new section of `steps` steps, `branches` calls per step: the serving ranks' step caches
        start again with rank 0's (`serve`'s `on_section`)."""
        dist.broadcast_object_list([_Section(steps, branches)], _source(self.group), group=self.group)

    def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            _broadcast_stop(self.group)

    def detach(self) -> None:
        self.model.__dict__.pop("forward_packed", None)
        self.stop()
