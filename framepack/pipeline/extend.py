"""Video extension: continue a video (forward order) or lead into it (inverted order).

Forward: the source's first frame is the start anchor (as the start image of the forward / F1
order) and its last latents are the packed history, so the first new section continues where the
video ends; the output is the source, then the new sections. Inverted: the sections are made from
a start image (`image`) towards the video, generated end first as in the release, with the
source's first latents as the clean history that every section leads into; the output is the
new sections, then the source. Only the source's tail (head) is encoded: the history the schedule
packs plus one window of decoder context. The two parts are joined by the same linear overlap
blend as between sections (FRAMEPACK.md section 6): the source's `4 * ws - 3` frames next to the
new part cross-fade with their decoded version, its other frames are the source's own. The
source's fps is kept unless `fps` is given.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..io import fit_to_bucket, load_image, prepare_image, read_video
from ..packing.layout import forward_layout, gather_history
from .conditioning import vae_encode
from .decode import from_uint8_frames
from .jobs import JobDir, JobError
from .section import encode_inputs, pack
from .settings import GenerationSettings, Prepared, check_settings, prepare, settings_from_dict

__all__ = [
    "ExtensionHistory",
    "Source",
    "check_extension",
    "check_source",
    "describe_file",
    "load_source",
    "prepare_extension",
    "resume_extension",
]


@dataclass
class Source:
    """The video being extended, fitted to one resolution bucket."""

    path: str
    frames: np.ndarray  # (T, H, W, 3) uint8
    fps: float
    file: dict = field(default_factory=dict)  # {"path", "bytes", "sha256"} of the file read

    def check(self, job) -> None:
        """JobError unless `job` extends this very file (same path, size and contents)."""
        stored = job.read().get("video") or {}
        if stored.get("path") != self.file["path"]:
            raise JobError(
                f"{job.root} holds an unfinished extension of another video ({stored.get('path')}); "
                f"resume it with --resume {job.root} or delete it."
            )
        if stored != self.file:
            raise JobError(
                f"the video {self.file['path']} has changed since the job {job.root} began "
                "(its size or contents differ); put the original back or delete the job."
            )


def describe_file(path: str | Path) -> dict:
    """What identifies a source video for a job: its absolute path, size and SHA-256."""
    p = Path(path).resolve()
    digest = hashlib.sha256()
    with open(p, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return {"path": str(p), "bytes": p.stat().st_size, "sha256": digest.hexdigest()}


def load_source(path: str | Path, resolution: int, width: int | None, height: int | None) -> Source:
    """Read a video and fit every frame to the bucket of its first frame (or to width x height)."""
    frames, fps, _ = read_video(path)
    first = prepare_image(frames[0], resolution=resolution, width=width, height=height)
    h, w = first.shape[:2]
    fitted = np.stack([first, *(fit_to_bucket(f, h, w) for f in frames[1:])])
    return Source(str(path), fitted, fps if fps > 0 else 30.0, describe_file(path))


def check_source(video: str | Path, window: int) -> tuple[float, np.ndarray]:
    """The frame rate and the first frame of `video`, once it is known to be a video that sections of `window` latents
    can extend: a still image, or a clip shorter than the `4 * window - 3` frames a section blends
    into, is a ValueError in one sentence (read from the file's first frames only)."""
    need = 4 * window - 3
    frames, fps, _ = read_video(video, max_frames=need)
    count = frames.shape[0]
    if count == 1:
        raise ValueError(
            f"{video} is a still image, not a video to extend; use it as the start image instead."
        )
    if count < need:
        raise ValueError(
            f"the video {video} has only {count} frames; extending it takes at least {need} "
            f"(one section of {window} latents blends into {need} frames)."
        )
    return fps, frames[0]


def check_extension(
    manifest, settings: GenerationSettings, video: str | Path, image: np.ndarray | None = None
) -> Prepared:
    """What can be checked of an extension of `video` without weights (ValueError, one sentence):
    the settings an extension takes, the video itself (`check_source`), and the settings against
    the bundle's `manifest` with its frame rate. The `Prepared` of `check_settings` (whose
    start image is the video's first frame going forward, without the other frames fitted)."""
    if settings.end_image or settings.keyframes or settings.t2v_colour or settings.loop:
        raise ValueError("a video extension takes no end image, keyframes, text-to-video colour or loop.")
    order = settings.order or manifest.order
    if order not in ("forward", "inverted"):
        raise ValueError(
            "a video is extended in the forward order (after it) or the inverted order (before it)."
        )
    if order == "forward" and settings.image:
        raise ValueError(
            "a forward extension starts from the video itself: drop the start image "
            "(or lead into the video from it with the inverted order)."
        )
    if order == "inverted" and not settings.image:
        raise ValueError("leading into a video (the inverted order) needs a start image to lead from.")
    fps, first = check_source(video, int(settings.window or manifest.window))
    return check_settings(manifest, _with_fps(settings, fps), first if order == "forward" else image)


def _with_fps(settings: GenerationSettings, fps: float) -> GenerationSettings:
    """The settings planned in the source's frame rate, unless they give one."""
    if settings.fps is not None:
        return settings
    return dataclasses.replace(settings, fps=min(max(round(fps), 1), 240))


def prepare_extension(
    bundle, settings: GenerationSettings, video: str | Path, image: np.ndarray | None = None
) -> tuple[Prepared, Source]:
    """Validate an extension of `video` by `settings` (its length is the new part's); ValueError.

    `image` is the start image's pixels for the inverted order (instead of `settings.image`'s file).
    """
    checked = check_extension(bundle.manifest, settings, video, image)
    settings = checked.settings
    resolution = bundle.manifest.resolution if settings.resolution is None else settings.resolution
    if checked.plan.packing_order == "forward":
        source = load_source(video, resolution, settings.width, settings.height)
        return prepare(bundle, settings, image=source.frames[0]), source
    prepared = prepare(bundle, settings, image=image)
    height, width = prepared.image.shape[:2]
    return prepared, load_source(video, resolution, width, height)


def resume_extension(bundle, job_dir: str | Path) -> tuple[Prepared, Source]:
    """`(prepared, source)` of an unfinished extension job, from its settings, its stored start
    image and the video it extends, which must be the same file (size and SHA-256) as when the job
    began; JobError (one sentence) otherwise."""
    job = JobDir(job_dir)
    data = job.read()
    try:
        settings = settings_from_dict(data["settings"])
        path = data["video"]["path"]
    except (TypeError, KeyError) as e:
        raise JobError(f"the settings in {job.root / 'job.json'} are not valid ({e}).") from None
    if not Path(path).is_file():
        raise JobError(f"the video {path} that the job {job.root} extends is missing; put it back to resume.")
    if describe_file(path) != data["video"]:
        raise JobError(
            f"the video {path} has changed since the job {job.root} began "
            "(its size or contents differ); put the original back or delete the job."
        )
    stored = job.root / "images" / "start.png"
    image = load_image(stored) if settings.image and stored.is_file() else None
    return prepare_extension(bundle, settings, path, image=image)


class ExtensionHistory:
    """The history of an extension: the source's latents next to the new part, encoded once.

    Forward: the bank is the source's last latents, growing at the end; each section packs the
    latest latents with the source's first frame as anchor. Inverted: `[start | the new latents |
    the source's head]`; each section packs the new latents after its window, then the source.
    """

    def __init__(self, prepared: Prepared, source: Source) -> None:
        plan, self.source = prepared.plan, source
        self.plan, self.sections, self.noisy_frames = plan, plan.sections, plan.window
        self.forward = plan.packing_order == "forward"
        ws, count = plan.window, source.frames.shape[0]
        self.count = count
        self.n = min(plan.schedule.history_frames + ws, (count - 1) // 4 + 1)  # history + decoder context
        n = self.n
        self.near = source.frames[count - (4 * n - 3) :] if self.forward else source.frames[: 4 * n - 3]

    def encode(self, bundle, prepared: Prepared) -> dict[str, torch.Tensor]:
        """The prompts, the start frame (anchor and image condition), the source's end next to the
        new part (its tail going forward, its head going backward)."""
        tensors = encode_inputs(bundle, prepared)
        tensors["near_latents"] = (
            vae_encode(bundle, from_uint8_frames(self.near)).float().cpu()
        )  # (1, C, n, h, w)
        return tensors

    def setup_video(self, video) -> None:
        """The source's own pixels in the output (a `SegmentedVideo`): the frames a section can
        blend into (at most `4 * ws - 3` next to the seam) as floats in the decoder; the rest stays
        uint8 and is written with the first segment (a resumed job has written it already)."""
        decoder, frames, count = video.decoder, self.source.frames, self.count
        seam, total = min(count, 4 * self.plan.window - 3), self.plan.total_latents
        if self.forward:
            decoder.frames, decoder.lo, decoder.hi = from_uint8_frames(frames[count - seam :]), 0, self.n
            video.pending = frames[: count - seam]
        else:
            decoder.frames, decoder.lo, decoder.hi = from_uint8_frames(frames[:seam]), total, total + self.n
            decoder.clip_starts = (total,)  # the source's first latent is its first frame alone
            video.pending = frames[seam:]

    def begin(self, inputs: dict[str, torch.Tensor]) -> tuple[int, int, int]:
        self.start, near = inputs["start_latent"], inputs["near_latents"]
        _, c, _, h, w = near.shape
        if self.forward:
            self.bank = near  # grows at the end
        else:
            total = self.plan.total_latents
            self.bank = torch.cat([self.start, torch.zeros(1, c, total - 1, h, w), near], dim=2)
        return c, h, w

    def restore(self, section, latents: torch.Tensor) -> None:
        if self.forward:  # generated in display order, each appended
            self.bank = torch.cat([self.bank, latents], dim=2)
        else:
            self.bank[:, :, list(section.window)] = latents

    def pack(self, section, device) -> tuple[torch.Tensor, list]:
        schedule = self.plan.schedule
        if self.forward:  # the last latents so far, the source's first frame as anchor
            layout, anchors = forward_layout(schedule), self.start
            groups = gather_history(self.bank, schedule, "forward")
        else:  # the new latents after this window, then the source: nearest first
            layout, anchors = section.layout, self.bank[:, :, list(section.anchors_from)]
            total = self.plan.total_latents
            later = [*section.history(), *range(total, total + self.n)]
            groups = gather_history(self.bank[:, :, later], schedule, "inverted")
        return torch.tensor(layout.noisy), pack(layout, anchors, groups, schedule, device)

    def settle(self, section, latents: torch.Tensor) -> tuple[int, int, bool]:
        final = section.number == self.plan.sections[-1].number
        if self.forward:
            self.bank = torch.cat([self.bank, latents.float().cpu()], dim=2)  # (1, C, N + ws, h, w)
            return 0, self.bank.shape[2], final
        self.bank[:, :, list(section.window)] = latents.float().cpu()
        start = section.window.start
        return (start if start > 1 else 0), self.plan.total_latents + self.n, final
