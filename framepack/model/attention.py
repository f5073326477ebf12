"""The one attention function every block calls, with pluggable backends.

`sdpa` (PyTorch scaled_dot_product_attention) is the default and always available. `flash`
(flash-attn), `sage` (sageattention) and `xformers` are used when installed and asked for. A key
mask (batch > 1 with differently padded text) is honoured by every backend: flash-attn runs it as
variable-length sequences, the others as a boolean mask or by falling back to SDPA.

`around_attention(fn)` lets a feature attached from outside the model (sequence parallelism,
`framepack.parallel`) run every attention call inside a `with` block itself: `fn(backend, q, k, v,
key_mask)` gets the chosen backend and returns what it would.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F

__all__ = ["attention", "around_attention", "available_backends", "set_backend", "get_backend", "BACKENDS"]

BACKENDS = ("sdpa", "flash", "sage", "xformers")
_PACKAGES = {"flash": "flash_attn", "sage": "sageattention", "xformers": "xformers"}
_current = "sdpa"
_around: ContextVar[Callable | None] = ContextVar("framepack_around_attention", default=None)


def available_backends() -> list[str]:
    """Backends whose package is importable here (sdpa always)."""
    return ["sdpa"] + [b for b, pkg in _PACKAGES.items() if importlib.util.find_spec(pkg) is not None]


def set_backend(name: str) -> None:
    """Choose the attention backend for every block (process-wide)."""
    global _current
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}.")
    if name not in available_backends():
        raise ValueError(f"attention backend {name!r} needs the package {_PACKAGES[name]!r}, not installed.")
    _current = name


def get_backend() -> str:
    return _current


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, Lk)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask)
    return out.transpose(1, 2)  # (B, L, H, D)


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    import flash_attn

    if key_mask is None:
        return flash_attn.flash_attn_func(q, k, v)
    # Variable length: every sequence keeps its queries, attends to its own valid keys only.
    b, lq, h, d = q.shape
    lk = k.shape[1]
    kv_len = key_mask.sum(1, dtype=torch.int32)  # (B,)
    cu_q = torch.arange(0, (b + 1) * lq, lq, dtype=torch.int32, device=q.device)
    cu_k = F.pad(kv_len.cumsum(0, dtype=torch.int32), (1, 0))
    keep = key_mask.reshape(-1)
    out = flash_attn.flash_attn_varlen_func(
        q.reshape(b * lq, h, d),
        k.reshape(b * lk, h, d)[keep],
        v.reshape(b * lk, h, d)[keep],
        cu_q,
        cu_k,
        lq,
        int(kv_len.max()),
    )
    return out.view(b, lq, h, d)


def _sage(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    if key_mask is not None:
        return _sdpa(q, k, v, key_mask)
    import sageattention

    return sageattention.sageattn(q, k, v, tensor_layout="NHD")


def _xformers(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None
) -> torch.Tensor:
    import xformers.ops

    bias = None
    if key_mask is not None:
        bias = torch.zeros(key_mask.shape, dtype=q.dtype, device=q.device).masked_fill(
            ~key_mask, float("-inf")
        )
        bias = bias[:, None, None, :].expand(q.shape[0], q.shape[2], q.shape[1], -1)
    return xformers.ops.memory_efficient_attention(q, k, v, attn_bias=bias)


_IMPLS: dict[str, Callable] = {"sdpa": _sdpa, "flash": _flash, "sage": _sage, "xformers": _xformers}


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Multi-head attention on `(B, L, H, D)` tensors; `key_mask` `(B, Lk)` is True for keys to use.

    Returns `(B, Lq, H * D)`.
    """
    b, lq, h, d = q.shape
    # Compiled graphs never read the hook (dynamo cannot trace a ContextVar; sequence parallelism
    # refuses --compile, so it is never set there).
    around = None if torch.compiler.is_compiling() else _around.get()
    if around is None:
        out = _IMPLS[_current](q, k, v, key_mask)  # (B, Lq, H, D)
    else:
        out = around(_IMPLS[_current], q, k, v, key_mask)
    return out.reshape(b, lq, h * d)


@contextmanager
def around_attention(fn: Callable) -> Iterator[None]:
    """Within the block (this thread or task), every `attention` call runs as
    `fn(backend, q, k, v, key_mask)`, which returns `(B, Lq, H, D)` as the backend does."""
    token = _around.set(fn)
    try:
        yield
    finally:
        _around.reset(token)
