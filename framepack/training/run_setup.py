"""What a training run is set up from: its section order and packing schedule, its device, and the
transformer it trains (from a spec, a bundle, a transformer folder or a full-mode checkpoint, with
new history kernels, frozen unused projections and LoRA adapters), checked against the cache."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from ..devices import resolve_device
from ..model import SPECS, PackedTransformer, get_spec, load_transformer
from ..packing import PRESETS, Kernel, get_schedule
from . import lora as lora_lib
from .config import TrainConfig
from .data import LatentCache

__all__ = ["bundle_manifest", "resolve_schedule", "train_device", "build_model", "check_data"]


def bundle_manifest(model: str):
    """The bundle manifest of the folder `model`, or None when `model` is no bundle."""
    from ..pipeline.manifest import MANIFEST_NAME, Manifest

    path = Path(model)
    return Manifest.load(path) if (path / MANIFEST_NAME).is_file() else None


def resolve_schedule(cfg: TrainConfig, manifest, cache: LatentCache):
    """(order, schedule) of a run: the config's, else the bundle's, else the inverted preset; a
    preset's window comes from the config, else the cache, else the preset."""
    order = cfg.order or (manifest.order if manifest else "inverted")
    name = cfg.schedule or (manifest.packing if manifest else order)
    schedule = get_schedule(name)
    if name.strip() in PRESETS:  # a preset names the groups; the window is ours
        window = cfg.window or cache.settings.get("window") or schedule.generate
        schedule = replace(schedule, generate=int(window))
    elif cfg.window is not None and cfg.window != schedule.generate:
        raise ValueError(
            f"the schedule {name!r} generates {schedule.generate} latents but window = {cfg.window}."
        )
    if schedule.anchors > 1:
        raise ValueError(
            f"training supports schedules with at most one anchor frame, got {schedule.anchors}."
        )
    return order, schedule


def train_device(name: str, local_rank: int) -> torch.device:
    """The device of the config's `device` setting for the process of `local_rank`."""
    device = torch.device(resolve_device(name, rank=local_rank, what="device"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device cuda was asked for, but torch sees no CUDA GPU here.")
        if device.index is None:
            device = torch.device(f"cuda:{local_rank}")
    return device


def _base_model(cfg: TrainConfig) -> PackedTransformer:
    if cfg.model in SPECS:
        spec = get_spec(cfg.model)
        try:
            spec = spec.replace(**cfg.config_overrides)
        except TypeError as e:
            bad = next((k for k in cfg.config_overrides if not hasattr(spec, k)), None)
            why = f"key {bad!r} is not a transformer config field" if bad else f"are invalid ({e})"
            raise ValueError(f"config_overrides {why}.") from None
        with torch.random.fork_rng(devices=[]):  # reproducible initial weights
            torch.manual_seed(cfg.seed)
            return PackedTransformer(spec)
    if cfg.config_overrides:
        raise ValueError("config_overrides only applies when training from a spec name such as 'tiny'.")
    path = Path(cfg.model)
    if bundle_manifest(cfg.model) is not None:
        path = path / "transformer"
    return load_transformer(path, dtype=torch.float32)


def build_model(cfg: TrainConfig, schedule, resume: Path | None) -> PackedTransformer:
    """The fp32 transformer to train, in train mode, with the schedule's kernels (and
    `new_kernels`) added and only what trains requiring gradients; resumed from `resume`'s weights."""
    if cfg.mode == "full" and resume is not None:
        model = load_transformer(resume / "transformer", dtype=torch.float32)
    else:
        model = _base_model(cfg)
    wanted = [g.kernel.name for g in schedule.groups] + [Kernel.parse(k).name for k in cfg.new_kernels]
    added = [k for k in dict.fromkeys(wanted) if k not in model.config.clean_kernels]
    for name in added:  # initialised from the k1 projection (FRAMEPACK.md section 2)
        model.add_history_kernel(name)
    model.train().requires_grad_(True)
    model.enable_gradient_checkpointing(cfg.gradient_checkpointing)
    # History projections the schedule does not use get no gradient: frozen, so DDP needs no
    # search for unused parameters.
    used = {"proj"} | {g.kernel.projection_name() for g in schedule.groups}
    if model.clean_x_embedder is not None:
        for name, conv in model.clean_x_embedder.named_children():
            conv.requires_grad_(name in used)
    if cfg.mode == "lora":
        lora_lib.add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.lora_dropout, cfg.seed)
        for name in added:  # a new projection the schedule uses trains in full, beside the adapters
            projection = Kernel.parse(name).projection_name()
            getattr(model.clean_x_embedder, projection).requires_grad_(projection in used)
        if resume is not None:
            lora_lib.load_adapter_weights(model, resume / "lora")
    return model


def check_data(model: PackedTransformer, clip: dict[str, torch.Tensor]) -> None:
    """ValueError (one sentence) when a cached `clip`'s widths do not fit `model`."""
    c = model.config
    checks = [
        ("latent channels", clip["latents"].shape[0], c.in_channels),
        ("text embedding width", clip["text"].shape[-1], c.text_embed_dim),
        ("pooled embedding width", clip["pooled"].shape[-1], c.pooled_projection_dim),
    ]
    if c.has_image_proj:
        checks.append(("image embedding width", clip["image_embeds"].shape[-1], c.image_proj_dim))
    for what, found, wanted in checks:
        if found != wanted:
            raise ValueError(
                f"the cache's {what} is {found} but the model expects {wanted}; wrong model or cache?"
            )
