"""FP8 (e4m3) matrix products for the blocks' linear layers (`--fp8-compute`, issue 20).

A weight is quantised once, with one power-of-two scale per output row (the rule of the weight
streamer's fp8 host copies, `framepack.memory.streaming`, so a streamed block's copies are used as
they arrive); an activation is quantised at every call, one scale per token (its absolute maximum
over 448, in fp32). The product of the two is `torch._scaled_mm` with row-wise scales: bf16 out,
the bias added in bf16 by the kernel. `emulated` is the same arithmetic written out (the quantised
operands multiplied in fp32, scaled, rounded to bf16), for tests and benches on devices without
the kernel; it is never chosen for a user (`Fp8Matmul(emulate=...)` is an explicit argument).

`Fp8Matmul` sits in a linear layer's `fp8` slot (`fp8_matmul(layer)`), as a LoRA sits in its
`lora` slot: the layer's weight then holds the e4m3 values and the slot their row scales.
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = [
    "FP8",
    "FP8_MAX",
    "Fp8Matmul",
    "fp8_matmul",
    "fp8_shape_ok",
    "fp8_unsupported",
    "quantize_tokens",
    "quantize_weight",
    "scaled_matmul",
]

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3 value
_TINY = 1e-12  # an activation row's amax floor: a row of zeros gets a finite scale
_TINY_WEIGHT = 1e-30  # a weight row's (the weight streamer's fp8 host copies have used it from the first)
_SCRATCH = 1 << 22  # elements of a weight quantised at once: 16 MiB of fp32 rows (plus the quotient)


def fp8_unsupported(device: torch.device | str) -> str | None:
    """Why `device` cannot run e4m3 matrix products with row-wise scales (None: it can): they
    need `torch._scaled_mm` on an NVIDIA GPU of compute capability 8.9 or newer."""
    device = torch.device(device)
    need = "fp8 compute needs an NVIDIA GPU of compute capability 8.9 or newer (RTX 40, L4, L40, H100, H200, B200)"
    if device.type != "cuda" or torch.version.hip is not None:
        return f"{need}; this run's device is {device.type}"
    if not hasattr(torch, "_scaled_mm"):
        return f"{need} and a torch with torch._scaled_mm"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return f"{need}; this GPU ({torch.cuda.get_device_name(device)}) is {major}.{minor}"
    return None


def fp8_shape_ok(rows: int, columns: int) -> bool:
    """`_scaled_mm` needs both dimensions of the weight to be multiples of 16."""
    return rows % 16 == 0 and columns % 16 == 0


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(e4m3 (N, K), fp32 scales (N, 1))` of a weight `(N, K)`: each row divided by the power of
    two that brings its absolute maximum to at most 448 (exact), then rounded to nearest e4m3.

    Rows go a slice at a time (at most `_SCRATCH` elements), so the fp32 scratch stays small beside
    a device budget whatever the weight's size (a block read from its files is quantised there)."""
    n, k = weight.shape
    q = torch.empty((n, k), dtype=FP8, device=weight.device)
    scale = torch.empty((n, 1), dtype=torch.float32, device=weight.device)
    step = max(1, _SCRATCH // max(k, 1))
    for start in range(0, n, step):
        q[start : start + step], scale[start : start + step] = _quantized_rows(weight[start : start + step])
    return q, scale


def _quantized_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows = weight.float()
    amax = rows.abs().amax(dim=1, keepdim=True).clamp_min(_TINY_WEIGHT)  # (N, 1)
    # ceil(log2(amax / 448)) from the float's own exponent, not `log2` (whose last bit may differ
    # between a CPU and a GPU): the same scales wherever a copy is made (`framepack.memory.streaming`)
    mantissa, exponent = torch.frexp(amax / FP8_MAX)  # amax / 448 = mantissa * 2**exponent, [0.5, 1)
    exponent = exponent - (mantissa == 0.5).to(exponent.dtype)  # a power of two is its own ceiling
    scale = ((exponent + 127) << 23).view(torch.float32)  # 2**exponent from its bits: exact anywhere
    return (rows / scale).to(FP8), scale


def quantize_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(e4m3 (M, K), fp32 scales (M, 1))` of activations `(M, K)`: one scale per token (row),
    its absolute maximum over 448; the quotient is clamped to the e4m3 range before rounding."""
    rows = x.float()
    scale = rows.abs().amax(dim=1, keepdim=True).clamp_min(_TINY) / FP8_MAX  # (M, 1)
    return (rows / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8), scale


def scaled_matmul(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    emulate: bool = False,
) -> torch.Tensor:
    """`(xq * x_scale) @ (wq * w_scale).T + bias` in bf16 `(M, N)`, from e4m3 `xq (M, K)` and
    `wq (N, K)` with fp32 row scales `(M, 1)` and `(N, 1)`.

    `torch._scaled_mm` takes the weight column-major (`wq.T` of a contiguous `wq`), the scales as
    `(M, 1)` and `(1, N)` fp32, a bf16 bias, and gives bf16 for row-wise scales. `emulate` computes
    the same in fp32 (exact products of e4m3 values, fp32 sums, scales, bias) and rounds to bf16.
    """
    if emulate:
        y = (xq.float() @ wq.float().T).mul_(x_scale).mul_(w_scale.T)  # (M, N)
        return (y if bias is None else y.add_(bias.float())).to(torch.bfloat16)
    wq = wq if wq.is_contiguous() else wq.contiguous()  # a column slice (the single block's proj_out)
    return torch._scaled_mm(
        xq,
        wq.T,
        scale_a=x_scale,
        scale_b=w_scale.reshape(1, -1),
        bias=None if bias is None else bias.to(torch.bfloat16),
        out_dtype=torch.bfloat16,
    )


def fp8_matmul(layer: nn.Module) -> Fp8Matmul | None:
    """The fp8 product attached to `layer` as its `fp8` slot (`--fp8-compute`), or None."""
    return layer._modules.get("fp8")


class Fp8Matmul(nn.Module):
    """A linear layer's product in e4m3: its weight holds e4m3 values, `scale` their row scales.

    Holds no parameter or buffer: the model's state dict and the weight streamer never see it.
    """

    def __init__(self, emulate: bool = False) -> None:
        super().__init__()
        self.emulate = emulate
        self.scale: torch.Tensor | None = None  # (N, 1) fp32, set with the weight's e4m3 values

    def set_scale(self, scale: torch.Tensor) -> None:
        self.scale = scale.float()

    def forward(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        cols: slice = slice(None),
    ) -> torch.Tensor:
        """`x @ weight[:, cols].T + bias` `(..., N)` in `x`'s dtype, through e4m3 (bf16 rounding)."""
        assert weight.dtype == FP8 and self.scale is not None, "the weight's e4m3 values are not installed"
        wq, w_scale = (
            weight[:, cols],
            self.scale,
        )  # (N, K') e4m3, (N, 1): a column slice keeps its rows' scales
        xq, x_scale = quantize_tokens(x.reshape(-1, x.shape[-1]))  # (M, K), (M, 1)
        y = scaled_matmul(xq, x_scale, wq, w_scale, bias, self.emulate)  # (M, N) bf16
        return y.to(x.dtype).view(*x.shape[:-1], wq.shape[0])
