"""Video extension: continue an existing video section by section, in the forward order.

The source's first frame is the start anchor (as the start image of the forward / F1 order) and
its last latents are the packed history, so the first new section continues where the video
ends. Only the tail of the source is encoded: the history the schedule packs plus one window of
decoder context. The output is the source's frames (fitted to the resolution bucket), then the
new sections, joined by the same linear overlap blend as between sections (FRAMEPACK.md
section 6): the source's last `4 * ws - 3` frames cross-fade into their decoded version, the
frames before them are the source's. The source's fps is kept unless `fps` is given.
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
from ..memory.runtime import accelerate
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
    if settings.image or settings.end_image or settings.keyframes or settings.t2v_colour:
        raise ValueError("a video extension starts from the video: drop the start/end image and keyframes.")
    resolution = settings.resolution or bundle.manifest.resolution
    source = load_source(video, resolution, settings.width, settings.height)
    if settings.fps is None:  # plan in the source's frame rate
        settings = dataclasses.replace(settings, fps=min(max(round(source.fps), 1), 240))
    prepared = prepare(bundle, settings, image=source.frames[0])
    if prepared.plan.packing_order != "forward":
        raise ValueError(
            "a video is extended forward: use a forward-order model (e.g. hunyuan-f1) or --order forward."
        )
    return prepared, source


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
    with applied_loras(bundle.transformer, prepared.loras):
        yield from _extend(bundle, prepared, source, out_dir, cancel)


def _extend(bundle, prepared: Prepared, source: Source, out_dir, cancel) -> Iterator[Event]:
    from ..io import write_gif, write_json_atomic, write_mp4, write_png_frames
    from .conditioning import encode_image, encode_prompt, vae_decode, vae_encode

    s, plan = prepared.settings, prepared.plan
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = s.name or time.strftime("framepack_%Y%m%d-%H%M%S") + f"_{s.seed}"
    video_path, sidecar_path = out / f"{stem}.mp4", out / f"{stem}.json"
    started = time.perf_counter()
    model = bundle.transformer
    speed = accelerate(model, model.device, s.vram_budget, s.cache, s.cache_threshold, s.cache_coefficients)
    device, schedule, ws = model.device, plan.schedule, plan.window

    # 1. Conditioning: the prompts, the first frame (anchor and image condition), the source's tail.
    yield Stage("encoding")
    total = source.frames.shape[0]
    n = min(schedule.history_frames + ws, (total - 1) // 4 + 1)  # tail latents: history + decoder context
    with torch.no_grad():
        prompts = [encode_prompt(bundle, p) for p in prepared.prompts]
        negative = encode_prompt(bundle, s.negative_prompt) if s.cfg != 1 else None
        siglip = encode_image(bundle, source.frames[0])
        start = vae_encode(bundle, _pixels(source.frames[:1])).float().cpu()  # (1, C, 1, h, w)
        bank = (
            vae_encode(bundle, _pixels(source.frames[total - (4 * n - 3) :])).float().cpu()
        )  # (1, C, n, h, w)
    _, c, _, h, w = bank.shape

    decoder = IncrementalDecoder(lambda lat: vae_decode(bundle, lat.to(device)).float().cpu(), ws)
    decoder.frames, decoder.lo, decoder.hi = source.frames, 0, n  # the source's own pixels, unchanged
    generator = torch.Generator("cpu").manual_seed(s.seed)
    sampler = get_sampler(s.sampler)
    sigmas = sigma_schedule(prepared.steps, seq_len=noisy_tokens(ws, h, w), shift=s.shift)
    guidance = torch.tensor([prepared.distilled_cfg * 1000.0])
    layout = forward_layout(schedule)
    kernels = [g.kernel.name for g in schedule.groups]
    info = {
        "settings": s.to_dict(),
        "bundle": str(getattr(bundle, "root", "")),
        "sections": len(plan.sections),
        "extension": {"source": source.path, "source_frames": int(total), "source_fps": source.fps},
    }

    for section in plan.sections:
        t0 = time.perf_counter()
        groups = gather_history(bank, schedule, "forward")  # the last history_frames latents, packed
        packed = [
            HistoryGroup(torch.cat([start, groups[0]], dim=2), torch.tensor(layout.clean_k1()), kernels[0])
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
        bank = torch.cat([bank, latents.float().cpu()], dim=2)  # (1, C, N + ws, h, w)

        yield Stage("decoding")
        with torch.no_grad():
            decoder.update(bank, 0, bank.shape[2])
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
