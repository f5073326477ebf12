"""`framepack prepare`: videos with captions -> a cache of VAE latents and text/image embeddings.

Run the encoders once, so training never does. A source is a folder of videos (`*.mp4`, `*.webm`,
`*.mov`, `*.mkv`, each with its caption in `<stem>.txt` beside it) or a JSONL manifest of
`{"video": path, "caption": text}` lines (paths relative to the manifest's folder). Each clip is

1. decoded (`framepack.io.read_video`) and resampled to the bundle's frame rate by nearest-frame
   selection (60 fps -> 30 fps keeps every other frame; 24 fps -> 30 fps repeats some);
2. fitted to the resolution bucket of its first frame (resize to cover, centre-crop; FRAMEPACK.md
   section 6), every frame the same way;
3. trimmed to whole latents, `4t - 3` frames (and to `max_frames`); a clip of fewer than
   `window + 1` latents (the start latent and one section) is skipped with a warning;
4. encoded: VAE latents (posterior mean, fp32, so the cache is deterministic), the caption's LLaMA
   tokens + mask and CLIP pooled vector, and the SigLIP embedding of the fitted first frame;
5. written atomically to `<stem>.safetensors`, with the caption, the source and the settings in
   its metadata.

The empty caption's embeddings go to `empty_prompt.safetensors`: caption dropout trains on them,
so that real CFG's negative prompt "" at inference is the unconditional the model learned.

`index.json` lists the clips of this run's source that are in the cache (files of clips no longer
in the source stay on disk, unlisted). A rerun reuses every clip whose cache file records the same
source (path, size, modification time), caption and settings; the settings include a fingerprint
of the encoders' weights and tokenizers (`encoder_fingerprint`), so a bundle whose encoders
changed in place encodes everything again. Unreadable videos, missing captions
and bad manifest lines are skipped with a warning and counted; they never stop the run.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from framepack.io import InputError, atomic_write, fit_to_bucket, pick_bucket, read_video, write_json_atomic

if TYPE_CHECKING:
    from framepack.pipeline.bundle import Bundle

__all__ = [
    "CACHE_FORMAT",
    "EMPTY_PROMPT_NAME",
    "INDEX_NAME",
    "VIDEO_SUFFIXES",
    "PrepareReport",
    "PrepareWarning",
    "encoder_fingerprint",
    "prepare_dataset",
    "resample_indices",
]

VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv")
INDEX_NAME = "index.json"
EMPTY_PROMPT_NAME = "empty_prompt.safetensors"  # the empty caption's embeddings, for caption dropout
CACHE_FORMAT = "framepack-latent-cache/1"


class PrepareWarning(UserWarning):
    """A clip was skipped (too short, unreadable, no caption); the message names it and says why."""


@dataclass
class PrepareReport:
    """What `prepare_dataset` did. `entries` are the index entries of every clip in the cache."""

    out_dir: Path
    index: Path
    encoded: int = 0  # clips encoded by this run
    reused: int = 0  # clips already cached with the same source, caption and settings
    skipped_short: int = 0  # shorter than one section
    skipped_bad: int = 0  # unreadable video, missing caption, bad manifest line
    problems: list[str] = field(default_factory=list)  # one sentence per skipped clip
    entries: list[dict[str, Any]] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        return self.skipped_short + self.skipped_bad

    def summary(self) -> str:
        return (
            f"{len(self.entries)} clips cached in {self.out_dir} ({self.encoded} encoded, {self.reused} "
            f"reused); skipped {self.skipped_short} too short and {self.skipped_bad} unreadable or uncaptioned."
        )


@dataclass(frozen=True)
class _Clip:
    video: Path
    caption: str | None  # None: no caption found (the reason is in `problem`)
    name: str  # cache file stem
    problem: str | None = None


# -------------------------------------------------------------------------------------- listing
def _read_caption(video: Path) -> tuple[str | None, str | None]:
    path = video.with_suffix(".txt")
    if not path.is_file():
        return None, f"Video {video} has no caption file {path.name}."
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        return None, f"Caption {path} cannot be read ({type(e).__name__})."
    return (text, None) if text else (None, f"Caption {path} is empty.")


def _list_folder(folder: Path) -> Iterator[tuple[Path, str | None, str | None]]:
    for video in sorted(p for p in folder.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file()):
        caption, problem = _read_caption(video)
        yield video, caption, problem


def _list_manifest(manifest: Path) -> Iterator[tuple[Path, str | None, str | None]]:
    try:
        lines = manifest.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"Manifest {manifest} cannot be read ({type(e).__name__}).") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"Line {number} of {manifest}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            yield manifest, None, f"{where} is not JSON."
            continue
        video = item.get("video") if isinstance(item, dict) else None
        caption = item.get("caption") if isinstance(item, dict) else None
        if not isinstance(video, str) or not video:
            yield manifest, None, f'{where} has no "video" path.'
        elif not isinstance(caption, str) or not caption.strip():
            yield manifest.parent / video, None, f'{where} has no "caption" text.'
        else:
            yield manifest.parent / video, caption.strip(), None


def _list_clips(source: Path) -> list[_Clip]:
    if not source.exists():
        raise InputError(f"Source {source} does not exist.")
    if source.is_dir():
        listed = list(_list_folder(source))
        what = f"no videos ({', '.join(VIDEO_SUFFIXES)}) in {source}"
    elif source.suffix.lower() == ".jsonl":
        listed = list(_list_manifest(source))
        what = f"no lines in the manifest {source}"
    else:
        raise InputError(f"Source {source} is neither a folder of videos nor a .jsonl manifest.")
    if not listed:
        raise InputError(f"There are {what}.")
    clips, used = [], set()
    for video, caption, problem in listed:
        name = video.stem
        if name in used:  # two videos with one stem (from a manifest): tell them apart by path
            name = f"{name}-{hashlib.sha1(str(video.resolve()).encode()).hexdigest()[:8]}"
        used.add(name)
        clips.append(_Clip(video, caption, name, problem))
    return clips


# ------------------------------------------------------------------------------------- frames
def resample_indices(count: int, source_fps: float, fps: float) -> np.ndarray:
    """Source frame indices that give `fps` from `count` frames at `source_fps`, nearest in time.

    Output frame j is at time j / fps and takes the source frame whose timestamp i / source_fps is
    nearest (halves up); the output lasts as long as the source: ceil(count * fps / source_fps).
    """
    src = Fraction(source_fps).limit_denominator(1001)
    dst = Fraction(fps).limit_denominator(1001)
    n = math.ceil(count * dst / src)
    j = np.arange(n, dtype=np.int64)
    # floor(j * src / dst + 1/2) in exact integers
    idx = (2 * j * src.numerator * dst.denominator + src.denominator * dst.numerator) // (
        2 * src.denominator * dst.numerator
    )
    return np.minimum(idx, count - 1)


def _load_frames(
    video: Path, fps: float, resolution: int, max_frames: int | None
) -> tuple[np.ndarray, float, tuple[int, int]]:
    """(T, H, W, 3) uint8 frames at `fps`, fitted to their bucket; the source fps; the bucket."""
    limit = None
    if max_frames is not None:  # decode only what the output can use
        _, source_fps, _ = read_video(video, max_frames=1)
        if source_fps > 0:
            limit = math.ceil(max_frames * source_fps / fps) + 1
    frames, source_fps, _ = read_video(video, max_frames=limit)
    if source_fps > 0:
        frames = frames[resample_indices(len(frames), source_fps, fps)]
    else:
        warnings.warn(f"{video} does not say its frame rate; taking it as {fps:g} fps.", PrepareWarning, 2)
        source_fps = fps
    if max_frames is not None:
        frames = frames[:max_frames]
    height, width = pick_bucket(frames.shape[1], frames.shape[2], resolution)
    fitted = np.stack([fit_to_bucket(f, height, width) for f in frames])  # (T, height, width, 3)
    return fitted, source_fps, (height, width)


# ------------------------------------------------------------------------------------ encoding
def _encode(bundle: Bundle, frames: np.ndarray, caption: str) -> dict[str, torch.Tensor]:
    from framepack.pipeline.conditioning import encode_image, encode_prompt, vae_encode

    x = torch.from_numpy(frames).permute(3, 0, 1, 2)[None]  # (1, 3, T, H, W) uint8
    x = x.float().div(127.5).sub(1)  # [-1, 1]
    latents = vae_encode(bundle, x, mode="mean")[0]  # (16, t, h, w)
    prompt = encode_prompt(bundle, caption)
    if prompt.truncated:
        warnings.warn(
            f"caption {caption[:40]!r}... is over {bundle.manifest.max_prompt_tokens} tokens and was cut.",
            PrepareWarning,
            3,
        )
    image = encode_image(bundle, frames[0])  # (1, N, D_img)
    tensors = {
        "latents": latents,  # (16, t, h, w)
        "text": prompt.text[0],  # (L, D_text)
        "text_mask": prompt.mask[0],  # (L,)
        "pooled": prompt.pooled[0],  # (D_pooled,)
        "image_embeds": image[0],  # (N, D_img)
    }
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


@torch.no_grad()
def encoder_fingerprint(bundle: Bundle) -> str:
    """A short digest of everything `prepare` encodes with: the weights of the VAE and the three
    encoders (each tensor's name, shape, dtype and the CRC-32 of its bytes, so any changed bit
    shows), the two tokenizers' vocabularies and the manifest's text settings. One pass over the
    weights at about 3.5 GB/s on one x86_64 core (measured on 2 GB of bf16 LLaMA-shaped tensors):
    about 5 s for the released LLaMA's 16 GB. A float64 sum of each tensor, used before, took 32 s
    and could miss a small change."""
    digest = hashlib.sha256()
    for name in ("text_encoder", "text_encoder_2", "image_encoder", "vae"):
        for key, tensor in getattr(bundle, name).state_dict().items():
            raw = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
            crc = zlib.crc32(memoryview(raw))
            digest.update(f"{name}.{key}|{tuple(tensor.shape)}|{tensor.dtype}|{crc:08x}|".encode())
    for tok in (bundle.tokenizer, bundle.tokenizer_2):
        digest.update(json.dumps(sorted(tok.get_vocab().items())).encode())
    m = bundle.manifest
    text = (m.prompt_template, m.template_crop, m.max_prompt_tokens, m.text_hidden_layer)
    digest.update(json.dumps(text).encode())
    return digest.hexdigest()[:16]


def _source_key(video: Path) -> dict[str, str]:
    stat = video.stat()
    return {
        "source": str(video.resolve()),
        "source_bytes": str(stat.st_size),
        "source_mtime_ns": str(stat.st_mtime_ns),
    }


def _cached_entry(path: Path, expected: dict[str, str]) -> dict[str, Any] | None:
    """The index entry of a cache file whose metadata matches `expected`, else None."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            shape = f.get_slice("latents").get_shape()
    except Exception:  # noqa: BLE001 - a damaged cache file is simply encoded again
        return None
    if any(meta.get(k) != v for k, v in expected.items()) or len(shape) != 4:
        return None
    return _entry(path.name, meta, shape)


def _entry(file: str, meta: dict[str, str], shape) -> dict[str, Any]:
    _, t, h, w = shape
    return {
        "file": file,
        "caption": meta["caption"],
        "latent_frames": int(t),
        "frames": 4 * int(t) - 3,
        "height": 8 * int(h),
        "width": 8 * int(w),
        "fps": float(meta["fps"]),
        "source": meta["source"],
    }


def _check_positive(name: str, value: Any, integer: bool = True) -> None:
    kinds = (int, np.integer) if integer else (int, float, np.integer, np.floating)
    if isinstance(value, bool) or not isinstance(value, kinds) or not value > 0 or not math.isfinite(value):
        kind = "a positive integer" if integer else "a positive number"
        raise InputError(f"{name} must be {kind}, got {value!r}.")


def prepare_dataset(
    source: str | os.PathLike[str],
    bundle: Bundle | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    resolution: int | None = None,
    fps: float | None = None,
    window: int | None = None,
    max_frames: int | None = None,
    progress: bool = True,
) -> PrepareReport:
    """Encode every clip of `source` into `out_dir` (see the module docstring); returns a report.

    `bundle` is a loaded `Bundle` or anything `load_bundle` takes. `resolution` (bucket setting),
    `fps` and `window` (latents per section) default to the bundle manifest's; `max_frames` caps
    the pixel frames kept per clip (at the target fps). Skipped clips raise a `PrepareWarning`
    each and are counted; bad arguments or a missing source raise an `InputError`.
    """
    from tqdm import tqdm

    from framepack.pipeline.bundle import Bundle, load_bundle

    if not isinstance(bundle, Bundle):
        bundle = load_bundle(bundle)
    m = bundle.manifest
    resolution = m.resolution if resolution is None else resolution
    fps = m.fps if fps is None else fps
    window = m.window if window is None else window
    _check_positive("fps", fps, integer=False)
    _check_positive("window", window)
    pick_bucket(16, 16, resolution)  # raises an InputError naming the valid resolutions
    shortest = _section_frames(window)
    if max_frames is not None:
        _check_positive("max_frames", max_frames)
        if max_frames < shortest:
            raise InputError(f"max_frames must be at least {shortest}, one section of {window} latents.")
    clips = _list_clips(Path(source))
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"Cannot write the cache into {out} because it is not a folder.")
    out.mkdir(parents=True, exist_ok=True)

    settings = _settings(bundle, fps, resolution, window, max_frames)
    report = PrepareReport(out_dir=out, index=out / INDEX_NAME)

    def skip(message: str, short: bool = False) -> None:
        report.problems.append(message)
        if short:
            report.skipped_short += 1
        else:
            report.skipped_bad += 1
        warnings.warn(f"skipped a clip: {message}", PrepareWarning, stacklevel=3)

    bar = tqdm(clips, desc="prepare", unit="clip", disable=not progress)
    for clip in bar:
        try:
            entry, reused = _prepare_clip(bundle, clip, out, settings, fps, resolution, max_frames, window)
        except _Skipped as e:
            skip(str(e), e.short)
            continue
        report.entries.append(entry)
        if reused:
            report.reused += 1
            continue
        report.encoded += 1
        bar.set_postfix(encoded=report.encoded, reused=report.reused, skipped=report.skipped)
    bar.close()
    _write_empty_prompt(bundle, out / EMPTY_PROMPT_NAME, settings)
    write_json_atomic(
        {"format": CACHE_FORMAT, "settings": json.loads(settings), "clips": report.entries}, report.index
    )
    return report


def _section_frames(window: int) -> int:
    """The fewest frames a clip needs: the start latent and one section of `window` latents."""
    return 4 * (window + 1) - 3


def _settings(bundle: Bundle, fps: float, resolution: int, window: int, max_frames: int | None) -> str:
    """The settings a cache file records (JSON): a clip is encoded again when they change."""
    return json.dumps(
        {
            "bundle": str(bundle.root) if bundle.root else bundle.manifest.name,
            "fps": float(fps),
            "resolution": resolution,
            "window": window,
            "max_frames": max_frames,
            "vae_scaling_factor": bundle.manifest.vae_scaling_factor,
            "vae_temporal_tiles": bundle.manifest.vae_temporal_tiles,
            "encoders": encoder_fingerprint(bundle),
        },
        sort_keys=True,
    )


class _Skipped(Exception):
    """A clip `_prepare_clip` skips; the message names it and says why."""

    def __init__(self, message: str, short: bool = False) -> None:
        super().__init__(message)
        self.short = short  # shorter than one section (else unreadable or uncaptioned)


def _prepare_clip(
    bundle: Bundle,
    clip: _Clip,
    out: Path,
    settings: str,
    fps: float,
    resolution: int,
    max_frames: int | None,
    window: int,
) -> tuple[dict[str, Any], bool]:
    """(index entry, reused) of `clip`: its cache file in `out` reused when it records the same
    source, caption and `settings`, else encoded and written; raises `_Skipped` for a bad clip."""
    if clip.problem is not None:
        raise _Skipped(clip.problem)
    path = out / f"{clip.name}.safetensors"
    try:
        key = _source_key(clip.video)
    except OSError:
        raise _Skipped(f"Video {clip.video} does not exist or cannot be read.") from None
    expected = {"format": CACHE_FORMAT, "caption": clip.caption, "settings": settings, **key}
    entry = _cached_entry(path, expected)
    if entry is not None:
        return entry, True
    try:
        frames, source_fps, bucket = _load_frames(clip.video, float(fps), resolution, max_frames)
    except InputError as e:  # its message is one sentence naming the file
        raise _Skipped(str(e)) from None
    except Exception as e:  # noqa: BLE001 - decoders raise many types for damaged files
        why = str(e).strip().rstrip(".") or type(e).__name__
        raise _Skipped(f"Video {clip.video} cannot be read ({why}).") from None
    latents = (len(frames) + 3) // 4
    if latents < window + 1:
        raise _Skipped(
            f"Video {clip.video} has {len(frames)} frames at {fps:g} fps, fewer than one section "
            f"({_section_frames(window)} frames).",
            short=True,
        )
    frames = frames[: 4 * latents - 3]  # whole latents: T = 4t - 3
    meta = {
        **expected,
        "fps": f"{float(fps):g}",
        "source_fps": f"{source_fps:g}",
        "bucket": f"{bucket[0]}x{bucket[1]}",
    }
    tensors = _encode(bundle, frames, clip.caption)
    _save(tensors, meta, path)
    return _entry(path.name, meta, tensors["latents"].shape), False


def _write_empty_prompt(bundle: Bundle, path: Path, settings: str) -> None:
    """The empty caption's `text`, `text_mask` and `pooled`: what caption dropout trains on, and
    what real CFG's default negative prompt ("") gives at inference. Kept if already there."""
    from safetensors import safe_open

    from framepack.pipeline.conditioning import encode_prompt

    expected = {"format": CACHE_FORMAT, "caption": "", "settings": settings}
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}) == expected:
                    return
        except Exception:  # noqa: BLE001 - a damaged file is simply written again
            pass
    prompt = encode_prompt(bundle, "")
    tensors = {"text": prompt.text[0], "text_mask": prompt.mask[0], "pooled": prompt.pooled[0]}
    _save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, expected, path)


def _save(tensors: dict[str, torch.Tensor], meta: dict[str, str], path: Path) -> None:
    from safetensors.torch import save_file

    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
