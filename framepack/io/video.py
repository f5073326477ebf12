"""Video output (and input): H.264 mp4, GIF, PNG frames; every file is written atomically.

FRAMEPACK.md section 6: the pipeline writes an mp4 (H.264, crf 16, 30 fps) after every section,
so the video must never be seen half-written: each writer goes through `atomic_write`. PyAV is
imported on first use, so `framepack.io` imports without the `video` extra.
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import platform
from collections.abc import Mapping
from fractions import Fraction
from numbers import Real
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image

from framepack.io.errors import InputError
from framepack.io.files import atomic_write, write_bytes_atomic

Frames = npt.NDArray[np.uint8]

_GIF_MIN_SIDE = 160  # below this the GIF drops frames rather than shrink further
_GIF_PALETTE_FRAMES = 16
_GIF_PALETTE_SIDE = 128


def _check_frames(frames: object) -> Frames:
    if (
        not isinstance(frames, np.ndarray)
        or frames.dtype != np.uint8
        or frames.ndim != 4
        or frames.shape[3] != 3
    ):
        got = (
            f"shape {frames.shape} dtype {frames.dtype}"
            if isinstance(frames, np.ndarray)
            else type(frames).__name__
        )
        raise InputError(f"Frames must be a (T, H, W, 3) uint8 RGB array, got {got}.")
    if min(frames.shape[:3]) < 1:
        raise InputError(f"Frames must hold at least one non-empty frame, got shape {frames.shape}.")
    return frames


def _check_fps(fps: object) -> Fraction:
    if isinstance(fps, bool) or not isinstance(fps, Real) or not math.isfinite(fps) or fps <= 0:
        raise InputError(f"fps must be a positive number, got {fps!r}.")
    return Fraction(fps).limit_denominator(1001)  # 29.97 -> 2997/100; integers stay exact


def _check_metadata(metadata: Mapping[str, str] | None) -> str | None:
    if metadata is None:
        return None
    if not isinstance(metadata, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise InputError("Video metadata must be a mapping of strings to strings.")
    return json.dumps(dict(metadata), ensure_ascii=False)


# x264's instruction sets up to AVX2, named as its `asm` option spells them: every CPU with AVX-512
# has all of them (XOP and FMA4, AMD-only before AVX-512, are left out).
_X264_UP_TO_AVX2 = "MMX2,SSE,SSE2,SSE2Fast,SSE3,SSSE3,SSE4.1,SSE4.2,LZCNT,AVX,FMA3,BMI1,BMI2,AVX2,Cache64"


@functools.cache
def x264_options() -> dict[str, str]:
    """libx264 options beyond crf that make the encoding reproducible: the same frames, the same bytes.

    On a CPU with AVX-512, x264's AVX-512 kernels encode the same frames to different bitstreams
    from run to run (here from 1 encoding in 30 to 1 in 4, up to 42 levels apart once decoded; the
    kernels of its mb-tree rate control: `mbtree=0` or no AVX-512 makes it reproducible), so a
    resumed job's segment, or a second run of the same settings, was not frame-identical. Such a
    CPU is held to x264's AVX2 kernels (`asm=...`), which are reproducible and give the bytes the
    AVX-512 ones give most of the time, at no measurable cost; other CPUs keep x264's own choice.
    The CPU is read from `/proc/cpuinfo` (Linux), elsewhere from torch when it is loaded.
    """
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return {}
    return {"x264-params": f"asm={_X264_UP_TO_AVX2}"} if has_avx512() else {}


def has_avx512() -> bool:
    """Whether the CPU has the AVX-512 subsets x264 uses (F, CD, BW, DQ, VL)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
        return {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"} <= set(flags)
    except OSError:
        import sys

        torch = sys.modules.get("torch")  # never imported here just for this
        return torch is not None and torch.backends.cpu.get_cpu_capability() == "AVX512"


def h264_stream(container: Any, rate: Fraction, crf: int, width: int, height: int) -> Any:
    """Add `write_mp4`'s video stream to an open PyAV output `container`: libx264 at `crf`, with
    `x264_options`, yuv420p frames tagged BT.709 limited range (what `to_video_frame` makes)."""
    options = {"crf": str(int(crf)), **x264_options()}
    stream = container.add_stream("libx264", rate=rate, options=options)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    codec = stream.codec_context
    # Tag what `to_video_frame` produces, so players (and `read_video`) convert back with it.
    codec.colorspace = codec.color_primaries = codec.color_trc = 1  # BT.709
    codec.color_range = 1  # limited ("MPEG") range
    return stream


def to_video_frame(frame: Frames) -> Any:
    """(H, W, 3) uint8 RGB -> a yuv420p `av.VideoFrame` in BT.709 limited range (tagged as such)."""
    import av

    rgb = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
    return rgb.reformat(format="yuv420p", dst_colorspace="ITU709", dst_color_range="MPEG")


def write_mp4(
    frames: Frames,
    path: str | os.PathLike[str],
    fps: float = 30,
    crf: int = 16,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Encode (T, H, W, 3) uint8 RGB frames as H.264 mp4 (libx264, yuv420p, BT.709) atomically.

    yuv420p halves the chroma resolution, so H and W must be even (every bucket is a multiple
    of 16). `metadata` is stored as a JSON object in the container's `comment` tag and comes back
    from `read_video`. `faststart` puts the index first so browsers can play while loading.
    """
    frames = _check_frames(frames)
    _, height, width, _ = frames.shape
    if height % 2 or width % 2:
        raise InputError(f"H.264 (yuv420p) needs an even height and width, got {height}x{width}.")
    rate = _check_fps(fps)
    if isinstance(crf, bool) or not isinstance(crf, (int, np.integer)) or not 0 <= crf <= 51:
        raise InputError(f"crf must be an integer from 0 to 51, got {crf!r}.")
    comment = _check_metadata(metadata)
    import av

    with atomic_write(path) as tmp:
        with av.open(str(tmp), "w", format="mp4", options={"movflags": "+faststart"}) as container:
            if comment is not None:
                container.metadata["comment"] = comment
            stream = h264_stream(container, rate, crf, width, height)
            for frame in frames:
                container.mux(stream.encode(to_video_frame(frame)))
            container.mux(stream.encode(None))  # flush the encoder's delayed frames
    return Path(path)


def concat_mp4(
    parts: list[str | os.PathLike[str]],
    path: str | os.PathLike[str],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Join mp4 files written by `write_mp4` (same size, fps and crf) into one mp4, atomically.

    A stream copy (remux): no frame is decoded or encoded, so the cost is the bytes copied. Each
    part starts with a keyframe; timestamps are shifted part by part, and decode timestamps by a
    common encoder delay so that they keep increasing across joins (parts shorter than the
    encoder's B-frame delay have none of their own). Refuses parts whose encoder settings differ.
    """
    files = [Path(p) for p in parts]
    if not files:
        raise InputError("concat_mp4 needs at least one part.")
    comment = _check_metadata(metadata)
    import av

    heads = []  # (extradata, first pts - first dts) of each part
    for file in files:
        with av.open(str(file)) as src:
            stream = src.streams.video[0]
            packet = next(p for p in src.demux(stream) if p.dts is not None)
            heads.append((bytes(stream.codec_context.extradata or b""), packet.pts - packet.dts))
    if len({h[0] for h in heads}) > 1:
        raise InputError(f"The parts of {Path(path).name} were encoded with different settings.")
    delay = max(h[1] for h in heads)
    with atomic_write(path) as tmp:
        with av.open(str(tmp), "w", format="mp4", options={"movflags": "+faststart"}) as out:
            if comment is not None:
                out.metadata["comment"] = comment
            target, offset = None, 0
            for file, (_, own_delay) in zip(files, heads, strict=True):
                with av.open(str(file)) as src:
                    stream = src.streams.video[0]
                    if target is None:
                        target = out.add_stream_from_template(stream)
                    end = 0
                    for packet in src.demux(stream):
                        if packet.dts is None:  # the demuxer's final empty packet
                            continue
                        end = max(end, packet.pts + packet.duration)
                        packet.pts += offset
                        packet.dts += offset - (delay - own_delay)
                        packet.stream = target
                        out.mux(packet)
                    offset += end
    return Path(path)


def read_video(
    path: str | os.PathLike[str], max_frames: int | None = None
) -> tuple[Frames, float, dict[str, str]]:
    """Decode the first video stream: ((T, H, W, 3) uint8 RGB frames, fps, metadata).

    `metadata` is the mapping `write_mp4` stored, or {} for files without one. Decodes at most
    `max_frames` frames when given.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"Video file {p} does not exist or is not a file.")
    decoded, fps, comment, listed = _decode(p, max_frames, threads=True)
    if max_frames is None and listed and len(decoded) < listed:
        # Frame-threaded decoding can drop a damaged packet's frames without an error: decode
        # once more on one thread, which reports the damage (a file whose edit list hides frames
        # decodes cleanly and is taken as it is).
        decoded, fps, comment, _ = _decode(p, max_frames, threads=False)
    if not decoded:
        raise InputError(f"Video file {p} has no frames.")
    return np.stack(decoded), fps, _parse_metadata(comment)


def _decode(p: Path, max_frames: int | None, threads: bool) -> tuple[list[Frames], float, str | None, int]:
    """The frames of the first video stream, its fps, the container's comment and the frame count
    the container lists (0 when unknown)."""
    import av

    try:
        with av.open(str(p)) as container:
            if not container.streams.video:
                raise InputError(f"File {p} has no video stream.")
            stream = container.streams.video[0]
            if threads:
                stream.thread_type = "AUTO"
            fps = float(stream.average_rate or stream.guessed_rate or 0)
            decoded: list[Frames] = []
            for frame in container.decode(stream):
                decoded.append(frame.to_ndarray(format="rgb24"))  # uses the stream's colour tags
                if max_frames is not None and len(decoded) >= max_frames:
                    break
            return decoded, fps, container.metadata.get("comment"), int(stream.frames or 0)
    except (av.FFmpegError, OSError) as exc:
        reason = " ".join((getattr(exc, "strerror", None) or str(exc)).split()).rstrip(".")
        raise InputError(f"Video file {p} cannot be decoded; it is damaged or cut short ({reason}).") from exc


def _parse_metadata(comment: str | None) -> dict[str, str]:
    try:
        data = json.loads(comment) if comment else None
    except ValueError:
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def _gif_palette(frames: Frames) -> Image.Image:
    """One adaptive 256-colour palette (median cut) for the whole clip, from up to 16 sampled frames.

    A global palette keeps colours stable from frame to frame (no flicker) and lets the GIF
    writer store only the changed rectangle of each frame.
    """
    picks = np.unique(np.linspace(0, len(frames) - 1, _GIF_PALETTE_FRAMES).round().astype(int))
    tiles = []
    for i in picks:
        tile = Image.fromarray(frames[i])
        tile.thumbnail((_GIF_PALETTE_SIDE, _GIF_PALETTE_SIDE), Image.Resampling.BILINEAR)
        tiles.append(np.asarray(tile))
    mosaic = Image.fromarray(np.concatenate(tiles, axis=0))  # (n*h, w, 3)
    return mosaic.quantize(colors=256, method=Image.Quantize.MEDIANCUT)


def _encode_gif(frames: Frames, size: tuple[int, int], frame_ms: float, palette: Image.Image) -> bytes:
    images = []
    for frame in frames:
        image = Image.fromarray(frame)
        if image.size != size:
            image = image.resize(size, Image.Resampling.LANCZOS)
        # No dithering: dither noise differs per frame, which flickers and defeats the delta frames.
        images.append(image.quantize(palette=palette, dither=Image.Dither.NONE))
    # GIF delays are whole centiseconds: give each frame the delay that ends it at its true time
    # (at 30 fps 30, 30, 40, ... ms), so the GIF lasts as long as the video.
    ends = np.round(np.arange(1, len(images) + 1) * frame_ms / 10).astype(int)
    delays = (10 * np.diff(ends, prepend=0)).tolist()
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=delays, loop=0)
    return buffer.getvalue()


def write_gif(
    frames: Frames,
    path: str | os.PathLike[str],
    fps: float = 30,
    max_bytes: int = 8_000_000,
    max_side: int = 480,
) -> Path:
    """Write an animated GIF (looping, one global adaptive palette) of at most `max_bytes`, atomically.

    Frames are first scaled to fit `max_side`. While the file is too large it shrinks: the frame
    size down to 160 px on the long side, then every 2nd, 3rd ... frame is kept (each shown
    longer, so the duration holds), then the last frame shrinks to 16 px; an `InputError` if even
    that is too large. GIF delays are whole centiseconds: each frame's delay ends it at its true time
    (so the GIF lasts as long as the video), above 50 fps every 2nd (3rd, ...) frame is kept, and
    identical consecutive frames are merged by the writer.
    """
    frames = _check_frames(frames)
    rate = float(_check_fps(fps))
    for name, value, low in (("max_bytes", max_bytes, 1), ("max_side", max_side, 16)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise InputError(f"{name} must be an integer of at least {low}, got {value!r}.")
    _, height, width, _ = frames.shape
    long_side = min(max(height, width), max_side)
    step = max(1, math.ceil(rate / 50 - 1e-9))  # browsers show delays under 20 ms as 100 ms
    palette = _gif_palette(frames)
    while True:
        scale = long_side / max(height, width)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        data = _encode_gif(frames[::step], size, 1000.0 * step / rate, palette)
        if len(data) <= max_bytes:
            return write_bytes_atomic(data, path)
        ratio = max_bytes / len(data)
        if long_side > _GIF_MIN_SIDE or (step >= len(frames) and long_side > 16):
            floor = 16 if step >= len(frames) else _GIF_MIN_SIDE
            long_side = max(floor, min(long_side - 1, math.floor(long_side * math.sqrt(ratio) * 0.95)))
        elif step < len(frames):
            kept = len(frames[::step])
            fewer = max(1, min(kept - 1, math.floor(kept * ratio * 0.95)))
            step = math.ceil(len(frames) / fewer)  # frames[::step] keeps `fewer` frames
        else:
            raise InputError(f"No GIF of these frames fits in {max_bytes} bytes; raise max_bytes.")


def write_png_frames(frames: Frames, directory: str | os.PathLike[str]) -> list[Path]:
    """Write each frame as `directory/frame_00000.png`, ... (each file atomically); return the paths.

    Creates the directory; files of the same names are replaced, other files are left alone.
    """
    frames = _check_frames(frames)
    folder = Path(directory)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"Cannot write frames into {folder} because it is not a directory.")
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, frame in enumerate(frames):
        path = folder / f"frame_{i:05d}.png"
        with atomic_write(path) as tmp:
            Image.fromarray(frame).save(tmp, format="PNG")
        paths.append(path)
    return paths
