"""Device names given by a user (`--device`, the GUI's and API's `device`), resolved in one place.

The lowest layer beside `io/`: imports nothing of the package, and torch only when called.
"""

from __future__ import annotations

__all__ = ["resolve_device"]


def resolve_device(name: str, rank: int | None = None, what: str = "--device") -> str:
    """The torch device `name` stands for: "auto" is the CUDA GPU when torch sees one, else "cpu".

    `rank` (a torchrun process's `LOCAL_RANK`) makes "auto" pick that process's own GPU,
    `cuda:<rank % GPUs>`. Any other name is returned as given once torch knows it and can use it
    here; one that it does not know, or a device this torch cannot reach (CUDA on a torch built
    without it, a GPU index it does not see), is a ValueError in one sentence that starts with
    `what` (where the name came from).
    """
    import torch

    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ValueError(f"{what} {name!r} is not a device name such as cpu or cuda.") from None
        why = _unusable(device)
        if why:
            raise ValueError(f"{what} {name!r} cannot be used: {why}.")
        return name
    if not torch.cuda.is_available():
        return "cpu"
    return "cuda" if rank is None else f"cuda:{rank % torch.cuda.device_count()}"


def _unusable(device) -> str | None:
    """Why this torch cannot compute on `device` (None: it can)."""
    import torch

    if device.type == "cpu":
        return None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            if not torch.backends.cuda.is_built():
                return "this torch was built without CUDA (use cpu, or install a CUDA build of torch)"
            return "torch sees no CUDA GPU here"
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            return f"torch sees {count} CUDA GPU{'s' if count != 1 else ''} here (cuda:0 to cuda:{count - 1})"
        return None
    if device.type == "mps":
        return None if torch.backends.mps.is_available() else "this torch sees no Apple GPU (MPS) here"
    backend = getattr(torch, device.type, None)
    available = getattr(backend, "is_available", None)
    if available is None:
        return f"framepack cannot compute on {device.type} devices"
    return None if available() else f"this torch sees no {device.type} device here"
