"""The mp4 encoder is reproducible: the same frames give the same bytes, run after run.

A generation (or a resumed job) is promised frame for frame identical to another run with the same
settings. The denoiser and the VAE are; libx264's AVX-512 kernels were not (its mb-tree rate
control gave a different bitstream for the same frames about one encoding in five on this CI's
AVX-512 Xeon), so `framepack.io.video.x264_options` holds x264 to its AVX2 kernels there.
"""

from __future__ import annotations

import io
from fractions import Fraction

import numpy as np
import pytest

from framepack.io import read_video, write_mp4
from framepack.io import video as video_module

av = pytest.importorskip("av")


def _frames(seed: int = 0) -> np.ndarray:
    """46 small noisy frames fading to grey: with them x264's AVX-512 kernels varied most often."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 1, 46)[:, None, None, None]
    base = rng.random((1, 48, 80, 3)) * 255
    noisy = base * (1 - t) + 128 * t + rng.normal(0, 20, (46, 48, 80, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8)


def _encode(frames: np.ndarray) -> bytes:
    """The frames through `write_mp4`'s stream, in memory (PyAV's own RGB -> yuv420p conversion)."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = video_module.h264_stream(container, Fraction(30), 16, 80, 48)
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))
    return buf.getvalue()


def test_the_same_frames_encode_to_the_same_bytes():
    frames = _frames()
    # Without x264_options, 4 to 11 of these 40 encodings differed (bounded: about 2.5 s).
    assert len({_encode(frames) for _ in range(40)}) == 1


def test_write_mp4_is_frame_identical_run_after_run(tmp_path):
    frames = _frames()
    first = read_video(write_mp4(frames, tmp_path / "first.mp4"))[0]
    for i in range(5):
        assert np.array_equal(read_video(write_mp4(frames, tmp_path / f"{i}.mp4"))[0], first)


@pytest.mark.skipif(not video_module.has_avx512(), reason="x264 picks its own kernels without AVX-512")
def test_x264_keeps_to_its_avx2_kernels_on_an_avx512_cpu():
    params = video_module.x264_options()["x264-params"]
    kernels = params.removeprefix("asm=").split(",")
    assert "AVX2" in kernels and not any(k.upper().startswith("AVX512") for k in kernels)
