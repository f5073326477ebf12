"""The one attention function every block calls, with pluggable backends.

`sdpa` (PyTorch scaled_dot_product_attention) is the default and always available. `flash`
(flash-attn), `sage` (sageattention: 8-bit Q.K, fp16 P.V) and `xformers` need their package and
an NVIDIA GPU (`check_backend` says so in one sentence). `sage-emulate` is sage's arithmetic in
plain PyTorch on any device (`framepack.model.sage_numerics`: tests and quality benches). A key
mask (batch > 1 with differently padded text) is honoured by every backend: flash-attn runs it as
variable-length sequences, xformers as a bias, and both sage backends fall back to SDPA for it.
A run picks its backend with `using_backend` (the `attention` setting, `--attention`).

`around_attention(fn)` lets a feature attached from outside the model (sequence parallelism,
`framepack.parallel`) run every attention call inside a `with` block itself: `fn(backend, q, k, v,
key_mask)` gets the chosen backend and returns what it would. Compiled blocks (`--compile`) call it
too, eagerly, between two graphs.
"""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F

from .sage_numerics import sage_attention

__all__ = [
    "BACKENDS",
    "around_attention",
    "attention",
    "available_backends",
    "check_backend",
    "get_backend",
    "set_backend",
    "using_backend",
]

BACKENDS = ("sdpa", "flash", "sage", "xformers", "sage-emulate")
_HEAD_DIMS = {"sage": (64, 96, 128), "flash": tuple(range(8, 257, 8))}  # what the kernels take
_PACKAGES = {"flash": "flash_attn", "sage": "sageattention", "xformers": "xformers"}
_current = "sdpa"
_around: ContextVar[Callable | None] = ContextVar("framepack_around_attention", default=None)
_hooked = False  # an `around_attention` block is open (in some thread): `attention` reads `_around`
_open, _lock = 0, threading.Lock()  # how many are open


def available_backends() -> list[str]:
    """Backends whose package is importable here (sdpa and sage-emulate always)."""
    found = [b for b, pkg in _PACKAGES.items() if importlib.util.find_spec(pkg) is not None]
    return ["sdpa", *found, "sage-emulate"]


def check_backend(name: str, device=None, head_dim: int | None = None) -> None:
    """ValueError (one sentence) unless backend `name` can run here: a known name, its package
    installed, an NVIDIA GPU for the packaged kernels (`device`, when given), and a head size
    (`head_dim`, when given) that its kernel takes."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}.")
    if name in _PACKAGES and name not in available_backends():
        raise ValueError(
            f"attention {name!r} needs the package {_PACKAGES[name]!r} (pip install {_PACKAGES[name]}), "
            "which is not installed."
        )
    if name in _PACKAGES and device is not None and torch.device(device).type != "cuda":
        raise ValueError(f"attention {name!r} runs on an NVIDIA GPU only, not on {device}; use sdpa here.")
    if head_dim is not None and name in _HEAD_DIMS and head_dim not in _HEAD_DIMS[name]:
        raise ValueError(f"attention {name!r} does not take this model's head size {head_dim}; use sdpa.")


def set_backend(name: str) -> None:
    """Choose the attention backend for every block (process-wide)."""
    global _current
    check_backend(name)
    _current = name


@contextmanager
def using_backend(name: str) -> Iterator[None]:
    """Backend `name` for the `with` block, the one before it after."""
    before = _current
    set_backend(name)
    try:
        yield
    finally:
        set_backend(before)


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


# The sage kernels run eagerly inside compiled blocks (a graph break either side): the package's
# wrapper and the emulation's loop over query blocks would otherwise compile once per length.
@torch.compiler.disable
def _sage(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    if key_mask is not None:
        return _sdpa(q, k, v, key_mask)
    import sageattention

    # The keys smoothed here, as the package would (`smooth_k`), but into a new tensor: it would
    # subtract the mean from the caller's keys in place.
    k = k - k.mean(dim=1, keepdim=True)
    return sageattention.sageattn(q, k, v, tensor_layout="NHD", smooth_k=False)


@torch.compiler.disable
def _sage_emulated(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None
) -> torch.Tensor:
    if key_mask is not None:
        return _sdpa(q, k, v, key_mask)
    return sage_attention(q, k, v)


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


_IMPLS: dict[str, Callable] = {
    "sdpa": _sdpa,
    "flash": _flash,
    "sage": _sage,
    "xformers": _xformers,
    "sage-emulate": _sage_emulated,
}


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Multi-head attention on `(B, L, H, D)` tensors; `key_mask` `(B, Lk)` is True for keys to use.

    Returns `(B, Lq, H * D)`.
    """
    b, lq, h, d = q.shape
    if _hooked:  # a compiled graph guards on this global and breaks here (`_hooked_attention`)
        out = _hooked_attention(q, k, v, key_mask)  # (B, Lq, H, D)
    else:
        out = _IMPLS[_current](q, k, v, key_mask)
    return out.reshape(b, lq, h * d)


@torch.compiler.disable
def _hooked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None):
    """The attention of an open `around_attention` block, always eager: dynamo cannot trace the
    ContextVar, nor the collectives a hook may run (a compiled block runs in two graphs around it)."""
    around = _around.get()
    if around is None:  # another thread's block is open
        return _IMPLS[_current](q, k, v, key_mask)
    return around(_IMPLS[_current], q, k, v, key_mask)


@contextmanager
def around_attention(fn: Callable) -> Iterator[None]:
    """Within the block (this thread or task), every `attention` call runs as
    `fn(backend, q, k, v, key_mask)`, which returns `(B, Lq, H, D)` as the backend does; a
    compiled block then breaks its graph around the attention and calls `fn` eagerly."""
    token = _around.set(fn)
    _count_open(1)
    try:
        yield
    finally:
        _around.reset(token)
        _count_open(-1)


def _count_open(change: int) -> None:
    global _open, _hooked
    with _lock:
        _open += change
        _hooked = _open > 0
