"""Memory budgets in bytes: a budget as a person gives it (GiB, "auto", none), and the bytes a
module holds. The planners (`streaming`, `offload`) and the run's checks (`framepack.pipeline.budget`)
work in these units.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn

from .disk import available_ram

__all__ = [
    "GIB",
    "RAM_MARGIN",
    "budget_bytes",
    "default_reserve",
    "format_bytes",
    "module_tensors",
    "parse_budget",
    "ram_budget_bytes",
    "tensor_bytes",
]

GIB = 1024**3
RAM_MARGIN = 2 * GIB  # host memory "auto" leaves to the OS and the runtime (torch, Python)


def module_tensors(module: nn.Module) -> list[torch.Tensor]:
    """Every parameter and buffer of `module` (each once)."""
    seen, out = set(), []
    for t in [*module.parameters(), *module.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def tensor_bytes(tensors: Sequence[torch.Tensor]) -> int:
    """The bytes `tensors` hold together."""
    return sum(t.numel() * t.element_size() for t in tensors)


def parse_budget(value: str | float | None, what: str = "VRAM") -> str | float | None:
    """Validate a budget given by a person: None, "auto" or a positive number of GiB (`what`
    names the memory in the error: VRAM or RAM)."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip().lower().removesuffix("gb").strip()
        if text in ("auto", "none", "unlimited"):
            return None if text != "auto" else "auto"
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"the {what} budget {value!r} is not a number of GB or 'auto'.") from None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"the {what} budget must be a positive number of GB or 'auto', got {value!r}.")
    return float(value)


def budget_bytes(
    budget: str | float | None, device: torch.device | str, model: nn.Module | None = None
) -> int | None:
    """Bytes for a parsed budget on `device`; None means no limit (everything resident).

    "auto" is the device's free memory plus what `model` (a module, or a `nn.ModuleList` of several)
    already holds there (CUDA); on a CPU it means no limit.
    """
    device = torch.device(device)
    if budget is None:
        return None
    if budget == "auto":
        if device.type != "cuda":
            return None
        free, _ = torch.cuda.mem_get_info(device)
        index = torch.cuda.current_device() if device.index is None else device.index
        on = torch.device("cuda", index)
        held = 0 if model is None else tensor_bytes([t for t in module_tensors(model) if t.device == on])
        return int(free + held)
    return round(float(budget) * GIB)


def ram_budget_bytes(budget: str | float | None) -> int | None:
    """Bytes of a RAM budget given by a person (GiB or "auto"); None: no limit. "auto" is the
    memory available now less what the OS and the Python runtime keep (`RAM_MARGIN` or a tenth)."""
    budget = parse_budget(budget, "RAM")
    if budget is None:
        return None
    if budget == "auto":
        free = available_ram()
        return int(free - max(RAM_MARGIN, free // 10))
    return round(float(budget) * GIB)


def default_reserve(total: int | None, device: torch.device) -> int:
    """Bytes of a CUDA budget kept for activations (2 GiB or a quarter, whichever is smaller)."""
    if total is None or device.type != "cuda":
        return 0
    return int(min(2 * GIB, total // 4))


def format_bytes(n: float) -> str:
    """`2.50 GiB`, or `12.3 MiB` below a tenth of a GiB."""
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2**20:.1f} MiB"
