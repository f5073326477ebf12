"""The section loop: the one spine every run goes through, a generation, an extension or one frame.

`run_sections(bundle, prepared, history, output, cancel, memory)` encodes the conditioning once,
then samples the history's sections in generation order, each from one CPU generator seeded once,
and hands every finished section to the output. The kinds of run differ only in their history
(where its latents start, how a section's packed context is gathered, what a finished section
shows) and in their output (a video in a job directory, `framepack.pipeline.video_output`, or one
PNG, `framepack.pipeline.one_frame`). A history has:

- `sections`: what to sample, in generation order (each with `.number` and `.prompt_index`), and
  `noisy_frames`, the latents sampled per section;
- `encode(bundle, prepared)`: the conditioning tensors by name (what a job directory stores);
- `begin(inputs) -> (C, h, w)`: its latents from the stored conditioning;
- `restore(section, latents)`: a committed section's latents back in place (a resumed run);
- `pack(section, device) -> (noisy indices, packed history groups)`;
- `settle(section, latents) -> (lo, hi, final)`: the sampled latents in place, and the latent range
  `[lo, hi)` of `bank` to show now; `bank`: every latent on one time axis.

An output has `inputs(prepared, encode)`, `restore(numbers, generator)`, `commit(...)` and
`finish(extra)` (see `VideoOutput`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import numpy as np
import torch

from ..packing.layout import gather_history
from ..sampling import get_sampler, noisy_tokens, sigma_schedule
from .budget import host_tier_budget
from .events import Event, Stage, StepEvent
from .section import encode_inputs, make_denoiser, pack, prompt_embeds, sample_live
from .settings import Prepared
from .speed import accelerate_run

__all__ = ["GenerationHistory", "run_sections"]


def run_sections(
    bundle, prepared: Prepared, history, output, cancel: Callable[[], bool] | None, memory
) -> Iterator[Event]:
    """Sample `history`'s sections into `output`, yielding the run's events (see the module).

    `memory` is the run's `Offloader` (`framepack.pipeline.speed.offloaded`): under a VRAM budget
    the transformer is off the device while the encoders run. Raises
    `framepack.sampling.Cancelled` when `cancel()` turns true (between sampling steps).
    """
    s = prepared.settings
    model, device = bundle.transformer, bundle.device
    yield Stage("encoding")

    def encode() -> dict[str, torch.Tensor]:
        with torch.no_grad(), memory.transformer_away(model):
            return history.encode(bundle, prepared)

    inputs = output.inputs(prepared, encode)  # a resumed run reads it back from its job
    # Weight streaming (from host memory and the weights' files) and the step cache, as hooks.
    speed = accelerate_run(model, device, s, memory, host_tier_budget(s, bundle))
    prompts, negative = prompt_embeds(inputs, prepared, device)
    siglip = inputs["siglip"].to(device)
    c, h, w = history.begin(inputs)

    generator = torch.Generator("cpu").manual_seed(s.seed)
    sampler = get_sampler(s.sampler)
    sigmas = sigma_schedule(prepared.steps, seq_len=noisy_tokens(history.noisy_frames, h, w), shift=s.shift)
    guidance = torch.tensor([prepared.distilled_cfg * 1000.0])
    saved, restored = output.restore([section.number for section in history.sections], generator)
    for section in history.sections:
        if section.number in saved:
            history.restore(section, saved[section.number])
    if restored is not None:
        yield restored

    count = len(history.sections)
    for section in history.sections:
        if section.number in saved:
            continue
        t0 = time.perf_counter()
        noisy, packed = history.pack(section, device)
        cond = prompts[section.prompt_index]
        denoise = make_denoiser(model, device, noisy, packed, cond, negative, guidance, siglip, prepared)
        noise = torch.randn((1, c, history.noisy_frames, h, w), generator=generator)  # one generator
        speed.new_section(len(sigmas) - 1, 1 if negative is None else 2)
        yield Stage("sampling")
        for event in sample_live(sampler, denoise, noise, sigmas, section.number, count, cancel):
            if isinstance(event, StepEvent):
                yield event
            else:
                latents = event
        lo, hi, final = history.settle(section, latents)
        yield Stage("decoding")
        yield output.commit(section.number, latents, history.bank, lo, hi, final, generator, t0)

    yield Stage("writing")
    yield output.finish(speed.info())


class GenerationHistory:
    """A video from a start image (and end image, keyframes): every latent of the plan on one axis,
    the start latent first and the reference latents (end image, keyframes) after the last."""

    def __init__(self, prepared: Prepared) -> None:
        self.plan = prepared.plan
        self.sections = self.plan.sections
        self.noisy_frames = self.plan.window

    def encode(self, bundle, prepared: Prepared) -> dict[str, torch.Tensor]:
        return encode_inputs(bundle, prepared)

    def begin(self, inputs: dict[str, torch.Tensor]) -> tuple[int, int, int]:
        start_latent = inputs["start_latent"]  # (1, C, 1, h, w)
        count = sum(k.startswith("ref_latent_") for k in inputs)
        refs = [inputs[f"ref_latent_{i}"] for i in range(count)]
        _, c, _, h, w = start_latent.shape
        total = self.plan.total_latents
        self.bank = torch.zeros(1, c, total + len(refs), h, w)
        self.bank[:, :, 0] = start_latent[:, :, 0]
        for i, lat in enumerate(refs):
            self.bank[:, :, total + i] = lat[:, :, 0]
        self.done = np.zeros(total, dtype=bool)
        self.done[0] = True
        return c, h, w

    def restore(self, section, latents: torch.Tensor) -> None:
        self.bank[:, :, list(section.window)] = latents
        self.done[list(section.window)] = True

    def pack(self, section, device) -> tuple[torch.Tensor, list]:
        """The anchors (start latent, end or keyframe latents) before the clean k1 group, then the
        k2/k4/... groups, gathered from the bank in the plan's packing order."""
        history = section.history()
        latents = self.bank[:, :, list(history)] if history else self.bank[:, :, :0]
        groups = gather_history(latents, self.plan.schedule, self.plan.packing_order)
        anchors = self.bank[:, :, list(section.anchors_from)]
        packed = pack(section.layout, anchors, groups, self.plan.schedule, device)
        return torch.tensor(section.layout.noisy), packed

    def settle(self, section, latents: torch.Tensor) -> tuple[int, int, bool]:
        """The window in the bank; shown: the contiguous block next to the start (forward) or the
        end (inverted orders)."""
        window, total, done = list(section.window), self.plan.total_latents, self.done
        self.bank[:, :, window] = latents.float().cpu()
        done[window] = True
        if self.plan.packing_order == "forward":
            lo, hi = 0, int(np.argmin(done)) if not done.all() else total
        else:
            first = total - int(np.argmin(done[::-1])) if not done.all() else 0
            lo, hi = (first if first > 1 else 0), total
        return lo, hi, bool(done.all())
