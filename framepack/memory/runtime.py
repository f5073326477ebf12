"""The transformer's weights fitted to the device for one run, and what an allocation failure looks like.

`place_weights(model, device, ...)` detaches whatever an earlier run attached to the same model
(`hooks.release`), then plans and attaches weight streaming when a budget is given, or simply
(moves the model back to) the device. The step cache that rides on the same model, and the
record that lets the next run detach both, are `framepack.pipeline.speed`'s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .budgets import GIB, budget_bytes, default_reserve, parse_budget
from .disk import move_module
from .hooks import release
from .offload import Offloader, module_bytes
from .streaming import ByteLedger, WeightStreamer, plan_memory

__all__ = ["Placement", "is_out_of_memory", "place_weights"]


def is_out_of_memory(e: BaseException) -> bool:
    """True for a device (or host) allocation failure: `torch.OutOfMemoryError`, `MemoryError`,
    or a backend's RuntimeError that says "out of memory"."""
    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    return isinstance(e, (oom, MemoryError)) or (
        isinstance(e, RuntimeError) and "out of memory" in str(e).lower()
    )


@dataclass
class Placement:
    """Where `place_weights` put a model's weights for a run, and the bytes it counted."""

    model: nn.Module
    streamer: WeightStreamer | None = None
    ledger: ByteLedger | None = None
    counted: int = 0  # bytes of a resident model put on a shared ledger (offload.py)
    memory: Offloader | None = None  # the encoders' and the VAE's visits under the same budget

    @property
    def attached(self) -> bool:
        """Whether there is anything to detach (streaming, or bytes on a shared ledger)."""
        return self.streamer is not None or bool(self.counted)

    def info(self) -> dict:
        out: dict = {}
        if self.streamer is not None:
            out["memory_plan"] = self.streamer.plan.describe()
            out["weights_peak_gib"] = round(self.ledger.peak / GIB, 3)
        if self.ledger is not None:
            out["device_weights_peak_bytes"] = self.ledger.peak
        if self.memory is not None and self.memory.total is not None:
            out["offload"] = self.memory.describe()
        return out

    def detach(self) -> None:
        """The model gets back the very weights it had before, where it had them."""
        if self.streamer is not None:
            self.streamer.detach()
        if self.counted:
            self.ledger.remove(self.counted, "transformer")
            self.counted = 0


def place_weights(
    model: nn.Module,
    device: torch.device | str,
    vram_budget: str | float | None = None,
    fp8: bool = False,
    reserve: int | None = None,
    memory: Offloader | None = None,
    host_budget: int = 0,
    fp8_compute: bool = False,
) -> Placement:
    """Stream `model`'s weights under `vram_budget` (GiB or "auto"), else (move it back to) `device`.

    `reserve` bytes of the budget are kept for activations (default: `default_reserve`). With
    `memory` (`offload.plan_offload` for the same budget) the transformer gets the weight bytes the
    encoders and the VAE leave it, and its bytes go on `memory`'s ledger. `fp8_compute`: the plan
    counts the e4m3 weights resident blocks hold beside their own (`plan_memory`).
    """
    device = torch.device(device)
    total = budget_bytes(parse_budget(vram_budget), device, model)  # "auto" counts what it holds now
    release(model)  # an earlier run's streaming comes off: the weights are back where they were
    placed = Placement(model, memory=memory)
    if memory is not None and memory.total is not None:
        placed.ledger = memory.ledger
    fp8 = fp8 or fp8_compute
    if total is not None or fp8:
        if total is None:
            weights = None
        elif memory is not None and memory.total is not None:
            weights = memory.transformer_budget
        else:
            weights = total - (default_reserve(total, device) if reserve is None else reserve)
        plan = plan_memory(model, weights, fp8=fp8, fp8_compute=fp8_compute)
        if plan.streamed:
            placed.ledger = placed.ledger if placed.ledger is not None else ByteLedger(keep_events=False)
            placed.streamer = WeightStreamer(
                model, plan, device, placed.ledger, host_budget=host_budget
            ).attach()
    if placed.streamer is None:
        move_module(model, device)
        if placed.ledger is not None:
            placed.counted = module_bytes(model)
            placed.ledger.add(placed.counted, "transformer")
    return placed
