"""3D rotary position tables for packed frames (FramePack paper, section 3.2).

Tables are built for the frames' own time indices on the full (1, 2, 2) patch grid. A frame group
that is patchified with a larger kernel gets the same tables, replicate-padded to a multiple of the
kernel and average-pooled with it: the cos and sin tables are averaged, not the angles.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["rope_axis", "rope_tables", "pooled_rope_tables", "pad_replicate"]


def rope_axis(positions: torch.Tensor, dim: int, theta: float) -> torch.Tensor:
    """Angles `(..., dim // 2)` of one RoPE axis for float positions `(...)`."""
    exponent = torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / dim
    freqs = 1.0 / (theta**exponent)  # (dim/2,)
    return positions.to(torch.float32)[..., None] * freqs


def _grid_angles(
    frame_indices: torch.Tensor, height: int, width: int, axes_dim: tuple[int, int, int], theta: float
) -> torch.Tensor:
    """Angles `(B, T, H, W, D/2)` for frame indices `(B, T)` on an `H x W` token grid."""
    b, t = frame_indices.shape
    dev = frame_indices.device
    at = rope_axis(frame_indices, axes_dim[0], theta)  # (B, T, dt/2)
    ah = rope_axis(torch.arange(height, device=dev), axes_dim[1], theta)  # (H, dh/2)
    aw = rope_axis(torch.arange(width, device=dev), axes_dim[2], theta)  # (W, dw/2)
    return torch.cat(
        [
            at[:, :, None, None, :].expand(b, t, height, width, -1),
            ah[None, None, :, None, :].expand(b, t, height, width, -1),
            aw[None, None, None, :, :].expand(b, t, height, width, -1),
        ],
        dim=-1,
    )  # (B, T, H, W, D/2)


def pad_replicate(x: torch.Tensor, kernel: tuple[int, int, int]) -> torch.Tensor:
    """Replicate-pad `(B, C, T, H, W)` at the end of T, H and W up to a multiple of `kernel`."""
    _, _, t, h, w = x.shape
    kt, kh, kw = kernel
    pads = (0, -w % kw, 0, -h % kh, 0, -t % kt)
    if not any(pads):
        return x
    return F.pad(x, pads, mode="replicate")


def _as_batched(frame_indices: torch.Tensor, batch: int | None) -> torch.Tensor:
    if frame_indices.ndim == 1:
        frame_indices = frame_indices[None]
    if batch is not None and frame_indices.shape[0] == 1 and batch > 1:
        frame_indices = frame_indices.expand(batch, -1)
    return frame_indices


def rope_tables(
    frame_indices: torch.Tensor,
    height: int,
    width: int,
    axes_dim: tuple[int, int, int] = (16, 56, 56),
    theta: float = 256.0,
    batch: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables `(B, T*H*W, D)` (pairs interleaved) for k1 tokens.

    `frame_indices` is `(T,)` or `(B, T)`; `height`, `width` count tokens (latent size / 2).
    Token order is (t, h, w), the order of `Conv3d(...).flatten(2)`.
    """
    idx = _as_batched(frame_indices, batch)
    ang = _grid_angles(idx, height, width, axes_dim, theta).flatten(1, 3)  # (B, L, D/2)
    return ang.cos().repeat_interleave(2, -1), ang.sin().repeat_interleave(2, -1)  # (B, L, D) x 2


def pooled_rope_tables(
    frame_indices: torch.Tensor,
    height: int,
    width: int,
    pool: tuple[int, int, int],
    axes_dim: tuple[int, int, int] = (16, 56, 56),
    theta: float = 256.0,
    batch: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables `(B, L, D)` for frames patchified with a kernel `pool` times the base one.

    `pool` is the kernel divided by the base (1, 2, 2) patch: (2, 2, 2) for k2, (4, 4, 4) for k4.
    The k1 tables on the `height x width` token grid are replicate-padded to a multiple of `pool`
    and average-pooled with it, so every compressed token gets the mean of the tables it covers.
    """
    if tuple(pool) == (1, 1, 1):
        return rope_tables(frame_indices, height, width, axes_dim, theta, batch)
    idx = _as_batched(frame_indices, batch)
    ang = _grid_angles(idx, height, width, axes_dim, theta)  # (B, T, H, W, D/2)
    out = []
    for table in (ang.cos(), ang.sin()):
        table = table.repeat_interleave(2, -1).permute(0, 4, 1, 2, 3)  # (B, D, T, H, W)
        table = F.avg_pool3d(pad_replicate(table, pool), pool, stride=pool)  # (B, D, T', H', W')
        out.append(table.flatten(2).transpose(1, 2))  # (B, L, D)
    return out[0], out[1]
