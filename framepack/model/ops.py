"""Pure tensor functions used by the blocks: linear, norms, modulation, RoPE, GELU-MLP.

Written to make few passes over memory: on a CPU the transformer's time outside the matrix
products is spent moving activations, so every function here writes its result once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = [
    "cpu_has_bf16_units",
    "linear",
    "rms_norm",
    "modulated_layer_norm",
    "apply_rope",
    "rope_to_complex",
    "chunked_mlp",
]


_BF16_UNITS: bool | None = None  # read once, lazily (nothing happens at import)


def cpu_has_bf16_units() -> bool:
    """True where the CPU multiplies bf16 natively (AVX512-BF16 or AMX); read once, lazily.

    Kept in a plain global, not a `functools.cache`: once read, `torch.compile` sees a constant
    (it traced into the cached function's `open` and broke every block's graph at each linear)."""
    global _BF16_UNITS
    if _BF16_UNITS is None:
        try:
            with open("/proc/cpuinfo") as f:
                flags = f.read()
        except OSError:
            flags = ""
        _BF16_UNITS = "avx512_bf16" in flags or "amx_bf16" in flags
    return _BF16_UNITS


def _upcast_matmul(x: torch.Tensor, weight: torch.Tensor) -> bool:
    # A CPU without bf16 units emulates bf16 GEMMs about 10x slower than fp32 ones. Products of
    # bf16 numbers are exact in fp32, so an fp32 GEMM on upcast operands is as accurate and fast.
    return (
        x.device.type == "cpu"
        and weight.dtype in (torch.bfloat16, torch.float16)
        and not cpu_has_bf16_units()
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear` that keeps low-precision storage fast on CPUs without bf16 units.

    Operands of different dtypes are refused on every device, as CUDA and CPUs with bf16 units
    refuse them, so the upcast below never hides a dtype mismatch (under autocast, which casts
    both, they are allowed).
    """
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise RuntimeError(f"linear: input is {x.dtype} but the weight is {weight.dtype}.")
    if _upcast_matmul(x, weight):
        b = None if bias is None else bias.float()
        return F.linear(x.float(), weight.float(), b).to(weight.dtype)
    return F.linear(x, weight, bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim, statistics in fp32, result in `x.dtype`."""
    xf = x.float()
    inv = torch.rsqrt(xf.square().mean(-1, keepdim=True).add_(eps))  # (..., 1)
    return (xf * inv).to(x.dtype) * weight.to(x.dtype)


def modulated_layer_norm(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """`LayerNorm(x) * (1 + scale) + shift` with `shift`, `scale` of shape (B, D)."""
    normed = F.layer_norm(x, x.shape[-1:], eps=eps)  # (B, L, D)
    return torch.addcmul(shift[:, None], normed, 1 + scale[:, None])


def rope_to_complex(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved cos/sin tables `(B, L, D)` to one complex multiplier `(B, L, 1, D/2)`."""
    return torch.complex(cos[..., 0::2].float(), sin[..., 0::2].float())[:, :, None]


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of `x` `(B, L, H, D)` by `freqs` `(B, L, 1, D/2)` (complex).

    Equals `x * cos + rotate(x) * sin` of the reference, computed in fp32 as one complex product.
    """
    b, n, h, d = x.shape
    xc = torch.view_as_complex(x.float().reshape(b, n, h, d // 2, 2))  # (B, L, H, D/2)
    return torch.view_as_real(xc * freqs).flatten(3).to(x.dtype)  # (B, L, H, D)


def chunked_mlp(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    act,
    rows: int = 1024,
    delta1: Callable[[torch.Tensor], torch.Tensor] | None = None,
    delta2: Callable[[torch.Tensor], torch.Tensor] | None = None,
    mm1: Callable[[torch.Tensor], torch.Tensor] | None = None,
    mm2: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """`act(x @ w1.T + b1) @ w2.T + b2` over row chunks of `x` `(B, L, D)`.

    The hidden activation is 4x wider than `x`; computing it a chunk at a time keeps it in the
    cache instead of streaming it through memory twice. Autograd uses the plain form.
    `delta1`/`delta2` add to each product's output a function of its input (a LoRA's low-rank
    update applied on the fly, `framepack.lora`). `mm1`/`mm2` replace the products themselves,
    bias included (the e4m3 products of `--fp8-compute`, `framepack.model.fp8`).
    """

    def mlp(part: torch.Tensor) -> torch.Tensor:
        hidden = linear(part, w1, b1) if mm1 is None else mm1(part)
        if delta1 is not None:
            hidden.add_(delta1(part))
        hidden = act(hidden)
        y = linear(hidden, w2, b2) if mm2 is None else mm2(hidden)
        return y if delta2 is None else y.add_(delta2(hidden))

    if torch.is_grad_enabled() and (x.requires_grad or w1.requires_grad):
        return mlp(x)
    if torch.compiler.is_compiling():  # the compiler plans memory itself; a Python loop over a
        return mlp(x)  # symbolic token count would fix that count and recompile for every other
    flat = x.reshape(-1, x.shape[-1])  # (B*L, D)
    out = torch.empty(flat.shape[0], w2.shape[0], dtype=x.dtype, device=x.device)  # (B*L, Dout)
    for start in range(0, flat.shape[0], rows):
        out[start : start + rows] = mlp(flat[start : start + rows])
    return out.view(*x.shape[:-1], w2.shape[0])
