"""Incremental decoding: blended growth gives the frame count and pixels of a one-shot decode."""

import numpy as np
import torch

from framepack.pipeline.decode import IncrementalDecoder, latent_preview, soft_join, to_uint8_frames


def causal_decode(latents: torch.Tensor) -> torch.Tensor:
    """A causal 4x temporal 'decoder': latent 0 -> 1 frame, every later latent -> 4 frames."""
    first = latents[:, :3, :1]
    rest = latents[:, :3, 1:].repeat_interleave(4, dim=2)
    return torch.cat([first, rest], dim=2)  # (1, 3, 4n - 3, h, w)


def test_soft_join_blends_linearly():
    a, b = torch.zeros(1, 1, 5, 1, 1), torch.ones(1, 1, 4, 1, 1)
    out = soft_join(a, b, 3)
    assert out.shape[2] == 6
    torch.testing.assert_close(out[0, 0, :, 0, 0], torch.tensor([0, 0, 0, 0.5, 1, 1]))


def test_backward_growth_matches_one_shot_frame_count_and_pixels():
    ws, sections = 3, 4
    total = ws * sections + 1
    bank = torch.randn(1, 16, total, 2, 2)
    bank[:, :, :, :, :] = bank[:, :, :1].clamp(-1, 1)  # a constant video: blending must not change it
    dec = IncrementalDecoder(causal_decode, ws)
    for k in range(sections):  # inverted order: the block grows towards the start
        lo = 1 + (sections - 1 - k) * ws
        assert dec.update(bank, lo if lo > 1 else 0, total)
        assert dec.frames.shape[0] == 4 * (total - dec.lo) - 3
    assert np.array_equal(dec.frames, to_uint8_frames(causal_decode(bank)))


def test_forward_growth_frame_counts():
    ws, sections = 2, 5
    bank = torch.randn(1, 16, ws * sections + 1, 2, 2)
    dec = IncrementalDecoder(causal_decode, ws)
    for k in range(sections):
        dec.update(bank, 0, 1 + (k + 1) * ws)
        assert dec.frames.shape[0] == 4 * (1 + (k + 1) * ws) - 3
    assert not dec.update(bank, 0, 1 + sections * ws)  # nothing new


def test_leading_into_a_clip_keeps_its_first_frame_one_frame():
    """Inverted extension: the block starts as a source clip's own frames (its first latent is one
    frame); growing towards the start adds 4 frames per latent and the start latent's one, so the
    new part has 4 * new - 3 frames and source frame j lands at that count + j."""
    ws, sections, source_frames = 3, 3, 25
    total, n = ws * sections + 1, (source_frames - 1) // 4 + 1  # new latents, source latents
    source = np.arange(source_frames, dtype=np.uint8)[:, None, None, None].repeat(3, axis=3) * 8
    latent = torch.tensor(source[::4, 0, 0, 0], dtype=torch.float32) / 127.5 - 1  # frame 4k of latent k
    bank = torch.zeros(1, 16, total + n, 1, 1)
    bank[:, :3, total:] = latent.view(1, 1, n, 1, 1)
    dec = IncrementalDecoder(causal_decode, ws)
    dec.frames, dec.lo, dec.hi, dec.clip_starts = source, total, total + n, (total,)
    for k in range(sections):
        lo = 1 + (sections - 1 - k) * ws
        dec.update(bank, lo if lo > 1 else 0, total + n)
    assert dec.frames.shape[0] == 4 * total - 3 + source_frames
    assert np.array_equal(dec.frames[4 * total - 3 :][4 * ws :], source[4 * ws :])  # past the blend


def test_preview_and_uint8_frames():
    prev = latent_preview(torch.zeros(1, 16, 3, 4, 5))
    assert prev.shape == (3, 4, 5, 3) and prev.dtype == np.uint8
    assert tuple(prev[0, 0, 0]) == (7, 0, 0)  # the bias alone: (0.0259, -0.0192, -0.0761) clamped
    frames = to_uint8_frames(torch.tensor([-1.0, 0.0, 1.0]).view(1, 1, 3, 1, 1).expand(1, 3, 3, 1, 1))
    assert frames[:, 0, 0, 0].tolist() == [0, 128, 255]
