"""A run's device memory besides weights (`framepack.memory.estimate`), and the early budget check.

`run_need` works it out from the transformer's config, the VAE and a prepared run (its widest
section's tokens, step cache, real CFG); `bundle_need` for a loaded bundle; `check_budget` before
any weights load, from the bundle's config files alone (modules built on the meta device), so a
budget too small is refused with one sentence before a long load.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn as nn

from ..memory.budgets import GIB, budget_bytes, parse_budget, ram_budget_bytes
from ..memory.disk import disk_backed
from ..memory.estimate import (
    ALLOCATOR_MARGIN,
    DeviceNeed,
    activation_bytes,
    cache_bytes,
    device_overhead,
    host_overhead,
    section_tokens,
)
from ..memory.offload import TILES, module_bytes, vae_decode_bytes
from ..memory.streaming import blocks_of, plan_memory

__all__ = [
    "bundle_need",
    "check_budget",
    "context_tokens",
    "decode_shape",
    "device_budget",
    "host_tier_budget",
    "run_need",
    "run_size",
]

SIGLIP_TOKENS = 729  # the release's image encoder (384 px, 14 px patches), when its config says nothing


def device_budget(settings, device) -> str | float | None:
    """The budget (GiB or "auto") for the weights on the device a run computes on: its VRAM
    budget, or on a CPU, whose memory is the host's, its RAM budget (the smaller of the two when
    both are numbers). A RAM budget on a GPU bounds what waits on the host instead: the bundle
    is then loaded disk-backed (`load_bundle(..., ram_budget=...)`)."""
    vram = parse_budget(settings.vram_budget)
    if torch.device(device).type == "cpu" and settings.ram_budget is not None and settings.fp8_weights:
        raise ValueError(
            "on a CPU the RAM budget bounds the memory fp8 host copies would take; drop --fp8-weights "
            "(on a GPU the two combine: the host keeps fp8 copies of the streamed blocks)."
        )
    if torch.device(device).type != "cpu" or settings.ram_budget is None:
        return vram
    ram = ram_budget_bytes(settings.ram_budget) / GIB
    return ram if vram in (None, "auto") else min(ram, vram)


def host_tier_budget(settings, bundle) -> int:
    """Host bytes the transformer's streamed blocks may keep in a GPU run whose bundle waits in its
    files (the host tier): the RAM budget less two staging slots of the largest block and the VAE,
    which visits beside them. 0 on a CPU, whose memory is the device's, or without a RAM budget."""
    if bundle.device.type == "cpu" or settings.ram_budget is None or not disk_backed(bundle.transformer):
        return 0
    return max(ram_budget_bytes(settings.ram_budget) - _host_share(bundle.transformer, bundle.vae), 0)


def _host_share(transformer: nn.Module, vae: nn.Module | None) -> int:
    """The least host memory of a GPU run under a RAM budget: two staging slots of the largest
    transformer block, and the VAE that visits beside them (none on a rank that only serves)."""
    slots = 2 * max(module_bytes(b) for b in blocks_of(transformer))
    return slots + (0 if vae is None else module_bytes(vae))


def _check_host(ram_budget, transformer: nn.Module, vae: nn.Module) -> None:
    """Refuse (one sentence) a RAM budget of a GPU run below its smallest host share (`_host_share`)."""
    ram = ram_budget_bytes(ram_budget)
    need = _host_share(transformer, vae)
    if ram < need:
        gib = math.ceil(need / GIB * 10) / 10
        raise ValueError(
            f"a RAM budget of {ram / GIB:.3g} GiB cannot hold this run's staging on the host (it needs at "
            f"least {need / GIB:.2f} GiB: two slots of the largest block and the VAE); give --ram-budget "
            f"{gib:g} or more."
        )


def run_size(prepared) -> str:
    height, width = prepared.image.shape[:2]
    return f"{width}x{height}"


def decode_shape(vae: nn.Module, prepared) -> tuple[int, ...]:
    """Latent shape `(1, C, window + 2, h, w)` of one section's decode, for `vae_decode_bytes`."""
    height, width = (v // 8 for v in prepared.image.shape[:2])
    return (1, vae.config.latent_channels, prepared.plan.window + 2, height, width)


def context_tokens(max_prompt_tokens: int, has_image_proj: bool, image_encoder_config: dict | None) -> int:
    """Text + image-encoder tokens a model call may see (SigLIP's only with an image projection)."""
    return max_prompt_tokens + (_image_tokens(image_encoder_config) if has_image_proj else 0)


def run_need(cfg, vae: nn.Module, dtype: torch.dtype, prepared, device, text_tokens: int) -> DeviceNeed:
    """What `prepared` holds on `device` besides weights with transformer config `cfg` in `dtype`,
    `vae` (a loaded or a meta module) and up to `text_tokens` text + image-encoder tokens."""
    device = torch.device(device)
    s = prepared.settings
    height, width = (v // 8 for v in prepared.image.shape[:2])  # latents
    image, noisy = section_tokens(prepared.plan, height, width)
    itemsize = dtype.itemsize
    branches = 1 if prepared.cfg == 1 else 2
    cuda = device.type == "cuda"
    ram_run = not cuda and s.ram_budget is not None
    return DeviceNeed(
        activations=activation_bytes(cfg, image, text_tokens, itemsize),
        cache=cache_bytes(cfg, s.cache, image, noisy, itemsize, branches),
        vae_decode=vae_decode_bytes(
            vae, decode_shape(vae, prepared), TILES[-1]
        ),  # the tile shrinks to the room left
        # On a CPU under a RAM budget the runtime's own memory (Python, torch, tokenizers) counts too.
        overhead=host_overhead() if ram_run else device_overhead(device),
        margin=ALLOCATOR_MARGIN if cuda else 0.0,
        memory="RAM" if ram_run else "VRAM",
    )


def _image_tokens(config: dict | None) -> int:
    if not config or "image_size" not in config or "patch_size" not in config:
        return SIGLIP_TOKENS
    return (int(config["image_size"]) // int(config["patch_size"])) ** 2


def bundle_need(bundle, prepared) -> DeviceNeed:
    """`run_need` for a loaded bundle."""
    model = bundle.transformer
    config = getattr(bundle.image_encoder, "config", None)
    config = None if config is None else getattr(config, "to_dict", lambda: None)()
    tokens = context_tokens(bundle.manifest.max_prompt_tokens, model.config.has_image_proj, config)
    return run_need(model.config, bundle.vae, model.dtype, prepared, bundle.device, tokens)


def check_budget(model: str | os.PathLike, prepared, device, dtypes: dict | None = None) -> None:
    """Refuse (ValueError, one sentence) a VRAM budget that cannot hold `prepared` on `device`
    with the bundle `model`, before any weights load: the smallest plan (the transformer's
    non-block weights and one streamed block, the VAE beside them) and `run_need`. `dtypes`:
    per-component weight dtypes, as given to `load_bundle` (default: the device's)."""
    from diffusers import AutoencoderKLHunyuanVideo
    from diffusers.utils import logging as diffusers_logging

    from ..model import PackedTransformer, TransformerConfig
    from .bundle import component_dtypes
    from .named import read_component_config, read_manifest

    s = prepared.settings
    total = budget_bytes(parse_budget(device_budget(s, device)), device)
    if total is None and (s.ram_budget is None or torch.device(device).type == "cpu"):
        return
    manifest = read_manifest(model)
    dtypes = {**component_dtypes(device), **(dtypes or {})}
    cfg = TransformerConfig.from_dict(read_component_config(model, "transformer"))
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # its warning about float32 modules concerns loading
    try:
        with torch.device("meta"):
            transformer = PackedTransformer(cfg).to(dtypes["transformer"])
            vae = AutoencoderKLHunyuanVideo.from_config(read_component_config(model, "vae")).to(dtypes["vae"])
    finally:
        diffusers_logging.set_verbosity(level)
    if s.ram_budget is not None and torch.device(device).type != "cpu":
        _check_host(s.ram_budget, transformer, vae)
    if total is None:
        return
    least = plan_memory(transformer, None, fp8=s.fp8_copies).least_bytes + module_bytes(vae)
    try:
        siglip = read_component_config(model, "image_encoder")
    except ValueError:
        siglip = None
    tokens = context_tokens(manifest.max_prompt_tokens, cfg.has_image_proj, siglip)
    need = run_need(cfg, vae, dtypes["transformer"], prepared, device, tokens)
    need.check(total, least, run_size(prepared))
