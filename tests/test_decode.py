"""Incremental decoding: blended growth gives the frame count and pixels of a one-shot decode."""

import numpy as np
import torch

from framepack.pipeline.decode import (
    IncrementalDecoder,
    from_uint8_frames,
    latent_preview,
    soft_join,
    to_uint8_frames,
)


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


def test_blend_of_out_of_range_frames_is_in_float_then_clamped():
    """The release blends the decoder's floats and clamps only when writing. Earlier frames at 1.5
    (out of range), later ones at -0.5, three overlapping: weights 1, 0.5, 0 give 1.5, 0.5, -0.5,
    written as 255, trunc(0.5 * 127.5 + 127.5) = trunc(191.25) = 191 and trunc(63.75) = 63. Blending
    the earlier frames after 8 bits (255 -> 1.0) would give 0.25 -> 159 in the middle."""
    earlier, later = torch.full((1, 3, 4, 1, 1), 1.5), torch.full((1, 3, 4, 1, 1), -0.5)
    out = to_uint8_frames(soft_join(earlier, later, 3))[:, 0, 0, 0]
    assert out.tolist() == [255, 255, 191, 63, 63]


def test_blend_in_the_vae_dtype():
    """With an fp16 VAE the release blends its fp16 frames on the CPU with fp16 weights. Worked out
    in fp16, one rounding per operation: 0.1 and 0.7 are 0.0999755859375 and 0.7001953125; the
    second weight of linspace(1, 0, 4) is 0.6669921875 and 1 - w is 0.3330078125; the products
    round to 0.06671142578125 and 0.233154296875, and their sum to 0.2998046875 (fp32: 0.3)."""
    earlier, later = torch.full((1, 1, 4, 1, 1), 0.1), torch.full((1, 1, 4, 1, 1), 0.7)
    assert torch.linspace(1, 0, 4, dtype=torch.float16)[1].item() == 0.6669921875
    half = soft_join(earlier.half().float(), later.half().float(), 4, torch.float16)
    assert half.dtype == torch.float32
    assert half[0, 0, :, 0, 0].tolist() == [0.0999755859375, 0.2998046875, 0.50048828125, 0.7001953125]
    assert abs(soft_join(earlier, later, 4)[0, 0, 1].item() - 0.3) < 1e-7


def test_backward_growth_matches_one_shot_frame_count_and_pixels():
    ws, sections = 3, 4
    total = ws * sections + 1
    bank = torch.randn(1, 16, total, 2, 2)
    bank[:, :, :, :, :] = bank[:, :, :1].clamp(-1, 1)  # a constant video: blending must not change it
    dec = IncrementalDecoder(causal_decode, ws)
    for k in range(sections):  # inverted order: the block grows towards the start
        lo = 1 + (sections - 1 - k) * ws
        assert dec.update(bank, lo if lo > 1 else 0, total)
        assert dec.frames.shape[2] == 4 * (total - dec.lo) - 3
    torch.testing.assert_close(dec.frames, causal_decode(bank), rtol=0, atol=1e-6)


def test_forward_growth_frame_counts():
    ws, sections = 2, 5
    bank = torch.randn(1, 16, ws * sections + 1, 2, 2)
    dec = IncrementalDecoder(causal_decode, ws)
    for k in range(sections):
        dec.update(bank, 0, 1 + (k + 1) * ws)
        assert dec.frames.shape[2] == 4 * (1 + (k + 1) * ws) - 3
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
    dec.frames, dec.lo, dec.hi, dec.clip_starts = from_uint8_frames(source), total, total + n, (total,)
    for k in range(sections):
        lo = 1 + (sections - 1 - k) * ws
        dec.update(bank, lo if lo > 1 else 0, total + n)
    frames = to_uint8_frames(dec.frames)
    assert frames.shape[0] == 4 * total - 3 + source_frames
    assert np.array_equal(frames[4 * total - 3 :][4 * ws :], source[4 * ws :])  # past the blend


def test_preview_and_uint8_frames():
    prev = latent_preview(torch.zeros(1, 16, 3, 4, 5))
    assert prev.shape == (3, 4, 5, 3) and prev.dtype == np.uint8
    assert tuple(prev[0, 0, 0]) == (7, 0, 0)  # the bias alone: (0.0259, -0.0192, -0.0761) clamped
    # The release's cast: clamp, * 127.5 + 127.5, truncate: 0 -> 127.5 -> 127; 0.999 -> 254.87 -> 254.
    values = torch.tensor([-2.0, -1.0, 0.0, 0.999, 1.0, 1.5])
    frames = to_uint8_frames(values.view(1, 1, -1, 1, 1).expand(1, 3, -1, 1, 1))
    assert frames[:, 0, 0, 0].tolist() == [0, 0, 127, 254, 255, 255]
    every = np.arange(256, dtype=np.uint8)[:, None, None, None].repeat(3, axis=3)
    assert np.array_equal(to_uint8_frames(from_uint8_frames(every)), every)  # uint8 -> float -> uint8
