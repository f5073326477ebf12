"""framepack.io: buckets, robust image loading, atomic mp4/GIF/PNG/JSON writers (real files in tmp_path)."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from framepack.io import (
    BUCKETS_640,
    InputError,
    buckets,
    crop_start,
    fit_to_bucket,
    load_image,
    pick_bucket,
    prepare_image,
    read_video,
    write_gif,
    write_json_atomic,
    write_mp4,
    write_png_frames,
)
from framepack.io import video as video_module

# ---------------------------------------------------------------------------------------------
# Buckets


def test_buckets_640_exact():
    assert buckets() == [
        (416, 960),
        (448, 864),
        (480, 832),
        (512, 768),
        (544, 704),
        (576, 672),
        (608, 640),
        (640, 608),
        (672, 576),
        (704, 544),
        (768, 512),
        (832, 480),
        (864, 448),
        (960, 416),
    ]
    assert buckets(640)[:7] == list(BUCKETS_640)


def test_buckets_320_scaled():
    assert buckets(320) == [
        (208, 480),
        (224, 432),
        (240, 416),
        (256, 384),
        (272, 352),
        (288, 336),
        (304, 320),
        (320, 304),
        (336, 288),
        (352, 272),
        (384, 256),
        (416, 240),
        (432, 224),
        (480, 208),
    ]


@pytest.mark.parametrize("resolution", [64, 128, 480, 512, 720, 960, 1024, 2048])
def test_buckets_are_multiples_of_16_and_unique(resolution):
    out = buckets(resolution)
    assert len(out) == len(set(out))
    assert all(h % 16 == 0 and w % 16 == 0 and h >= 16 and w >= 16 for h, w in out)


def test_buckets_rounding_halves_up():
    # 416 * 480 / 640 = 312 = 19.5 * 16 -> 320 (half up); 960 * 480 / 640 = 720 = 45 * 16.
    assert buckets(480)[0] == (320, 720)
    # 416 * 560 / 640 = 364 -> 368 (nearest); 960 * 560 / 640 = 840 = 52.5 * 16 -> 848 (half up).
    assert buckets(560)[0] == (368, 848)


@pytest.mark.parametrize("resolution", [0, 32, 48, 100, 2064, 4096, -640, True, 640.0, "640"])
def test_buckets_refuse_bad_resolution(resolution):
    with pytest.raises(InputError, match="multiple of 16"):
        buckets(resolution)


@pytest.mark.parametrize(
    ("height", "width", "resolution", "expected"),
    [
        # |512*bw - 512*bh| = 512*|bw - bh|: (608, 640) and (640, 608) tie at 512 * 32; the release
        # keeps the later one (640 tall x 608 wide), as it does for every square size.
        (512, 512, 640, (640, 608)),
        (640, 640, 640, (640, 608)),
        (1, 1, 640, (640, 608)),
        # At 320 the square ties are (304, 320) and (320, 304): the later again.
        (1000, 1000, 320, (320, 304)),
        # 1080p: |1080*832 - 1920*480| = 23,040 beats (448, 864): 72,960 and (512, 768): 153,600.
        (1080, 1920, 640, (480, 832)),
        (1920, 1080, 640, (832, 480)),
        # 4:3: (544, 704) gives |480*704 - 640*544| = 10,240; (512, 768): 40,960; (576, 672): 46,080.
        (480, 640, 640, (544, 704)),
        (640, 480, 640, (704, 544)),
        # 10:1 goes to the widest: |100*960 - 1000*416| = 320,000 < 361,600 for (448, 864).
        (100, 1000, 640, (416, 960)),
        (1000, 100, 640, (960, 416)),
        # At 320: |1080*416 - 1920*240| = 11,520 < 36,480 for (224, 432).
        (1080, 1920, 320, (240, 416)),
    ],
)
def test_pick_bucket(height, width, resolution, expected):
    assert pick_bucket(height, width, resolution) == expected


def test_pick_bucket_refuses_bad_sizes():
    with pytest.raises(InputError):
        pick_bucket(0, 100)
    with pytest.raises(InputError):
        pick_bucket(100, 100, resolution=100)


# ---------------------------------------------------------------------------------------------
# fit_to_bucket / prepare_image


def centre_square(height: int, width: int, half: int = 10) -> np.ndarray:
    image = np.full((height, width, 3), 255, np.uint8)
    cy, cx = height // 2, width // 2
    image[cy - half : cy + half, cx - half : cx + half] = 0
    return image


def dark_centroid(image: np.ndarray) -> tuple[float, float]:
    weight = 255.0 - image.astype(np.float64).mean(axis=2)
    ys, xs = np.indices(weight.shape)
    return float((ys * weight).sum() / weight.sum()), float((xs * weight).sum() / weight.sum())


@pytest.mark.parametrize(
    ("shape", "target"),
    [((200, 400), (64, 64)), ((400, 200), (96, 48)), ((60, 80), (608, 640)), ((300, 500), (480, 832))],
)
def test_fit_to_bucket_shape_and_centre(shape, target):
    out = fit_to_bucket(centre_square(*shape), *target)
    assert out.shape == (*target, 3) and out.dtype == np.uint8
    cy, cx = dark_centroid(out)
    assert abs(cy - (target[0] - 1) / 2) <= 0.75
    assert abs(cx - (target[1] - 1) / 2) <= 0.75


def test_fit_to_bucket_same_size_is_identity():
    image = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    np.testing.assert_array_equal(fit_to_bucket(image, 32, 48), image)
    np.testing.assert_array_equal(fit_to_bucket(image, 32, 16), image[:, 16:32])  # crop only


@pytest.mark.parametrize(
    ("excess", "start"),
    # The release's box starts at excess / 2 and PIL rounds it half to even: 1.5 -> 2 and 3.5 -> 4
    # (flooring gives 1 and 3: they differ when the excess is 3 mod 4); 0.5 -> 0, 2.5 -> 2.
    [(0, 0), (1, 0), (2, 1), (3, 2), (4, 2), (5, 2), (6, 3), (7, 4), (11, 6), (13, 6)],
)
def test_crop_start_rounds_half_to_even(excess, start):
    assert crop_start(excess) == start
    image = np.random.default_rng(excess).integers(0, 256, (16, 32 + excess, 3), dtype=np.uint8)
    np.testing.assert_array_equal(fit_to_bucket(image, 16, 32), image[:, start : start + 32])  # no resize
    tall = image.transpose(1, 0, 2)
    np.testing.assert_array_equal(fit_to_bucket(tall, 32, 16), tall[start : start + 32])


def test_fit_to_bucket_crops_the_resized_image_as_the_release():
    # 100x105 to 64x64: scale max(64/100, 64/105) = 0.64, resized to 64 x round(67.2) = 67 wide; the
    # excess 3 starts the crop at column 2, worked out as above.
    image = np.random.default_rng(1).integers(0, 256, (100, 105, 3), dtype=np.uint8)
    resized = np.asarray(Image.fromarray(image).resize((67, 64), Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(fit_to_bucket(image, 64, 64), resized[:, 2:66])


def test_fit_to_bucket_refuses_bad_arrays():
    with pytest.raises(InputError, match=r"\(H, W, 3\) uint8"):
        fit_to_bucket(np.zeros((8, 8, 4), np.uint8), 16, 16)
    with pytest.raises(InputError, match=r"\(H, W, 3\) uint8"):
        fit_to_bucket(np.zeros((8, 8, 3), np.float32), 16, 16)


def test_prepare_image(tmp_path):
    path = tmp_path / "wide.png"
    Image.fromarray(centre_square(270, 480)).save(path)
    assert prepare_image(path).shape == (480, 832, 3)  # 16:9 at 640
    assert prepare_image(str(path), resolution=320).shape == (240, 416, 3)
    assert prepare_image(centre_square(100, 100), width=64, height=128).shape == (128, 64, 3)
    with pytest.raises(InputError, match="multiple of 16"):
        prepare_image(path, width=100, height=64)
    with pytest.raises(InputError, match="both width and height"):
        prepare_image(path, width=64)


# ---------------------------------------------------------------------------------------------
# load_image: what it accepts


def gradient(height: int = 48, width: int = 64) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // (width - 1), y * 255 // (height - 1), (x + y) % 256], axis=2).astype(np.uint8)


def test_load_rgb_png_exact_and_jpeg_close(tmp_path):
    image = gradient()
    Image.fromarray(image).save(tmp_path / "a.png")
    Image.fromarray(image).save(tmp_path / "a.jpg", quality=95)
    png = load_image(tmp_path / "a.png")
    assert png.dtype == np.uint8 and png.flags.writeable
    np.testing.assert_array_equal(png, image)
    jpg = load_image(str(tmp_path / "a.jpg"))
    assert jpg.shape == image.shape
    assert np.abs(jpg.astype(int) - image).mean() < 6


def test_load_rgba_composites_on_white(tmp_path):
    rgba = np.zeros((16, 24, 4), np.uint8)
    rgba[:, :8] = (255, 0, 0, 0)  # fully transparent -> white
    rgba[:, 8:16] = (0, 0, 255, 255)  # opaque blue
    rgba[:, 16:] = (0, 0, 0, 128)  # half-transparent black -> mid grey
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    assert out.shape == (16, 24, 3)
    assert (out[:, :8] == 255).all()
    assert (out[:, 8:16] == (0, 0, 255)).all()
    assert (np.abs(out[:, 16:].astype(int) - 127) <= 1).all()


def test_load_palette_and_transparent_palette(tmp_path):
    indices = np.zeros((16, 16), np.uint8)
    indices[:, 8:] = 1
    palette = [10, 200, 30, 250, 20, 5] + [0] * (256 * 3 - 6)
    image = Image.fromarray(indices, "P")
    image.putpalette(palette)
    image.save(tmp_path / "p.png")
    out = load_image(tmp_path / "p.png")
    assert (out[:, :8] == (10, 200, 30)).all() and (out[:, 8:] == (250, 20, 5)).all()
    image.save(tmp_path / "pt.png", transparency=1)  # index 1 transparent -> white
    out = load_image(tmp_path / "pt.png")
    assert (out[:, :8] == (10, 200, 30)).all() and (out[:, 8:] == 255).all()


def test_load_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (32, 16), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)
    with Image.open(tmp_path / "cmyk.jpg") as check:
        assert check.mode == "CMYK"
    out = load_image(tmp_path / "cmyk.jpg")
    assert out.shape == (16, 32, 3)
    assert np.abs(out.astype(int) - (255, 0, 0)).max() <= 8


def test_load_16bit_grayscale_scales_to_8bit(tmp_path):
    values = np.array([[0, 257 * 100, 65535, 65535 // 2]], np.uint16).repeat(4, axis=1).repeat(16, axis=0)
    Image.fromarray(values).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as check:
        assert check.mode.startswith("I")
    out = load_image(tmp_path / "g16.png")
    assert out.shape == (16, 16, 3)
    assert (out[0, ::4, 0] == (0, 100, 255, 127)).all() or (out[0, ::4, 0] == (0, 100, 255, 128)).all()
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_load_la_and_grayscale(tmp_path):
    la = np.zeros((16, 16, 2), np.uint8)
    la[:, 8:, 1] = 255  # left: transparent (white), right: opaque black
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    out = load_image(tmp_path / "la.png")
    assert (out[:, :8] == 255).all() and (out[:, 8:] == 0).all()
    Image.new("L", (16, 16), 77).save(tmp_path / "l.png")
    assert (load_image(tmp_path / "l.png") == 77).all()


def test_load_animated_gif_takes_first_frame(tmp_path):
    frames = [Image.new("RGB", (20, 16), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    with Image.open(tmp_path / "anim.gif") as check:
        assert check.n_frames == 3
    out = load_image(tmp_path / "anim.gif")
    assert out.shape == (16, 20, 3)
    assert np.abs(out.astype(int) - (255, 0, 0)).max() <= 2


def test_load_applies_exif_orientation(tmp_path):
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = (255, 0, 0)  # left half red
    stored[:, 20:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise: the left edge goes to the top
    Image.fromarray(stored).save(tmp_path / "rot.jpg", exif=exif, quality=95)
    out = load_image(tmp_path / "rot.jpg")
    assert out.shape == (40, 20, 3)
    assert np.abs(out[:15].astype(int) - (255, 0, 0)).mean() < 10
    assert np.abs(out[25:].astype(int) - (0, 0, 255)).mean() < 10


# ---------------------------------------------------------------------------------------------
# load_image: what it refuses


def assert_refused(path: Path, match: str) -> None:
    with pytest.raises(InputError, match=match) as info:
        load_image(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message and message.endswith(".")


def png_claiming(tmp_path: Path, width: int, height: int) -> Path:
    """A small real PNG whose IHDR is patched (with a valid CRC) to claim width x height."""
    path = tmp_path / f"claims_{width}x{height}.png"
    Image.new("RGB", (16, 16), (1, 2, 3)).save(path)
    data = bytearray(path.read_bytes())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def test_refuses_missing_directory_empty_and_non_image(tmp_path):
    assert_refused(tmp_path / "nope.png", "does not exist")
    (tmp_path / "folder.png").mkdir()
    assert_refused(tmp_path / "folder.png", "not a file")
    (tmp_path / "empty.png").write_bytes(b"")
    assert_refused(tmp_path / "empty.png", "empty")
    (tmp_path / "text.png").write_text("hello, not a picture\n")
    assert_refused(tmp_path / "text.png", "not a readable image")


def test_refuses_truncated_files(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    for name in ("cut.png", "cut.jpg"):
        path = tmp_path / name
        Image.fromarray(noise).save(path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        assert_refused(path, "truncated or corrupt")


def test_refuses_corrupt_png_checksum(tmp_path):
    path = tmp_path / "crc.png"
    Image.fromarray(gradient()).save(path)
    data = bytearray(path.read_bytes())
    idat = data.index(b"IDAT")
    data[idat + 10] ^= 0xFF  # damage the compressed pixels; the chunk CRC no longer matches
    path.write_bytes(bytes(data))
    assert_refused(path, "truncated or corrupt")


def test_refuses_tiny_images(tmp_path):
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    assert_refused(tmp_path / "dot.png", "smaller than 16x16")
    Image.new("RGB", (100, 15)).save(tmp_path / "strip.png")
    assert_refused(tmp_path / "strip.png", "smaller than 16x16")


@pytest.mark.parametrize(
    "size",
    [
        (9000, 9000),  # 81 MP: over our limit, under Pillow's warning threshold
        (10000, 9500),  # 95 MP: Pillow would warn
        (20000, 20000),  # 400 MP: Pillow's own DecompressionBombError
    ],
)
def test_refuses_huge_images_from_the_header(tmp_path, size):
    path = png_claiming(tmp_path, *size)
    assert path.stat().st_size < 200  # nothing large was ever written, or decoded
    assert_refused(path, "megapixel limit")


def test_accepts_header_just_under_the_limit_without_decoding_it_first(tmp_path):
    # 8000 x 10000 = 80 MP exactly passes the size check, so it reaches the decoder, which finds
    # the patched file's data (16x16) far too short.
    path = png_claiming(tmp_path, 8000, 10000)
    assert_refused(path, "truncated or corrupt")


# ---------------------------------------------------------------------------------------------
# mp4


def smooth_video(frames: int, height: int = 64, width: int = 96) -> np.ndarray:
    t = np.linspace(0, 1, frames)[:, None, None]
    y = np.linspace(0, 1, height)[None, :, None]
    x = np.linspace(0, 1, width)[None, None, :]
    channels = [(x + t) / 2 + 0 * y, y + 0 * x * t, (1 - x + t * y) / 2]
    return (255 * np.stack(channels, axis=3)).round().astype(np.uint8)  # (T, H, W, 3)


@pytest.mark.parametrize(("frames", "fps"), [(37, 30), (13, 24)])
def test_mp4_round_trip(tmp_path, frames, fps):
    video = smooth_video(frames)
    metadata = {"prompt": "a café at dusk", "seed": "42", "json": '{"nested": [1, 2]}'}
    path = write_mp4(video, tmp_path / "out" / "v.mp4", fps=fps, metadata=metadata)
    assert path == tmp_path / "out" / "v.mp4"
    decoded, got_fps, got_metadata = read_video(path)
    assert decoded.shape == video.shape and decoded.dtype == np.uint8
    assert got_fps == fps
    assert got_metadata == metadata
    assert np.abs(decoded.astype(int) - video).mean() < 3.0
    assert read_video(path, max_frames=5)[0].shape[0] == 5
    assert sorted(p.name for p in path.parent.iterdir()) == ["v.mp4"]


def test_mp4_without_metadata_reads_empty_dict(tmp_path):
    path = write_mp4(smooth_video(2, 16, 16), tmp_path / "v.mp4")
    assert read_video(path)[2] == {}


def test_mp4_refuses_bad_input(tmp_path):
    with pytest.raises(InputError, match="even height and width"):
        write_mp4(smooth_video(3, 15, 16), tmp_path / "odd.mp4")
    with pytest.raises(InputError, match=r"\(T, H, W, 3\) uint8"):
        write_mp4(smooth_video(3).astype(np.float32), tmp_path / "f.mp4")
    with pytest.raises(InputError, match="fps"):
        write_mp4(smooth_video(3), tmp_path / "f.mp4", fps=0)
    with pytest.raises(InputError, match="metadata"):
        write_mp4(smooth_video(3), tmp_path / "f.mp4", metadata={"seed": 1})  # type: ignore[dict-item]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("existing", [True, False])
def test_mp4_failure_mid_write_leaves_target_untouched(tmp_path, monkeypatch, existing):
    target = tmp_path / "v.mp4"
    if existing:
        target.write_bytes(b"the previous section's video")
    real = video_module.to_video_frame
    calls = []

    def failing(frame):
        calls.append(1)
        if len(calls) == 6:
            raise RuntimeError("encoder died")
        return real(frame)

    monkeypatch.setattr(video_module, "to_video_frame", failing)
    with pytest.raises(RuntimeError, match="encoder died"):
        write_mp4(smooth_video(12), target)
    assert len(calls) == 6
    if existing:
        assert target.read_bytes() == b"the previous section's video"
        assert [p.name for p in tmp_path.iterdir()] == ["v.mp4"]
    else:
        assert list(tmp_path.iterdir()) == []


def test_read_video_refuses_non_videos(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_video(tmp_path / "nope.mp4")
    (tmp_path / "bad.mp4").write_text("not a video")
    with pytest.raises(InputError, match="cannot be decoded"):
        read_video(tmp_path / "bad.mp4")


@pytest.mark.parametrize("keep", [0.5, 0.8])
def test_read_video_refuses_a_cut_short_mp4(tmp_path, keep):
    """A truncated mp4 (its index intact, part of its frames gone): frame-threaded decoding drops
    the damaged frames silently, so the frame count the container lists is checked."""
    path = write_mp4(np.random.default_rng(0).integers(0, 255, (73, 64, 64, 3), np.uint8), tmp_path / "v.mp4")
    data = path.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(InputError, match="cannot be decoded; it is damaged or cut short"):
        read_video(cut)
    assert read_video(path)[0].shape[0] == 73
    assert read_video(cut, max_frames=1)[0].shape[0] == 1  # a first frame for a preview still reads


# ---------------------------------------------------------------------------------------------
# GIF, PNG frames, JSON


def moving_video(frames: int, height: int, width: int) -> np.ndarray:
    video = np.broadcast_to(smooth_video(1, height, width), (frames, height, width, 3)).copy()
    for t in range(frames):  # a block sliding right, so every frame differs from the last
        x = t * (width - 16) // max(1, frames - 1)
        video[t, height // 3 : height // 3 + 16, x : x + 16] = (255, 255, 0)
    return video


def test_gif_round_trip_frame_count(tmp_path):
    video = moving_video(12, 48, 64)
    path = write_gif(video, tmp_path / "a.gif", fps=10)
    with Image.open(path) as gif:
        assert gif.n_frames == 12 and gif.size == (64, 48)
        assert gif.info["duration"] == 100 and gif.info["loop"] == 0


@pytest.mark.parametrize(("fps", "frames", "kept"), [(30, 73, 73), (24, 50, 50), (60, 60, 30)])
def test_gif_lasts_as_long_as_the_video(tmp_path, fps, frames, kept):
    """Whole-centisecond delays that end each frame at its true time (30 fps: 30, 40, 30, ... ms);
    above 50 fps every other frame, since browsers slow delays under 20 ms to 100 ms."""
    video = np.random.default_rng(0).integers(0, 255, (frames, 32, 32, 3), np.uint8)
    path = write_gif(video, tmp_path / "a.gif", fps=fps)
    delays = []
    with Image.open(path) as gif:
        for i in range(gif.n_frames):
            gif.seek(i)
            delays.append(gif.info["duration"])
    assert len(delays) == kept and min(delays) >= 20
    assert abs(sum(delays) - 1000 * frames / fps) < 10, (sum(delays), delays[:6])


def test_gif_fits_max_side_and_max_bytes(tmp_path):
    video = moving_video(24, 240, 320)
    path = write_gif(video, tmp_path / "small.gif", max_side=200)
    with Image.open(path) as gif:
        assert gif.size == (200, 150) and gif.n_frames == 24
    path = write_gif(video, tmp_path / "tiny.gif", max_bytes=12_000)  # 24 frames at 320x240: ~32 kB
    assert path.stat().st_size <= 12_000
    with Image.open(path) as gif:
        assert 1 <= gif.n_frames < 24 and gif.size == (160, 120)  # shrunk to 160, then frames dropped
        gif.seek(gif.n_frames - 1)  # every frame decodes
    with pytest.raises(InputError, match="max_bytes"):
        write_gif(video, tmp_path / "impossible.gif", max_bytes=10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.gif", "tiny.gif"]


def test_png_frames(tmp_path):
    video = moving_video(5, 32, 48)
    paths = write_png_frames(video, tmp_path / "frames")
    assert [p.name for p in paths] == [f"frame_{i:05d}.png" for i in range(5)]
    assert sorted(p.name for p in (tmp_path / "frames").iterdir()) == [p.name for p in paths]
    for frame, path in zip(video, paths, strict=True):
        np.testing.assert_array_equal(np.asarray(Image.open(path)), frame)


def test_json_atomic(tmp_path):
    path = write_json_atomic({"prompt": "café", "seed": 3, "steps": [1, 2]}, tmp_path / "run.json")
    assert path.read_text(encoding="utf-8").startswith('{\n  "prompt": "café"')
    write_json_atomic({"seed": 4}, path)  # replaces
    assert path.read_text() == '{\n  "seed": 4\n}\n'
    with pytest.raises(ValueError):
        write_json_atomic({"loss": float("nan")}, tmp_path / "nan.json")
    with pytest.raises(TypeError):
        write_json_atomic({"x": object()}, tmp_path / "obj.json")
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]


@pytest.mark.skipif(os.name == "nt", reason="POSIX permissions")
def test_atomic_files_get_ordinary_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        path = write_json_atomic({}, tmp_path / "a.json")
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600


def test_import_is_cheap_and_needs_no_pyav():
    code = "import sys, framepack.io; print('av' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False" and out.stderr == ""
