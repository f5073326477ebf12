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
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..lora import applied_loras
from ..model.transformer import HistoryGroup
from ..packing.layout import forward_layout, gather_history
from ..sampling import get_sampler, noisy_tokens, sigma_schedule
from .decode import IncrementalDecoder
from .generate import (
    Event,
    Finished,
    GenerationSettings,
    Prepared,
    SectionDone,
    Stage,
    StepEvent,
    _sample_live,
    accelerate_run,
    make_denoiser,
    prepare,
)

__all__ = ["Source", "load_source", "prepare_extension", "extend_events"]


@dataclass
class Source:
    """The video being extended, fitted to one resolution bucket."""

    path: str
    frames: np.ndarray  # (T, H, W, 3) uint8
    fps: float


def load_source(path: str | Path, resolution: int, width: int | None, height: int | None) -> Source:
    """Read a video and fit every frame to the bucket of its first frame (or to width x height)."""
    from ..io import fit_to_bucket, prepare_image, read_video

    frames, fps, _ = read_video(path)
    first = prepare_image(frames[0], resolution=resolution, width=width, height=height)
    h, w = first.shape[:2]
    fitted = np.stack([first, *(fit_to_bucket(f, h, w) for f in frames[1:])])
    return Source(str(path), fitted, fps if fps > 0 else 30.0)


def prepare_extension(bundle, settings: GenerationSettings, video: str | Path) -> tuple[Prepared, Source]:
    """Validate an extension of `video` by `settings` (its length is the new part's); ValueError."""
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
    prepared = prepare(bundle, settings)
    height, width = prepared.image.shape[:2]
    return prepared, load_source(video, resolution, width, height)


def _pixels(frames: np.ndarray) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (1, 3, T, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).float().div(127.5).sub(1).permute(3, 0, 1, 2)[None]


def extend_events(
    bundle,
    prepared: Prepared,
    source: Source,
    out_dir: str | Path,
    cancel: Callable[[], bool] | None = None,
) -> Iterator[Event]:
    """Generate `prepared`'s sections after `source`, yielding the same events as `generate_events`."""
    from .conditioning import offloaded

    with (
        applied_loras(bundle.transformer, prepared.loras),
        offloaded(bundle, prepared.settings.vram_budget, prepared.settings.fp8_weights) as memory,
    ):
        yield from _extend(bundle, prepared, source, out_dir, cancel, memory)


def _extend(bundle, prepared: Prepared, source: Source, out_dir, cancel, memory) -> Iterator[Event]:
    from ..io import write_gif, write_json_atomic, write_mp4, write_png_frames
    from .conditioning import encode_image, encode_prompt, vae_decode, vae_encode

    s, plan = prepared.settings, prepared.plan
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = s.name or time.strftime("framepack_%Y%m%d-%H%M%S") + f"_{s.seed}"
    video_path, sidecar_path = out / f"{stem}.mp4", out / f"{stem}.json"
    started = time.perf_counter()
    model = bundle.transformer
    device, schedule, ws = model.device, plan.schedule, plan.window

    # 1. Conditioning: the prompts, the start frame (anchor and image condition), the source's end
    #    next to the new part (its tail going forward, its head going backward).
    yield Stage("encoding")
    forward = plan.packing_order == "forward"
    first = source.frames[0] if forward else prepared.image  # (H, W, 3)
    count = source.frames.shape[0]
    n = min(schedule.history_frames + ws, (count - 1) // 4 + 1)  # history + decoder context, in latents
    near = source.frames[count - (4 * n - 3) :] if forward else source.frames[: 4 * n - 3]
    with torch.no_grad(), memory.transformer_away(model):  # under a budget: the encoders visit alone
        prompts = [encode_prompt(bundle, p) for p in prepared.prompts]
        negative = encode_prompt(bundle, s.negative_prompt) if s.cfg != 1 else None
        siglip = encode_image(bundle, first)
        start = vae_encode(bundle, _pixels(first[None])).float().cpu()  # (1, C, 1, h, w)
        near_latents = vae_encode(bundle, _pixels(near)).float().cpu()  # (1, C, n, h, w)
    _, c, _, h, w = near_latents.shape
    speed = accelerate_run(model, device, s, memory)

    decoder = IncrementalDecoder(lambda lat: vae_decode(bundle, lat.to(device)).float().cpu(), ws)
    total = plan.total_latents  # inverted: [start | the new latents], then the source's head
    if forward:
        bank = near_latents  # grows at the end
        decoder.frames, decoder.lo, decoder.hi = source.frames, 0, n  # the source's own pixels
    else:
        bank = torch.cat([start, torch.zeros(1, c, total - 1, h, w), near_latents], dim=2)
        decoder.frames, decoder.lo, decoder.hi = source.frames, total, total + n
    generator = torch.Generator("cpu").manual_seed(s.seed)
    sampler = get_sampler(s.sampler)
    sigmas = sigma_schedule(prepared.steps, seq_len=noisy_tokens(ws, h, w), shift=s.shift)
    guidance = torch.tensor([prepared.distilled_cfg * 1000.0])
    kernels = [g.kernel.name for g in schedule.groups]
    info = {
        "settings": s.to_dict(),
        "bundle": str(getattr(bundle, "root", "")),
        "sections": len(plan.sections),
        "extension": {"source": source.path, "source_frames": int(count), "source_fps": source.fps},
    }

    for section in plan.sections:
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
            model, device, torch.tensor(layout.noisy), packed, cond, negative, guidance, siglip, s
        )
        noise = torch.randn((1, c, ws, h, w), generator=generator)
        speed.new_section(len(sigmas) - 1, 1 if negative is None else 2)
        yield Stage("sampling")
        for event in _sample_live(
            sampler, denoise, noise, sigmas, section.number, len(plan.sections), cancel
        ):
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
        with torch.no_grad():
            decoder.update(bank, lo, hi)
        frames = decoder.frames
        info["frames"] = int(frames.shape[0])
        write_mp4(frames, video_path, fps=source.fps, crf=s.crf, metadata={"framepack": json.dumps(info)})
        yield SectionDone(
            section.number, len(plan.sections), video_path, int(frames.shape[0]), time.perf_counter() - t0
        )

    yield Stage("writing")
    if s.png:
        write_png_frames(decoder.frames, out / f"{stem}_frames")
    gif_path = write_gif(decoder.frames, out / f"{stem}.gif", fps=source.fps) if s.gif else None
    info.update(
        video=video_path.name,
        gif=gif_path.name if gif_path else None,
        seconds=round(time.perf_counter() - started, 3),
        **speed.info(),
    )
    write_json_atomic(info, sidecar_path)
    yield Finished(video_path, int(decoder.frames.shape[0]), sidecar_path, gif_path, info["seconds"], info)
