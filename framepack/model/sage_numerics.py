"""SageAttention's 8-bit arithmetic in plain PyTorch, on any device (the `sage-emulate` backend).

The `sage` backend (`framepack.model.attention`) runs the `sageattention` package's Triton kernels
(Zhang et al. 2024, "SageAttention: accurate 8-bit attention for plug-and-play inference
acceleration"), which need an NVIDIA GPU. This module does the same numbers with ordinary tensor
ops, so the quality of 8-bit attention can be tested and measured on a CPU:

- the keys are smoothed: their mean over the sequence (per sample and head) is subtracted, in
  the inputs' dtype. Softmax does not change: `q . (k - m) = q . k - q . m` is the same shift for
  every key of a query, and the quantisation of the keys no longer spends its range on `m`;
- `q / sqrt(D)` and the smoothed keys go to int8 per block of 128 queries and of 64 keys (per
  sample and head): scale `amax / 127`, rounded half away from zero;
- the int8 products are summed exactly (int32 in the kernel; here fp32, exact: every partial sum
  is an integer below 127 * 127 * 1024 < 2**24 for head dims up to 1024) and multiplied by both
  scales; softmax in fp32;
- the probabilities and the values go to fp16; each tile of 64 keys is multiplied into an fp16
  result (the kernel's `out_dtype=float16`), and the tiles are summed in fp32.

The kernel keeps a running maximum per query row and rescales as it goes; here each row has one
maximum, which changes only the fp16 rounding of the probabilities.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["K_BLOCK", "Q_BLOCK", "quantize_blocks", "sage_attention"]

Q_BLOCK = 128  # queries sharing one int8 scale (per sample and head)
K_BLOCK = 64  # keys sharing one int8 scale; also the tile of the fp16 P.V products


def quantize_blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`x` `(B, H, L, D)` as int8 values (held in fp32) and the scale of each row `(B, H, L, 1)`:
    one scale `amax / 127` per `block` rows, values rounded half away from zero."""
    b, h, n, d = x.shape
    tiles = F.pad(x.float(), (0, 0, 0, (-n) % block)).view(b, h, -1, block, d)  # (B, H, T, block, D)
    scale = tiles.abs().amax(dim=(-2, -1), keepdim=True) / 127  # (B, H, T, 1, 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero block stays zero
    ratio = tiles / scale
    ints = torch.trunc(ratio + torch.where(ratio >= 0, 0.5, -0.5))
    rows = scale.expand(-1, -1, -1, block, 1).reshape(b, h, -1, 1)[:, :, :n]
    return ints.view(b, h, -1, d)[:, :, :n], rows


def _tiled_pv(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`p` `(B, H, Lq, Lk)` times `v` `(B, H, Lk, D)` (both fp16): each tile of `K_BLOCK` keys as an
    fp16 product, the tiles summed in fp32; `(B, H, Lq, D)`."""
    b, h, lq, lk = p.shape
    pad = (-lk) % K_BLOCK
    p_tiles = F.pad(p, (0, pad)).view(b, h, lq, -1, K_BLOCK).float()  # (B, H, Lq, T, 64)
    v_tiles = F.pad(v, (0, 0, 0, pad)).view(b, h, -1, K_BLOCK, v.shape[-1]).float()  # (B, H, T, 64, D)
    partial = torch.einsum("bhqtk,bhtkd->bhqtd", p_tiles, v_tiles).half()  # each tile in fp16
    return partial.float().sum(dim=-2)  # (B, H, Lq, D)


def sage_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention of `(B, L, H, D)` tensors with SageAttention's 8-bit numbers; `(B, Lq, H, D)` in
    the inputs' dtype."""
    dtype, d = q.dtype, q.shape[-1]
    k = k - k.mean(dim=1, keepdim=True)  # smoothed, in the inputs' dtype  # (B, Lk, H, D)
    q_int, q_scale = quantize_blocks(q.transpose(1, 2).float() * d**-0.5, Q_BLOCK)  # (B, H, Lq, D)
    k_int, k_scale = quantize_blocks(k.transpose(1, 2), K_BLOCK)  # (B, H, Lk, D)
    v16 = v.transpose(1, 2).half()  # (B, H, Lk, D)
    out = torch.empty(q_int.shape, dtype=torch.float32, device=q.device)  # (B, H, Lq, D)
    for start in range(0, q_int.shape[2], Q_BLOCK):  # one block of queries at a time: bounded memory
        rows = slice(start, start + Q_BLOCK)
        scores = (q_int[:, :, rows] @ k_int.transpose(-1, -2)) * q_scale[:, :, rows] * k_scale.mT
        p = torch.exp(scores - scores.amax(dim=-1, keepdim=True))  # (B, H, c, Lk)
        out[:, :, rows] = _tiled_pv(p.half(), v16) / p.sum(dim=-1, keepdim=True)
    return out.to(dtype).transpose(1, 2)  # (B, Lq, H, D)
