"""The pieces of one section, shared by every kind of run: the conditioning encoded once, the
packed history, the denoiser the samplers call, sampling with live steps, and the decoder.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import torch

from ..model.transformer import HistoryGroup
from ..sampling import cfg_velocity, velocity_to_x0
from .conditioning import PromptEmbeds, encode_image, encode_prompt, vae_decode, vae_encode
from .decode import IncrementalDecoder, from_uint8_frames, latent_preview
from .events import StepEvent
from .settings import Prepared

__all__ = ["encode_inputs", "make_denoiser", "pack", "prompt_embeds", "sample_live", "section_decoder"]


def encode_inputs(bundle, prepared: Prepared) -> dict[str, torch.Tensor]:
    """Every conditioning tensor of a run, by name (what a job directory stores)."""
    s = prepared.settings
    tensors = {}
    for i, text in enumerate(prepared.prompts + ([s.negative_prompt] if prepared.cfg != 1 else [])):
        p = encode_prompt(bundle, text)
        key = f"prompt_{i}" if i < len(prepared.prompts) else "negative"
        tensors.update({f"{key}.text": p.text, f"{key}.mask": p.mask, f"{key}.pooled": p.pooled})
    tensors["siglip"] = encode_image(bundle, prepared.image)
    tensors["start_latent"] = vae_encode(bundle, from_uint8_frames(prepared.image[None]))  # (1, C, 1, h, w)
    refs = [prepared.end_image] if prepared.end_image is not None else []
    for i, im in enumerate(refs + prepared.keyframe_images):
        tensors[f"ref_latent_{i}"] = vae_encode(bundle, from_uint8_frames(im[None]))
    return {k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in tensors.items()}


def prompt_embeds(inputs: dict[str, torch.Tensor], prepared: Prepared, device) -> tuple[list, object]:
    """The stored prompt embeddings of a run on `device`: one per timed prompt, and the negative
    prompt's (None without real CFG)."""

    def embeds(key: str) -> PromptEmbeds:
        return PromptEmbeds(inputs[f"{key}.text"], inputs[f"{key}.mask"], inputs[f"{key}.pooled"]).to(device)

    prompts = [embeds(f"prompt_{i}") for i in range(len(prepared.prompts))]
    return prompts, embeds("negative") if prepared.cfg != 1 else None


def pack(layout, anchors: torch.Tensor, groups: list[torch.Tensor], schedule, device) -> list[HistoryGroup]:
    """The packed history of a section on `device`: the `anchors` (start latent, end or keyframe
    latents) before the clean k1 group `groups[0]`, then the k2/k4/... groups, at `layout`'s indices."""
    kernels = [g.kernel.name for g in schedule.groups]
    packed = [
        HistoryGroup(torch.cat([anchors, groups[0]], dim=2), torch.tensor(layout.clean_k1()), kernels[0])
    ]
    packed += [
        HistoryGroup(groups[i], torch.tensor(layout.groups[i]), kernels[i]) for i in range(1, len(groups))
    ]
    return [HistoryGroup(g.latents.to(device), g.indices, g.kernel) for g in packed]


def section_decoder(bundle, device, window: int) -> IncrementalDecoder:
    """The incremental decoder of a run: the bundle's VAE on `device`, frames back on the host,
    sections blended in the VAE's dtype (as the release blends)."""
    return IncrementalDecoder(
        lambda lat: vae_decode(bundle, lat.to(device)).cpu(), window, bundle.dtypes()["vae"]
    )


def make_denoiser(model, device, noisy_indices, packed, cond, neg, guidance, siglip, prepared: Prepared):
    """The x0 prediction `denoise(x, sigma)` the samplers call for one section's packed inputs.

    One model call for the velocity, a second for the negative prompt when real CFG is on. As in
    the release, the latent, the timestep and the distilled guidance are cast to the model's dtype
    before the call (in bf16, sigma 0.9673 -> t 968 and guidance 10000 -> 9984), and x0 is computed
    in fp32 from the latent as cast; in fp32 nothing changes.
    """
    dtype = model.dtype
    guidance = None if guidance is None else guidance.to(device, dtype)

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        t = (sigma * 1000.0).to(device, dtype)
        cast = x.to(device, dtype)  # (B, C, T, h, w)

        def velocity(p):
            return model.forward_packed(
                cast, noisy_indices, packed, t, p.text, p.mask, p.pooled, guidance, siglip
            ).float()

        v = velocity(cond)
        if neg is not None:
            v = cfg_velocity(v, velocity(neg), prepared.cfg, prepared.settings.cfg_rescale)
        return velocity_to_x0(cast.float().to(x.device), v.to(x.device), sigma.to(x.device))

    return denoise


def sample_live(sampler, denoise, noise, sigmas, number: int, sections: int, cancel) -> Iterator:
    """Run the sampler in a worker thread, yielding a `StepEvent` as each step ends, then the latents.

    The sampler calls back synchronously; a queue hands its steps to this generator so a caller
    sees (and can show) every step while the next one runs. When this generator ends early (Ctrl-C
    in the caller's thread, or the caller closing it), the worker stops at its next step and is
    joined before the exception goes on, so no sampling thread outlives the run (an interpreter
    shutting down under one aborts the process).
    """
    done = object()
    q: queue.Queue = queue.Queue()
    left = threading.Event()  # the caller has gone: stop at the next step

    def on_step(i, n, x, x0):
        q.put(StepEvent(number, sections, i, n, latent_preview(x0)))

    def stop() -> bool:
        return left.is_set() or (cancel is not None and cancel())

    def work():
        try:
            with torch.no_grad():
                q.put((done, sampler(denoise, noise, sigmas, callback=on_step, cancel=stop)))
        except BaseException as e:  # handed to the caller's thread
            q.put((done, e))

    thread = threading.Thread(target=work, name="framepack-sampler", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if isinstance(item, tuple) and item[0] is done:
                thread.join()
                if isinstance(item[1], BaseException):
                    raise item[1]
                yield item[1]
                return
            yield item
    finally:
        if thread.is_alive():
            left.set()
            thread.join()
