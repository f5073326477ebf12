"""Incremental decoding: the visible video grows every section without re-decoding everything.

After a section, only the latents next to the already decoded block are decoded (the new window
plus one window of overlap) and blended into the existing pixels with linear weights over
`4 * window - 3` frames (FRAMEPACK.md section 6). Decoding a block of `n` latents gives `4n - 3`
frames, so the blended video always has `4 * latents - 3` frames, as a one-shot decode would.
Also the fast 16->3 latent preview used for live step previews.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

__all__ = ["soft_join", "IncrementalDecoder", "from_uint8_frames", "latent_preview", "to_uint8_frames"]

# Linear latent -> RGB map of the HunyuanVideo VAE latents (the factors ComfyUI uses for previews).
_RGB_FACTORS = (
    (-0.0395, -0.0331, 0.0445),
    (0.0696, 0.0795, 0.0518),
    (0.0135, -0.0945, -0.0282),
    (0.0108, -0.0250, -0.0765),
    (-0.0209, 0.0032, 0.0224),
    (-0.0804, -0.0254, -0.0639),
    (-0.0991, 0.0271, -0.0669),
    (-0.0646, -0.0422, -0.0400),
    (-0.0696, -0.0595, -0.0894),
    (-0.0799, -0.0208, -0.0375),
    (0.1166, 0.1627, 0.0962),
    (0.1165, 0.0432, 0.0407),
    (-0.2315, -0.1920, -0.1355),
    (-0.0270, 0.0401, -0.0821),
    (-0.0616, -0.0997, -0.0727),
    (0.0249, -0.0469, -0.1703),
)
_RGB_BIAS = (0.0259, -0.0192, -0.0761)


def latent_preview(latents: torch.Tensor) -> np.ndarray:
    """`(1, 16, T, h, w)` latents to `(T, h, w, 3)` uint8 frames through the linear RGB map."""
    weight = torch.tensor(_RGB_FACTORS, dtype=torch.float32)  # (16, 3)
    rgb = torch.einsum("bcthw,cr->bthwr", latents[:1].float().cpu(), weight) + torch.tensor(_RGB_BIAS)
    return (rgb[0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def to_uint8_frames(pixels: torch.Tensor) -> np.ndarray:
    """`(1, 3, T, H, W)` pixels, nominally [-1, 1], to `(T, H, W, 3)` uint8, as the release writes them.

    `clamp(x, -1, 1) * 127.5 + 127.5`, then truncated to an integer (the release's float -> uint8
    cast): 0.999 -> 254.87 -> 254. A uint8 frame read as `v / 127.5 - 1` in fp32 comes back exact.
    """
    x = (pixels[0].float().clamp(-1, 1) * 127.5 + 127.5).to(torch.uint8)  # (3, T, H, W)
    return x.permute(1, 2, 3, 0).contiguous().numpy()


def from_uint8_frames(frames: np.ndarray) -> torch.Tensor:
    """`(T, H, W, 3)` uint8 to `(1, 3, T, H, W)` float32 pixels in [-1, 1] (`v / 127.5 - 1`)."""
    return torch.from_numpy(np.ascontiguousarray(frames)).float().div(127.5).sub(1).permute(3, 0, 1, 2)[None]


def soft_join(
    earlier: torch.Tensor, later: torch.Tensor, overlap: int, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Concatenate `(B, C, T, H, W)` clips in time, cross-fading the `overlap` shared frames.

    The cross-fade is the release's: weights `linspace(1, 0)` and `w * earlier + (1 - w) * later`,
    computed in `dtype` (the VAE's: fp16 on a GPU, as the release blends its fp16 frames); the
    frames outside the overlap keep their values. The result has the inputs' common dtype.
    """
    out_dtype = torch.promote_types(earlier.dtype, later.dtype)
    if overlap <= 0:
        return torch.cat([earlier.to(out_dtype), later.to(out_dtype)], dim=2)
    dtype = dtype or out_dtype
    w = torch.linspace(1, 0, overlap, dtype=dtype, device=earlier.device).view(1, 1, -1, 1, 1)
    a, b = earlier[:, :, -overlap:].to(dtype), later[:, :, :overlap].to(dtype)
    blend = (w * a + (1 - w) * b).to(out_dtype)
    return torch.cat(
        [earlier[:, :, :-overlap].to(out_dtype), blend, later[:, :, overlap:].to(out_dtype)], dim=2
    )


class IncrementalDecoder:
    """Frames of the contiguous block of latents `[lo, hi)` decoded so far, grown at either end.

    The frames are kept as the decoder gave them, floats not clamped, and later sections blend into
    them in `blend_dtype` (the VAE's), as the release does; only the writer clamps and turns them
    into 8 bits (`to_uint8_frames`). `SegmentedVideo` keeps just the blending tail in memory.
    """

    def __init__(
        self,
        decode: Callable[[torch.Tensor], torch.Tensor],
        window: int,
        blend_dtype: torch.dtype = torch.float32,
    ) -> None:
        self.decode, self.window, self.blend_dtype = decode, window, blend_dtype
        self.frames: torch.Tensor | None = None  # (1, 3, 4 * (hi - lo) - 3, H, W) float pixels
        self.lo = self.hi = 0
        # Latents that begin a separately encoded clip (a video led into): one frame each, as at the
        # start of a clip, though decoded after others (which makes four of it; the last is kept).
        self.clip_starts: tuple[int, ...] = ()

    def _decode(self, latents: torch.Tensor, a: int, b: int) -> torch.Tensor:
        """Pixels `(1, 3, T, H, W)` of latents `[a, b)`: `4 (b - a) - 3` frames, 3 fewer for each
        clip start after `a`."""
        # Values of the blend dtype (a no-op for the VAE's own output), so the tail a job stores in
        # that dtype comes back exact.
        pixels = self.decode(latents[:, :, a:b]).to(self.blend_dtype).float()
        drop = {f for s in self.clip_starts if a < s < b for f in range(4 * (s - a) - 3, 4 * (s - a))}
        if drop:
            pixels = pixels[:, :, [f for f in range(pixels.shape[2]) if f not in drop]]
        return pixels

    def update(self, latents: torch.Tensor, lo: int, hi: int) -> bool:
        """Show latents `[lo, hi)` of `latents` `(1, C, N, h, w)`; True if the frames changed.

        The new range must contain the current one; each end grows by decoding the new latents
        plus `window` latents of overlap and blending over `4 * window - 3` frames.
        """
        if hi <= lo or (self.frames is not None and (lo, hi) == (self.lo, self.hi)):
            return False
        if self.frames is None:
            self.frames = self._decode(latents, lo, hi)
            self.lo, self.hi = lo, hi
            return True
        assert lo <= self.lo and hi >= self.hi, "the decoded block only grows"
        ws, dtype = self.window, self.blend_dtype
        if lo < self.lo:  # new frames before the block (inverted order)
            ctx = min(ws, self.hi - self.lo)
            overlap = 4 * ctx - 3
            chunk = self._decode(latents, lo, self.lo + ctx)
            self.frames = soft_join(chunk, self.frames, overlap, dtype)
            self.lo = lo
        if hi > self.hi:  # new frames after the block (forward order)
            ctx = min(ws, self.hi - self.lo)
            overlap = 4 * ctx - 3
            chunk = self._decode(latents, self.hi - ctx, hi)
            self.frames = soft_join(self.frames, chunk, overlap, dtype)
            self.hi = hi
        return True
