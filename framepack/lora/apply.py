"""Applying LoRAs to the packed transformer: merged into the weights, or on the fly.

On the fly, each adapted Linear layer gets a `LoraDelta` in its `lora` slot that adds
`sum_i s_i * up_i @ (down_i @ x)` to the layer's output; the base weights are never touched and
`remove()` restores the model exactly. The blocks' fused MLP reads its weights raw, so it asks
the slot for the update too (`framepack.model.layers.lora_delta`), and the single-stream block's
`proj_out` applies the update to its attention and MLP column halves separately.
Merging folds `s * scale * up @ down` into the weights (in fp32, stored back in the weights'
dtype): nothing is computed per step, but the base weights are changed.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn as nn

from ..model.ops import linear
from .formats import Lora, lora_targets, read_lora

__all__ = [
    "LoraDelta",
    "AttachedLoras",
    "attach_loras",
    "applied_loras",
    "merge_loras",
    "parse_lora_arg",
    "lora_specs",
    "load_loras",
]

LoraList = Sequence[tuple[Lora, float]]


class LoraDelta(nn.Module):
    """The low-rank updates of one Linear layer, applied to its input: `(..., in) -> (..., out)`.

    Several LoRAs are stacked into one pair of factors, `down (R, in)` and `up (out, R)` with each
    LoRA's scale folded into its rows of `up` (fp32 product, then the weights' dtype), so applying
    them costs two thin matrix products whatever their number. The factors are non-persistent
    buffers (they move with the model and stay out of its state dict) and follow the input to its
    device and dtype when a streaming hook keeps them elsewhere.
    """

    def __init__(self, updates: Sequence[tuple[torch.Tensor, torch.Tensor, float]]) -> None:
        super().__init__()
        dtype = updates[0][0].dtype  # the layer's
        down = torch.cat([d for d, _, _ in updates], dim=0)  # (R, in)
        up = torch.cat([u.float() * float(s) for _, u, s in updates], dim=1).to(dtype)  # (out, R)
        self.register_buffer("down", down, persistent=False)
        self.register_buffer("up", up, persistent=False)

    def _update(self, x: torch.Tensor, cols: slice = slice(None)) -> torch.Tensor:
        down = self.down[:, cols].to(x.device, x.dtype)
        up = self.up.to(x.device, x.dtype)
        return linear(linear(x, down, None), up, None)  # (..., R) -> (..., out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._update(x)

    def columns(self, start: int, stop: int | None):
        """The update restricted to input columns `start:stop` (for a layer fed in two halves)."""
        return lambda x: self._update(x, slice(start, stop))


class AttachedLoras:
    """LoRAs applied on the fly; `remove()` (or leaving `applied_loras`) takes them off."""

    def __init__(self, layers: dict[str, nn.Module]) -> None:
        self._layers = layers

    @property
    def layers(self) -> list[str]:
        return sorted(self._layers)

    def remove(self) -> None:
        for layer in self._layers.values():
            layer._modules.pop("lora", None)
        self._layers = {}


def _per_layer(
    model: nn.Module, loras: LoraList
) -> dict[str, list[tuple[torch.Tensor, torch.Tensor, float]]]:
    targets = lora_targets(model)
    out: dict[str, list] = {}
    for lora, weight in loras:
        for name, update in lora.layers.items():
            if name not in targets:
                raise ValueError(f"the LoRA {lora.path} was read for another model (no layer {name}).")
            out.setdefault(name, []).append((update.down, update.up, update.scale * float(weight)))
    return out


def attach_loras(model: nn.Module, loras: LoraList) -> AttachedLoras:
    """Apply `(lora, weight)` pairs on the fly; the base weights stay untouched."""
    targets = lora_targets(model)
    busy = [n for n, m in targets.items() if "lora" in m._modules]
    if busy:
        raise ValueError(f"the model already has LoRAs applied on the fly (at {busy[0]}); remove them first.")
    attached = {}
    for name, updates in _per_layer(model, loras).items():
        layer = targets[name]
        p = layer.weight
        updates = [(d.to(p.device, p.dtype), u.to(p.device), s) for d, u, s in updates]  # up: scaled first
        layer.lora = LoraDelta(updates)
        attached[name] = layer
    return AttachedLoras(attached)


@contextlib.contextmanager
def applied_loras(model: nn.Module, loras: LoraList) -> Iterator[AttachedLoras]:
    """`attach_loras` for the duration of a `with` block."""
    handle = attach_loras(model, loras)
    try:
        yield handle
    finally:
        handle.remove()


def merge_loras(model: nn.Module, loras: LoraList) -> None:
    """Fold `(lora, weight)` pairs into the model's weights, in place (not removable)."""
    targets = lora_targets(model)
    with torch.no_grad():
        for name, updates in _per_layer(model, loras).items():
            w = targets[name].weight
            total = w.float()
            for down, up, s in updates:
                total = total + (up.to(w.device).float() @ down.to(w.device).float()) * s
            w.copy_(total.to(w.dtype))


def parse_lora_arg(text: str) -> tuple[str, float]:
    """`FILE[:SCALE]` -> (file, scale); the scale defaults to 1."""
    path, sep, tail = text.rpartition(":")
    if sep and path:
        try:
            return path, float(tail)
        except ValueError:
            if Path(path).exists() and not Path(text).exists():
                raise ValueError(f"the LoRA scale {tail!r} after {path}: is not a number.") from None
    return text, 1.0


def lora_specs(value, where: str = "") -> tuple[tuple[str, float], ...]:
    """The LoRAs of a run as `(file, scale)` pairs, from any of the forms the front ends take:
    a list of `"FILE"`, `"FILE:SCALE"` (`parse_lora_arg`) or `(FILE, SCALE)` items (None: none).
    Anything else is a ValueError in one sentence, starting with `where` (where it came from).
    The scales and files are checked when they are used (`check_lora_spec`)."""
    lead = f"{where}: " if where else ""
    if value is None:
        return ()
    if isinstance(value, (str, os.PathLike)):
        raise ValueError(f"{lead}loras is a list of LoRAs, got the single {value!r}; put it in a list.")
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{lead}loras is a list of LoRAs, got {type(value).__name__} {value!r}.")
    out = []
    for item in value:
        if isinstance(item, (str, os.PathLike)) and os.fspath(item):
            path, scale = parse_lora_arg(os.fspath(item))
        elif (
            isinstance(item, (list, tuple))
            and len(item) == 2
            and isinstance(item[0], (str, os.PathLike))
            and os.fspath(item[0])
        ):
            path, scale = os.fspath(item[0]), item[1]
        else:
            raise ValueError(f'{lead}each LoRA is "FILE", "FILE:SCALE" or (FILE, SCALE), got {item!r}.')
        out.append((path, scale))
    return tuple(out)


def load_loras(
    model: nn.Module, specs: Sequence[tuple[str | os.PathLike, float]]
) -> list[tuple[Lora, float]]:
    """Read each `(path, scale)` for `model`, checking the scales; raises ValueError."""
    out = []
    for path, scale in specs:
        check_lora_spec(path, scale)
        out.append((read_lora(Path(path), model), float(scale)))
    return out


def check_lora_spec(path: str | os.PathLike, scale: float) -> None:
    """A LoRA's scale is a number from -10 to 10 and its path exists; raises ValueError."""
    if not isinstance(scale, (int, float)) or not -10 <= scale <= 10 or scale != scale:
        raise ValueError(f"the LoRA scale for {path} must be a number from -10 to 10, got {scale!r}.")
    if not Path(path).exists():
        raise ValueError(f"the LoRA {path} does not exist.")
