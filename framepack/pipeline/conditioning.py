"""Conditioning: prompt and image embeddings, and VAE encode/decode (FRAMEPACK.md sections 3 and 6).

- Text: LLaMA hidden states (layer `manifest.text_hidden_layer`, -3) of the prompt wrapped in the
  HunyuanVideo template; the template's first `template_crop` tokens (bos + system turn + user
  header: 95 for the released tokenizer) are cropped, so what is left is the prompt's tokens and the
  closing `<|eot_id|>`, at most `max_prompt_tokens`. This is diffusers' `_get_llama_prompt_embeds`
  with `crop_start` given; for a tokenizer without a known crop, `template_crop_for` computes it the
  way diffusers does when `crop_start` is None (template tokens minus `{}` and `<|eot_id|>`).
- Pooled: CLIP-L `pooler_output` of the prompt alone, padded/truncated to 77 tokens.
- Image: SigLIP `last_hidden_state` of the processed start image (729 x 1152 for the release).
- VAE: latents `(B, 16, t, h, w)` times the scaling factor; `T = 4t - 3` pixel frames, 8x spatial.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..memory.offload import on_device, vae_tiles
from .bundle import Bundle

__all__ = [
    "CLIP_TOKENS",
    "PromptEmbeds",
    "encode_image",
    "encode_prompt",
    "prompt_is_cut",
    "template_crop_for",
    "vae_decode",
    "vae_encode",
]

CLIP_TOKENS = 77


@dataclass
class PromptEmbeds:
    """A prompt's conditioning: LLaMA tokens with their mask, and CLIP's pooled vector.

    `text` is padded with zeros to `max_prompt_tokens`; `mask` is 1 on the prompt's tokens (a
    prefix). `truncated` is True when the prompt was longer than `max_prompt_tokens` LLaMA tokens
    and lost its end (callers should warn).
    """

    text: torch.Tensor  # (1, L, D_text) float32
    mask: torch.Tensor  # (1, L) long
    pooled: torch.Tensor  # (1, D_pooled) float32
    truncated: bool = False

    @property
    def length(self) -> int:
        """Number of real (unpadded) text tokens."""
        return int(self.mask.sum())

    def to(self, device: torch.device | str) -> PromptEmbeds:
        return PromptEmbeds(
            self.text.to(device), self.mask.to(device), self.pooled.to(device), self.truncated
        )


def _fill(template: str, prompt: str) -> str:
    head, tail = template.split("{}")  # the manifest guarantees exactly one "{}"
    return head + prompt + tail


def template_crop_for(tokenizer, template: str) -> int:
    """Template tokens before the prompt, computed as diffusers does when `crop_start` is None.

    That is the length of the tokenized template minus 2 (the `{}` placeholder and the final
    `<|eot_id|>`, one token each); it gives 95 for the released LLaMA tokenizer and template.
    """
    ids = tokenizer(template, add_special_tokens=True).input_ids
    return len(ids) - 2


def _module_device_dtype(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(module.parameters())
    return p.device, p.dtype


@torch.no_grad()
def encode_prompt(bundle: Bundle, prompt: str) -> PromptEmbeds:
    """Text conditioning of one prompt (FRAMEPACK.md section 3)."""
    if not isinstance(prompt, str):
        raise ValueError(f"a prompt is a string, got {type(prompt).__name__}.")
    m = bundle.manifest
    tok, llama = bundle.tokenizer, bundle.text_encoder
    device, _ = _module_device_dtype(llama)
    text = _fill(m.prompt_template, prompt)
    limit = m.template_crop + m.max_prompt_tokens
    full = len(tok(text).input_ids)
    ids = tok(text, max_length=limit, truncation=True, return_tensors="pt").input_ids.to(device)  # (1, n)
    n = ids.shape[1]
    if n <= m.template_crop:
        raise ValueError(
            f"the prompt template gives {n} tokens, not more than its crop of {m.template_crop}; "
            "the bundle's template_crop does not fit its tokenizer."
        )
    # No padding is fed: LLaMA is causal, so the prompt's states equal the padded reference's.
    with on_device(llama):  # under a VRAM budget each encoder visits the device only for its call
        out = llama(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
        states = out.hidden_states[m.text_hidden_layer][:, m.template_crop :].float()  # (1, n - crop, D)
        del out
    length = states.shape[1]
    text_embeds = states.new_zeros(1, m.max_prompt_tokens, states.shape[2])  # (1, L, D)
    text_embeds[:, :length] = states
    mask = torch.zeros(1, m.max_prompt_tokens, dtype=torch.long, device=device)  # (1, L)
    mask[:, :length] = 1

    clip = bundle.text_encoder_2
    clip_device, _ = _module_device_dtype(clip)
    clip_ids = bundle.tokenizer_2(
        prompt, padding="max_length", max_length=CLIP_TOKENS, truncation=True, return_tensors="pt"
    ).input_ids.to(clip_device)  # (1, 77)
    with on_device(clip):
        pooled = clip(clip_ids, output_hidden_states=False).pooler_output.float()  # (1, D_pooled)
    return PromptEmbeds(text_embeds, mask, pooled.to(device), truncated=full > limit)


def prompt_is_cut(bundle: Bundle, prompt: str) -> bool:
    """True if `prompt` is over the bundle's `max_prompt_tokens` LLaMA tokens (`encode_prompt` cuts it)."""
    m = bundle.manifest
    return (
        len(bundle.tokenizer(_fill(m.prompt_template, prompt)).input_ids)
        > m.template_crop + m.max_prompt_tokens
    )


@torch.no_grad()
def encode_image(bundle: Bundle, image: np.ndarray) -> torch.Tensor:
    """SigLIP embeddings `(1, N, D_img)` (float32) of an `(H, W, 3)` uint8 RGB image.

    As the release: the uint8 image goes through the feature extractor (resize, rescale to [0, 1],
    normalise) and the encoder's last hidden state is used.
    """
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        what = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image)
        raise ValueError(f"the image must be an (H, W, 3) uint8 RGB array, got a {what}.")
    device, dtype = _module_device_dtype(bundle.image_encoder)
    pixels = bundle.feature_extractor(images=image, return_tensors="pt")["pixel_values"]  # (1, 3, S, S)
    with on_device(bundle.image_encoder):
        out = bundle.image_encoder(pixel_values=pixels.to(device=device, dtype=dtype))
        return out.last_hidden_state.float()  # (1, N, D_img)


def _check_video(x: torch.Tensor, channels: int, what: str) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 5 or x.shape[1] != channels:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{what} must be a (B, {channels}, T, H, W) tensor, got {shape}.")


@torch.no_grad()
def vae_encode(
    bundle: Bundle,
    frames: torch.Tensor,
    generator: torch.Generator | None = None,
    mode: str = "sample",
) -> torch.Tensor:
    """Latents `(B, 16, t, h, w)` (float32, times the scaling factor) of frames `(B, 3, T, H, W)` in [-1, 1].

    `T = 4t - 3` (any T works: the causal VAE keeps the first frame alone), `H = 8h`, `W = 8w`.
    `mode="sample"` draws from the posterior like the release and diffusers' FramePack pipeline
    (`latent_dist.sample(generator)`), with a generator seeded 0 when none is given so encoding is
    repeatable; `mode="mean"` takes the posterior mean (diffusers' `sample_mode="argmax"`).
    """
    _check_video(frames, 3, "frames")
    if mode not in ("sample", "mean"):
        raise ValueError(f"vae_encode mode must be 'sample' or 'mean', got {mode!r}.")
    vae = bundle.vae
    device, dtype = _module_device_dtype(vae)
    with on_device(vae):
        posterior = vae.encode(frames.to(device=device, dtype=dtype)).latent_dist
    if mode == "mean":
        latents = posterior.mode()
    else:
        latents = posterior.sample(generator if generator is not None else torch.Generator().manual_seed(0))
    return latents.float() * bundle.manifest.vae_scaling_factor  # (B, 16, t, h, w)


@torch.no_grad()
def vae_decode(bundle: Bundle, latents: torch.Tensor, tiling: bool = True) -> torch.Tensor:
    """Frames `(B, 3, 4t - 3, 8h, 8w)` (float32, nominally [-1, 1], not clamped) of latents `(B, 16, t, h, w)`.

    `tiling=True` decodes frames larger than the VAE's tile (256 px) in overlapping spatial tiles,
    which keeps memory small at a tiny blending cost; `False` decodes in one pass. Under a VRAM
    budget (`framepack.memory.offload`) the tile shrinks, and batches are decoded one video at a
    time, when the budget's room for activations is below the 256-px decode's estimated need
    (`vae_tiles`). Clamping is left to the writer, as in the release (blending of overlapping
    sections happens before it).
    """
    vae = bundle.vae
    _check_video(latents, vae.config.latent_channels, "latents")
    device, dtype = _module_device_dtype(vae)
    with on_device(vae) as room:
        tile = vae_tiles(vae, latents.shape, room) if tiling else None
        if tiling:
            side = tile or 256  # diffusers' default tile, overlapping by a quarter
            vae.enable_tiling(side, side, None, side * 3 // 4, side * 3 // 4)
        else:
            vae.disable_tiling()
        if tile is not None:
            vae.enable_slicing()
        else:
            vae.disable_slicing()
        z = latents.to(device=device, dtype=dtype) / bundle.manifest.vae_scaling_factor
        return vae.decode(z).sample.float()  # (B, 3, T, H, W)
