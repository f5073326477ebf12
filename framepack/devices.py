"""Device names given by a user (`--device`, the GUI's and API's `device`), resolved in one place.

The lowest layer beside `io/`: imports nothing of the package, and torch only when called.
"""

from __future__ import annotations

__all__ = ["resolve_device"]


def resolve_device(name: str, rank: int | None = None, what: str = "--device") -> str:
    """The torch device `name` stands for: "auto" is the CUDA GPU when torch sees one, else "cpu".

    `rank` (a torchrun process's `LOCAL_RANK`) makes "auto" pick that process's own GPU,
    `cuda:<rank % GPUs>`. Any other name is returned as given once torch knows it; one that it
    does not is a ValueError in one sentence that starts with `what` (where the name came from).
    """
    import torch

    if name != "auto":
        try:
            torch.device(name)
        except RuntimeError:
            raise ValueError(f"{what} {name!r} is not a device name such as cpu or cuda.") from None
        return name
    if not torch.cuda.is_available():
        return "cpu"
    return "cuda" if rank is None else f"cuda:{rank % torch.cuda.device_count()}"
