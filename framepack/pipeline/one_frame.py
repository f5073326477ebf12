"""One-frame inference: a single frame at a chosen future time index (the community "1-frame" mode).

The packed model places every latent on one time axis (FRAMEPACK.md section 4). Sampling a
window of one latent at time index `index`, with the start image as the clean frame at index 0
and the rest of the inverted order's history at its usual places, asks the model what the scene
looks like `index` latents later: with a prompt that describes a change (a pose, clothing), the
frame is an edit of the start image. Larger indices allow larger changes.

The layout is the inverted order's first section with no padding, `[start | ws window | post |
k2 | k4]`, where the one noisy latent takes `index` instead of the window: by default the last
window slot, `index = ws`. `groups` picks which history groups are fed: `post` (the k1 history
frame just after the window), then the schedule's larger kernels (`k2`, `k4` for the release).
They hold zeros, as in a first section, except `post`, which holds the reference image when
one is given (`--end-image`: the "kisekaeichi" reference). Leaving groups out shortens the
context and changes the result; which works best depends on the LoRA or edit.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..lora import applied_loras
from ..model.transformer import HistoryGroup
from ..packing.layout import inverted_layout
from ..sampling import get_sampler, noisy_tokens, sigma_schedule
from .decode import from_uint8_frames, to_uint8_frames
from .generate import Prepared, make_denoiser
from .speed import accelerate_run

__all__ = ["FrameDone", "group_names", "check_one_frame", "generate_frame", "MAX_INDEX"]

MAX_INDEX = 1000


@dataclass
class FrameDone:
    image: Path  # the PNG
    sidecar: Path  # its JSON settings, written last
    frame: np.ndarray  # (H, W, 3) uint8
    info: dict


def group_names(schedule) -> tuple[str, ...]:
    """Names of the schedule's history groups: `post` for the k1 group, then the kernel names."""
    return ("post", *(g.kernel.name for g in schedule.groups[1:]))


def check_one_frame(
    schedule, window: int, index: int | None, groups: Sequence[str]
) -> tuple[int, tuple[str, ...]]:
    """Validated `(index, groups)`; the index defaults to the window's last slot."""
    index = window if index is None else index
    if not isinstance(index, int) or isinstance(index, bool) or not 1 <= index <= MAX_INDEX:
        raise ValueError(f"the one-frame index must be a whole number from 1 to {MAX_INDEX}, got {index!r}.")
    names = group_names(schedule)
    unknown = [g for g in groups if g not in names]
    if unknown:
        raise ValueError(f"unknown history group {unknown[0]!r}; choose from {', '.join(names)}.")
    return index, tuple(g for g in names if g in groups)


def generate_frame(
    bundle,
    prepared: Prepared,
    out_dir: str | Path,
    index: int | None = None,
    groups: Sequence[str] = ("post", "k2", "k4"),
    cancel: Callable[[], bool] | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> FrameDone:
    """Generate one frame at latent time `index` from `prepared` (start image, prompt, seed, LoRAs).

    Writes `<name>.png` and then `<name>.json` into `out_dir`. Uses the first of timed prompts;
    the length, order, keyframes and video settings do not apply. Raises ValueError on bad input
    before anything is written.
    """
    from ..io import atomic_write, write_json_atomic
    from .conditioning import encode_image, encode_prompt, vae_decode, vae_encode
    from .speed import offloaded

    s, plan = prepared.settings, prepared.plan
    schedule, ws = plan.schedule, plan.window
    index, groups = check_one_frame(schedule, ws, index, tuple(groups))
    if prepared.end_image is not None and "post" not in groups:
        raise ValueError("a reference image (--end-image) goes into the post group; keep post in the groups.")
    started = time.perf_counter()
    model = bundle.transformer
    device = bundle.device
    layout = inverted_layout(schedule, blank=0)
    # As `generate_events`: LoRAs on, then under a VRAM budget the encoders visit the device while
    # the transformer is away, then the transformer is streamed (and cached) and the VAE visits.
    with (
        applied_loras(model, prepared.loras),
        offloaded(bundle, s.vram_budget, s.fp8_weights, prepared) as memory,
    ):
        with torch.no_grad(), memory.transformer_away(model):
            cond = encode_prompt(bundle, prepared.prompts[0])
            negative = encode_prompt(bundle, s.negative_prompt) if prepared.cfg != 1 else None
            siglip = encode_image(bundle, prepared.image)
            start = (
                vae_encode(bundle, from_uint8_frames(prepared.image[None])).float().cpu()
            )  # (1, C, 1, h, w)
            post = None
            if prepared.end_image is not None:
                post = vae_encode(bundle, from_uint8_frames(prepared.end_image[None])).float().cpu()
        speed = accelerate_run(model, device, s, memory)
        _, c, _, h, w = start.shape

        k1_latents, k1_indices = [start], list(layout.start)
        packed = []
        for name, g, idx in zip(group_names(schedule), schedule.groups, layout.groups, strict=True):
            if name not in groups:
                continue
            latents = post if name == "post" and post is not None else torch.zeros(1, c, g.frames, h, w)
            if name == "post":
                k1_latents.append(latents)
                k1_indices += list(idx)
            else:
                packed.append(HistoryGroup(latents.to(device), torch.tensor(idx), g.kernel.name))
        k1 = HistoryGroup(
            torch.cat(k1_latents, dim=2).to(device), torch.tensor(k1_indices), schedule.groups[0].kernel.name
        )
        packed.insert(0, k1)
        noisy_indices = torch.tensor([index])
        guidance = torch.tensor([prepared.distilled_cfg * 1000.0])

        denoise = make_denoiser(
            model, device, noisy_indices, packed, cond, negative, guidance, siglip, prepared
        )

        generator = torch.Generator("cpu").manual_seed(s.seed)
        noise = torch.randn((1, c, 1, h, w), generator=generator)  # (1, C, 1, h, w): one latent
        sigmas = sigma_schedule(prepared.steps, seq_len=noisy_tokens(1, h, w), shift=s.shift)
        callback = None if on_step is None else (lambda i, n, x, x0: on_step(i, n))
        speed.new_section(len(sigmas) - 1, 1 if negative is None else 2)
        with torch.no_grad():
            latent = get_sampler(s.sampler)(denoise, noise, sigmas, callback=callback, cancel=cancel)
            frame = to_uint8_frames(vae_decode(bundle, latent.float().to(device)).float().cpu())[
                0
            ]  # (H, W, 3)
        speed_info = speed.info()

    out = Path(out_dir)
    stem = s.name or time.strftime("framepack_frame_%Y%m%d-%H%M%S") + f"_{s.seed}"
    image_path, sidecar_path = out / f"{stem}.png", out / f"{stem}.json"
    from PIL import Image

    with atomic_write(image_path) as tmp:
        Image.fromarray(frame).save(tmp, format="PNG")
    info = {
        "settings": s.to_dict(),
        "bundle": str(getattr(bundle, "root", "")),
        "one_frame": {
            "index": index,
            "groups": list(groups),
            "history_indices": [int(i) for g in packed for i in g.indices],
            "reference": s.end_image,
        },
        "image": image_path.name,
        "seconds": round(time.perf_counter() - started, 3),
        **speed_info,
    }
    write_json_atomic(info, sidecar_path)
    return FrameDone(image_path, sidecar_path, frame, info)
