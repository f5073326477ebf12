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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ..io import atomic_write, write_json_atomic
from ..model.transformer import HistoryGroup
from ..packing.layout import inverted_layout
from .conditioning import vae_decode
from .decode import to_uint8_frames
from .events import FrameDone, SectionDone
from .output_names import claim_name, default_stem
from .section import encode_inputs
from .settings import Prepared

__all__ = ["FrameOutput", "MAX_INDEX", "OneFrameHistory", "check_one_frame", "group_names"]

MAX_INDEX = 1000


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


@dataclass(frozen=True)
class OneSection:
    """The one section of a one-frame run: number 0, with the first of the timed prompts."""

    number: int = 0
    prompt_index: int = 0


class OneFrameHistory:
    """One noisy latent at time `index`, the start latent at 0 and the chosen history groups at the
    inverted order's first-section places: zeros, except `post`, which holds the reference image
    when one is given. Checked by `check_one_frame` (and the reference needs `post`)."""

    def __init__(self, prepared: Prepared, index: int, groups: Sequence[str]) -> None:
        self.plan, self.index, self.groups = prepared.plan, index, tuple(groups)
        self.sections, self.noisy_frames = [OneSection()], 1
        self.reference = prepared.end_image is not None
        self.layout = inverted_layout(self.plan.schedule, blank=0)

    def encode(self, bundle, prepared: Prepared) -> dict[str, torch.Tensor]:
        return encode_inputs(bundle, prepared)  # the reference image is `ref_latent_0`

    def begin(self, inputs: dict[str, torch.Tensor]) -> tuple[int, int, int]:
        self.start = inputs["start_latent"]  # (1, C, 1, h, w)
        self.post = inputs["ref_latent_0"] if self.reference else None
        _, c, _, h, w = self.start.shape
        self.shape, self.bank = (c, h, w), None
        return c, h, w

    def restore(self, section, latents: torch.Tensor) -> None:  # nothing is committed
        raise AssertionError("a one-frame run has no committed sections")

    def history_indices(self) -> list[int]:
        """The time indices of the packed history, in the order fed (for the sidecar)."""
        k1 = list(self.layout.start)
        rest = []
        for name, idx in zip(group_names(self.plan.schedule), self.layout.groups, strict=True):
            if name in self.groups:
                (k1 if name == "post" else rest).extend(int(i) for i in idx)
        return [int(i) for i in k1] + rest

    def pack(self, section, device) -> tuple[torch.Tensor, list]:
        schedule, (c, h, w) = self.plan.schedule, self.shape
        k1_latents, k1_indices = [self.start], list(self.layout.start)
        packed = []
        for name, g, idx in zip(group_names(schedule), schedule.groups, self.layout.groups, strict=True):
            if name not in self.groups:
                continue
            latents = (
                self.post if name == "post" and self.post is not None else torch.zeros(1, c, g.frames, h, w)
            )
            if name == "post":
                k1_latents.append(latents)
                k1_indices += list(idx)
            else:
                packed.append(HistoryGroup(latents.to(device), torch.tensor(idx), g.kernel.name))
        k1 = torch.cat(k1_latents, dim=2).to(device)
        packed.insert(0, HistoryGroup(k1, torch.tensor(k1_indices), schedule.groups[0].kernel.name))
        return torch.tensor([self.index]), packed

    def settle(self, section, latents: torch.Tensor) -> tuple[int, int, bool]:
        return 0, 1, True


class FrameOutput:
    """The output of a one-frame run: `<name>.png`, then `<name>.json`, in `out_dir`; no job
    directory (one section has nothing to resume)."""

    def __init__(self, bundle, prepared: Prepared, out_dir: str | Path, info: dict) -> None:
        self.bundle, self.settings, self.out, self.info = bundle, prepared.settings, Path(out_dir), info
        self.started = time.perf_counter()

    def inputs(self, prepared: Prepared, encode) -> dict[str, torch.Tensor]:
        return encode()

    def restore(self, numbers: list[int], generator: torch.Generator):
        return {}, None

    def commit(self, number, latents, bank, lo, hi, final, generator, t0: float) -> SectionDone:
        with torch.no_grad():
            decoded = vae_decode(self.bundle, latents.float().to(self.bundle.device)).float().cpu()
        self.frame = to_uint8_frames(decoded)[0]  # (H, W, 3)
        return SectionDone(number, 1, None, 0, time.perf_counter() - t0)

    def _write_png(self, stem: str, replace: bool = False) -> None:
        with atomic_write(self.out / f"{stem}.png", replace=replace) as tmp:
            Image.fromarray(self.frame).save(tmp, format="PNG")

    def finish(self, extra: dict) -> FrameDone:
        s = self.settings
        self.out.mkdir(parents=True, exist_ok=True)
        if s.name:
            stem = s.name
            self._write_png(stem, replace=True)
        else:  # the complete PNG claims a default name (framepack.pipeline.output_names)
            stem = claim_name(self.out, default_stem(s.seed, "frame"), self._write_png)
        image_path, sidecar_path = self.out / f"{stem}.png", self.out / f"{stem}.json"
        info = {
            **self.info,
            "image": image_path.name,
            "wall_seconds": round(time.perf_counter() - self.started, 3),  # the run's time
        }
        info.update(extra)
        write_json_atomic(info, sidecar_path)
        return FrameDone(image_path, sidecar_path, self.frame, info)
