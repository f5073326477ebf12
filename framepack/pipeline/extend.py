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
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..lora import applied_loras
from ..model.transformer import HistoryGroup
from ..packing.layout import forward_layout, gather_history
from ..sampling import get_sampler, noisy_tokens, sigma_schedule
from .decode import from_uint8_frames
from .generate import (
    Event,
    GenerationSettings,
    Prepared,
    Stage,
    StepEvent,
    encode_inputs,
    make_denoiser,
    prepare,
    prompt_embeds,
    sample_live,
    section_decoder,
    used_settings,
)
from .speed import accelerate_run

__all__ = ["Source", "describe_file", "load_source", "prepare_extension", "extend_events", "resume_extension"]


@dataclass
class Source:
    """The video being extended, fitted to one resolution bucket."""

    path: str
    frames: np.ndarray  # (T, H, W, 3) uint8
    fps: float
    file: dict = field(default_factory=dict)  # {"path", "bytes", "sha256"} of the file read

    def check(self, job) -> None:
        """JobError unless `job` extends this very file (same path, size and contents)."""
        from .jobs import JobError

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
    from ..io import fit_to_bucket, prepare_image, read_video

    frames, fps, _ = read_video(path)
    first = prepare_image(frames[0], resolution=resolution, width=width, height=height)
    h, w = first.shape[:2]
    fitted = np.stack([first, *(fit_to_bucket(f, h, w) for f in frames[1:])])
    return Source(str(path), fitted, fps if fps > 0 else 30.0, describe_file(path))


def prepare_extension(
    bundle, settings: GenerationSettings, video: str | Path, image: np.ndarray | None = None
) -> tuple[Prepared, Source]:
    """Validate an extension of `video` by `settings` (its length is the new part's); ValueError.

    `image` is the start image's pixels for the inverted order (instead of `settings.image`'s file).
    """
    from ..io import read_video

    if settings.end_image or settings.keyframes or settings.t2v_colour or settings.loop:
        raise ValueError("a video extension takes no end image, keyframes, text-to-video colour or loop.")
    order = settings.order or bundle.manifest.order
    if order not in ("forward", "inverted"):
        raise ValueError(
            "a video is extended in the forward order (after it) or the inverted order (before it)."
        )
    resolution = settings.resolution or bundle.manifest.resolution
    if settings.fps is None:  # plan in the source's frame rate
        fps = read_video(video, max_frames=1)[1]
        settings = dataclasses.replace(settings, fps=min(max(round(fps), 1), 240))
    if order == "forward":
        if settings.image:
            raise ValueError(
                "a forward extension starts from the video itself: drop the start image "
                "(or lead into the video from it with the inverted order)."
            )
        source = load_source(video, resolution, settings.width, settings.height)
        return prepare(bundle, settings, image=source.frames[0]), source
    if not settings.image:
        raise ValueError("leading into a video (the inverted order) needs a start image to lead from.")
    prepared = prepare(bundle, settings, image=image)
    height, width = prepared.image.shape[:2]
    return prepared, load_source(video, resolution, width, height)


def resume_extension(bundle, job_dir: str | Path) -> tuple[Prepared, Source]:
    """`(prepared, source)` of an unfinished extension job, from its settings, its stored start
    image and the video it extends, which must be the same file (size and SHA-256) as when the job
    began; JobError (one sentence) otherwise. Pass both on to `extend_events(..., job=job_dir)`."""
    from ..io import load_image
    from .generate import settings_from_dict
    from .jobs import Job, JobError

    job = Job(job_dir)
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


def extend_events(
    bundle,
    prepared: Prepared,
    source: Source,
    out_dir: str | Path,
    cancel: Callable[[], bool] | None = None,
    job: str | Path | None = None,
) -> Iterator[Event]:
    """Generate `prepared`'s sections after `source`, yielding the same events as `generate_events`.

    Works in a job directory as `generate_events` does (`framepack.pipeline.jobs`), which also
    records the source file (path, size, SHA-256): `job` resumes one (`resume_extension`), and an
    unfinished one of the same settings and video in `out_dir` is resumed too.
    """
    from .jobs import open_job
    from .speed import offloaded

    s = prepared.settings
    with (
        open_job(out_dir, job, s, bundle, prepared.plan.packing_order, {"video": source.file}) as job,
        applied_loras(bundle.transformer, prepared.loras),
        offloaded(bundle, s.vram_budget, s.fp8_weights, prepared) as memory,
    ):
        source.check(job)
        job.check_images(prepared)
        yield from _extend(bundle, prepared, source, job, cancel, memory)


def _extend(bundle, prepared: Prepared, source: Source, job, cancel, memory) -> Iterator[Event]:
    from .conditioning import vae_encode
    from .jobs import JobRun, SegmentedVideo

    s, plan = prepared.settings, prepared.plan
    model = bundle.transformer
    device, schedule, ws = bundle.device, plan.schedule, plan.window

    # 1. Conditioning: the prompts, the start frame (anchor and image condition), the source's end
    #    next to the new part (its tail going forward, its head going backward); once per job.
    yield Stage("encoding")
    forward = plan.packing_order == "forward"
    count = source.frames.shape[0]
    n = min(schedule.history_frames + ws, (count - 1) // 4 + 1)  # history + decoder context, in latents
    near = source.frames[count - (4 * n - 3) :] if forward else source.frames[: 4 * n - 3]

    def encode() -> dict[str, torch.Tensor]:
        with torch.no_grad(), memory.transformer_away(model):  # under a budget: the encoders visit alone
            tensors = encode_inputs(bundle, prepared)  # prompts, SigLIP and latent of the start frame
            tensors["near_latents"] = (
                vae_encode(bundle, from_uint8_frames(near)).float().cpu()
            )  # (1, C, n, h, w)
        return tensors

    inputs = job.inputs(prepared, encode)
    prompts, negative = prompt_embeds(inputs, prepared, device)
    siglip = inputs["siglip"].to(device)
    start, near_latents = inputs["start_latent"], inputs["near_latents"]
    _, c, _, h, w = near_latents.shape
    speed = accelerate_run(model, device, s, memory)

    decoder = section_decoder(bundle, device, ws)
    total = plan.total_latents  # inverted: [start | the new latents], then the source's head
    # The source's own pixels: the frames a section can blend into (at most 4 * ws - 3 next to the
    # seam) as floats in the decoder; the rest stays uint8 and is written with the first segment.
    seam = min(count, 4 * ws - 3)
    if forward:
        bank = near_latents  # grows at the end
        decoder.frames, decoder.lo, decoder.hi = from_uint8_frames(source.frames[count - seam :]), 0, n
        far = source.frames[: count - seam]
    else:
        bank = torch.cat([start, torch.zeros(1, c, total - 1, h, w), near_latents], dim=2)
        decoder.frames, decoder.lo, decoder.hi = from_uint8_frames(source.frames[:seam]), total, total + n
        decoder.clip_starts = (total,)  # the source's first latent is its first frame alone
        far = source.frames[seam:]
    generator = torch.Generator("cpu").manual_seed(s.seed)
    sampler = get_sampler(s.sampler)
    sigmas = sigma_schedule(prepared.steps, seq_len=noisy_tokens(ws, h, w), shift=s.shift)
    guidance = torch.tensor([prepared.distilled_cfg * 1000.0])
    kernels = [g.kernel.name for g in schedule.groups]
    info = {
        "settings": s.to_dict(),
        "used": used_settings(prepared),
        "bundle": str(getattr(bundle, "root", "")),
        "sections": len(plan.sections),
        "extension": {"source": source.path, "source_frames": int(count), "source_fps": source.fps},
    }
    video = SegmentedVideo(job, decoder, not forward, source.fps, s.crf, s.gif or s.png)
    video.pending = far  # a resumed job has written it already (restore drops it)
    run = JobRun(job, video, info, len(plan.sections))
    saved, restored = run.restore([section.number for section in plan.sections], generator)
    for section in plan.sections:  # the committed sections' latents back in the bank
        if section.number not in saved:
            continue
        if forward:  # generated in display order, each appended
            bank = torch.cat([bank, saved[section.number]], dim=2)
        else:
            bank[:, :, list(section.window)] = saved[section.number]
    if restored is not None:
        yield restored

    for section in plan.sections:
        if section.number in saved:
            continue
        t0 = time.perf_counter()
        if forward:  # the last latents so far, the source's first frame as anchor
            layout, anchors = forward_layout(schedule), start
            groups = gather_history(bank, schedule, "forward")
        else:  # the new latents after this window, then the source: nearest first
            layout, anchors = section.layout, bank[:, :, list(section.anchors_from)]
            later = [*section.history(), *range(total, total + n)]
            groups = gather_history(bank[:, :, later], schedule, "inverted")
        packed = [
            HistoryGroup(torch.cat([anchors, groups[0]], dim=2), torch.tensor(layout.clean_k1()), kernels[0])
        ]
        packed += [
            HistoryGroup(groups[i], torch.tensor(layout.groups[i]), kernels[i]) for i in range(1, len(groups))
        ]
        packed = [HistoryGroup(g.latents.to(device), g.indices, g.kernel) for g in packed]
        cond = prompts[section.prompt_index]
        denoise = make_denoiser(
            model, device, torch.tensor(layout.noisy), packed, cond, negative, guidance, siglip, prepared
        )
        noise = torch.randn((1, c, ws, h, w), generator=generator)
        speed.new_section(len(sigmas) - 1, 1 if negative is None else 2)
        yield Stage("sampling")
        for event in sample_live(sampler, denoise, noise, sigmas, section.number, len(plan.sections), cancel):
            if isinstance(event, StepEvent):
                yield event
            else:
                latents = event
        if forward:
            bank = torch.cat([bank, latents.float().cpu()], dim=2)  # (1, C, N + ws, h, w)
            lo, hi = 0, bank.shape[2]
        else:
            bank[:, :, list(section.window)] = latents.float().cpu()
            lo, hi = (section.window.start if section.window.start > 1 else 0), total + n

        yield Stage("decoding")
        final = section.number == plan.sections[-1].number
        yield run.commit(section.number, latents, bank, lo, hi, final, generator, t0)

    yield Stage("writing")
    yield run.finish(s.png, s.gif, source.fps, speed.info())
