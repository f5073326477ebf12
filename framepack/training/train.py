"""Training the packed transformer on a latent cache (FramePack paper, arXiv 2504.12626, section 3).

One sample is one section of a cached clip, built exactly as inference builds it (FRAMEPACK.md
sections 2, 4, 5):

1. a position `p`: the window is latents `1+p ... p+ws` (latent 0 is the start frame);
2. the history of the order, packed by the schedule with `gather_history` (zero-filled when short).
   Inverted (anti-drifting) order: the latents after the window, nearest first, and the start
   latent as the anchor across `q * ws` blank latents, `q` the gap in windows capped at
   `max_blank`, or (with `blank_probability`) a uniform draw up to it, since long videos pad less
   than the true gap; with `end_probability` the future is cut after a random number of windows,
   as in a video that ends there. Forward order: the latents before the window, start latent included. With
   +D (`discretize`) the history latents are first replaced by their nearest codebook vectors;
3. flow matching: `x = (1 - sigma) x0 + sigma noise`, target velocity `noise - x0`, MSE on the
   window (the only tokens the head reads out); `sigma = flow_shift(t, mu)` with inference's shift.

Every random draw comes from a generator seeded by (seed, step, sample), so a run resumed from
a checkpoint repeats an unbroken one and N processes see the global batch of one process.
Checkpoints hold no pickle: weights in the `load_transformer` layout (or PEFT adapters), the
optimizer state as safetensors plus JSON.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..devices import resolve_device
from ..model import SPECS, HistoryGroup, PackedTransformer, get_spec, load_transformer, save_transformer
from ..packing import PRESETS, Kernel, forward_layout, gather_history, get_schedule, inverted_layout
from ..sampling.sigmas import dynamic_mu, flow_shift, noisy_tokens
from . import lora as lora_lib
from .codebook import fit_codebook, quantise
from .config import RESUMABLE_CHANGES, TrainConfig, load_config
from .data import LatentCache

__all__ = ["TrainResult", "Batch", "Trainer", "train", "fit_codebook", "quantise", "latest_checkpoint"]

STATE_NAME = "trainer_state.json"
OPTIMIZER_NAME = "optimizer.safetensors"
CODEBOOK_NAME = "codebook.safetensors"
LOG_NAME = "loss.csv"
STATE_FORMAT = "framepack-train-state/1"
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")


@dataclass
class TrainResult:
    final_loss: float | None  # loss of the last step this call ran (None if it ran none)
    losses: list[float]  # loss of every step this call ran, averaged over the global batch
    checkpoint: Path | None  # the newest checkpoint folder
    step: int  # steps done in all, resumed ones included


@dataclass
class Batch:
    """One process's share of a global batch: every tensor has that share's batch size B."""

    noisy: torch.Tensor  # (B, C, ws, h, w) x_sigma
    target: torch.Tensor  # (B, C, ws, h, w) velocity noise - x0
    sigma: torch.Tensor  # (B,)
    noisy_indices: torch.Tensor  # (B, ws)
    history: list[HistoryGroup]  # k1 (anchors + group 0) first, then the schedule's other groups
    text: torch.Tensor  # (B, L, D_text)
    text_mask: torch.Tensor  # (B, L)
    pooled: torch.Tensor  # (B, D_pooled)
    image_embeds: torch.Tensor  # (B, N, D_image)
    clips: list[int]
    positions: list[int]
    blanks: list[int]
    weight: torch.Tensor | None = None  # (B, 1, ws, h, w) loss weights (`motion_weight`), mean 1


def motion_weights(x0: torch.Tensor, start: torch.Tensor, strength: float) -> torch.Tensor:
    """(1, ws, h, w) loss weights of a window `x0` (C, ws, h, w): `1 + strength * d / max(d)` for
    the channel-mean distance `d` of each latent pixel from the start latent `start` (C, 1, h, w),
    scaled to a mean of 1 (all ones when nothing differs)."""
    d = (x0 - start).abs().mean(dim=0, keepdim=True)  # (1, ws, h, w)
    w = 1 + strength * d / d.max().clamp_min(1e-12)
    return w / w.mean()


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """The mean squared error, each element times its (broadcast) weight when one is given."""
    if weight is None:
        return F.mse_loss(pred, target)
    return ((pred - target).square() * weight.to(pred.device)).mean()


# ------------------------------------------------------------------------------------ randomness
def _generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded by mixing non-negative `parts` (seed, step, purpose, index)."""
    seed = int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0]) & (2**63 - 1)
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------- the clips
class _Clips:
    """The cache's clips long enough for one section, grouped by shape, with a small LRU."""

    def __init__(self, cache: LatentCache, min_latents: int, keep: int = 64) -> None:
        self.cache, self.keep, self._lru = cache, keep, {}
        shapes = cache.groups()
        self.groups = sorted((s, ids) for s, ids in shapes.items() if s[0] >= min_latents)
        if not self.groups:
            longest = max((s[0] for s in shapes), default=0)
            raise ValueError(
                f"no clip in {cache.directory} has the {min_latents} latents one section needs "
                f"(the longest has {longest}); prepare longer clips or lower the window."
            )
        for (_, h, w), _ in self.groups:
            if h % 16 or w % 16:
                raise ValueError(f"clips of {h}x{w} pixels do not patchify; sizes must be multiples of 16.")

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if i in self._lru:
            self._lru[i] = self._lru.pop(i)  # most recently used last
        else:
            self._lru[i] = self.cache[i]
            if len(self._lru) > self.keep:
                self._lru.pop(next(iter(self._lru)))
        return self._lru[i]


def _resolve_schedule(cfg: TrainConfig, manifest, cache: LatentCache):
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


def _bundle_manifest(model: str):
    from ..pipeline.manifest import MANIFEST_NAME, Manifest

    path = Path(model)
    return Manifest.load(path) if (path / MANIFEST_NAME).is_file() else None


def latest_checkpoint(output: str | os.PathLike) -> Path | None:
    """The complete `checkpoint-<step>` folder with the highest step in `output`, or None."""
    found = []
    root = Path(output)
    if root.is_dir():
        for p in root.iterdir():
            m = _CHECKPOINT.fullmatch(p.name)
            if m and (p / STATE_NAME).is_file():
                found.append((int(m.group(1)), p))
    return max(found)[1] if found else None


class _Weights:
    """What `save_transformer` reads from a model (`config`, `state_dict()`), for a gathered state."""

    def __init__(self, config, state: dict[str, torch.Tensor]) -> None:
        self.config, self._state = config, state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state


class _Step(nn.Module):
    """`forward` = the transformer's `forward_packed`, so DDP and FSDP see a plain module call."""

    def __init__(self, transformer: PackedTransformer) -> None:
        super().__init__()
        self.transformer = transformer

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.transformer.forward_packed(*args, **kwargs)


def _full(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy of `t`, gathered first if it is an FSDP shard (a collective then)."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach().cpu().clone()


def _like(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """`full` laid out like `param` (sharded again for FSDP)."""
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full.to(param.device, param.dtype), param.device_mesh, param.placements)
    return full.to(param.device, param.dtype).clone()


# ------------------------------------------------------------------------------------ trainer
class Trainer:
    """Sets a run up from a `TrainConfig` (resuming from the newest checkpoint in `output`); `run()` trains."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = cfg = config
        self.rank = int(os.environ.get("RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if not Path(cfg.data).is_dir():
            raise ValueError(f"the data folder {cfg.data} does not exist; run `framepack prepare` into it.")
        if cfg.batch_size % self.world:
            raise ValueError(
                f"batch_size {cfg.batch_size} does not divide evenly over {self.world} processes."
            )
        self.output = Path(cfg.output)
        self.cache = LatentCache(cfg.data)
        manifest = _bundle_manifest(cfg.model)
        self.order, self.schedule = _resolve_schedule(cfg, manifest, self.cache)
        self.window = self.schedule.generate
        self.clips = _Clips(self.cache, self.window + 1)
        # Caption dropout trains on the empty caption's real embeddings, the negative prompt ""
        # that real CFG feeds at inference.
        self.empty = self.cache.empty_prompt() if cfg.caption_dropout else None
        guidance = cfg.distilled_guidance
        self.guidance = (
            guidance if guidance is not None else (manifest.distilled_guidance if manifest else 10.0)
        )
        self.device = self._device()
        self.resume_from = latest_checkpoint(self.output)
        if self.resume_from is not None:
            self._check_resume(self.resume_from)
        self.step = int(self._state(self.resume_from)["step"]) if self.resume_from else 0
        self.model = self._build_model()
        self._probe = None  # the LoRA call check of the first step (`run`)
        self._check_data()
        self._owns_group = False
        if self.world > 1 and not dist.is_initialized():
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            self._owns_group = True
        try:
            self._distributed_setup()
        except BaseException:
            self.close()
            raise

    def _distributed_setup(self) -> None:
        """Everything from the codebook on: may hold collectives, so it runs inside the process group."""
        cfg = self.config
        self.codebook = self._codebook()
        if not (cfg.fsdp and self.world > 1):  # fully_shard moves each shard to the device itself
            self.model.to(self.device)
        self.net: nn.Module = self._wrap(_Step(self.model))
        self.trainable = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        if not self.trainable:
            raise ValueError("the model has no trainable parameters in this mode.")
        decay = [p for p in self.trainable.values() if p.ndim >= 2]  # no decay on biases and norms
        rest = [p for p in self.trainable.values() if p.ndim < 2]
        groups = [{"params": decay}, {"params": rest, "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW(
            [g for g in groups if g["params"]],
            lr=cfg.lr,
            betas=cfg.betas,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
        )
        names = {id(p): n for n, p in self.trainable.items()}
        self._opt_names = [names[id(p)] for g in self.optimizer.param_groups for p in g["params"]]
        self.ema = {n: p.detach().clone() for n, p in self.trainable.items()} if cfg.ema_decay else None
        if self.resume_from is not None:
            self._load_training_state(self.resume_from)

    # ------------------------------------------------------------------------------- set-up
    def _device(self) -> torch.device:
        device = torch.device(resolve_device(self.config.device, rank=self.local_rank, what="device"))
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError("device cuda was asked for, but torch sees no CUDA GPU here.")
            if device.index is None:
                device = torch.device(f"cuda:{self.local_rank}")
        return device

    @property
    def lora_settings(self) -> dict:
        c = self.config
        return {
            "r": c.lora_rank,
            "lora_alpha": c.lora_alpha,
            "lora_dropout": c.lora_dropout,
            "targets": c.lora_targets,
        }

    def _base_model(self) -> PackedTransformer:
        cfg = self.config
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
        if _bundle_manifest(cfg.model) is not None:
            path = path / "transformer"
        return load_transformer(path, dtype=torch.float32)

    def _build_model(self) -> PackedTransformer:
        cfg, resume = self.config, self.resume_from
        if cfg.mode == "full" and resume is not None:
            model = load_transformer(resume / "transformer", dtype=torch.float32)
        else:
            model = self._base_model()
        wanted = [g.kernel.name for g in self.schedule.groups] + [
            Kernel.parse(k).name for k in cfg.new_kernels
        ]
        added = [k for k in dict.fromkeys(wanted) if k not in model.config.clean_kernels]
        for name in added:  # initialised from the k1 projection (FRAMEPACK.md section 2)
            model.add_history_kernel(name)
        model.train().requires_grad_(True)
        model.enable_gradient_checkpointing(cfg.gradient_checkpointing)
        # History projections the schedule does not use get no gradient: frozen, so DDP needs no
        # search for unused parameters.
        used = {"proj"} | {g.kernel.projection_name() for g in self.schedule.groups}
        if model.clean_x_embedder is not None:
            for name, conv in model.clean_x_embedder.named_children():
                conv.requires_grad_(name in used)
        if cfg.mode == "lora":
            lora_lib.add_lora(
                model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.lora_dropout, cfg.seed
            )
            for name in added:  # a new projection the schedule uses trains in full, beside the adapters
                projection = Kernel.parse(name).projection_name()
                getattr(model.clean_x_embedder, projection).requires_grad_(projection in used)
            if resume is not None:
                lora_lib.load_adapter_weights(model, resume / "lora")
        return model

    def _check_data(self) -> None:
        c = self.model.config
        clip = self.clips[self.clips.groups[0][1][0]]
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

    def _state(self, checkpoint: Path) -> dict:
        try:
            return json.loads((checkpoint / STATE_NAME).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{checkpoint / STATE_NAME} cannot be read ({type(e).__name__}).") from None

    def _check_resume(self, checkpoint: Path) -> None:
        saved = self._state(checkpoint).get("config", {})
        now = self.config.to_dict()
        for key, value in now.items():
            if key not in RESUMABLE_CHANGES and key in saved and saved[key] != value:
                raise ValueError(
                    f"{self.output} holds a run with {key} = {saved[key]!r} but this config has {value!r}; "
                    "resume with the same setting or use another output folder."
                )

    def _codebook(self) -> torch.Tensor | None:
        k = self.config.discretize
        if k is None:
            return None
        from safetensors.torch import load_file, save_file

        path = self.output / CODEBOOK_NAME
        channels = self.model.config.in_channels
        if path.is_file():
            codebook = load_file(str(path))["codebook"]
            if tuple(codebook.shape) != (k, channels):
                raise ValueError(
                    f"{path} holds {tuple(codebook.shape)} codes, not discretize = {k} of {channels}."
                )
            return codebook
        g = _generator(self.config.seed, 0, 3)
        ids = [i for _, group in self.clips.groups for i in group]
        per = -(-self.config.discretize_samples // len(ids))
        vectors = []
        for i in ids:  # `per` random latent pixels of every usable clip
            flat = self.cache[i]["latents"].float().movedim(0, -1).reshape(-1, channels)  # (N, C)
            vectors.append(flat[torch.randint(flat.shape[0], (per,), generator=g)])
        codebook = fit_codebook(torch.cat(vectors), k, self.config.discretize_iters, g)
        if dist.is_initialized():  # every rank fits the same one; rank 0's is the reference
            shared = codebook.to(self.device)
            dist.broadcast(shared, 0)
            codebook = shared.cpu()
        if self.rank == 0:
            self.output.mkdir(parents=True, exist_ok=True)
            save_file(
                {"codebook": codebook.contiguous()}, str(path), metadata={"format": "framepack-codebook/1"}
            )
        return codebook

    def _wrap(self, net: nn.Module) -> nn.Module:
        if self.world == 1 or not dist.is_initialized():
            return net
        if self.config.fsdp:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(self.device.type, (self.world,))
            for block in [*self.model.transformer_blocks, *self.model.single_transformer_blocks]:
                fully_shard(block, mesh=mesh)
            return fully_shard(net, mesh=mesh)
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(net, device_ids=ids)

    # ------------------------------------------------------------------------------- batches
    def lr_at(self, step: int) -> float:
        """Learning rate of step `step` (0-based): linear warm-up, then constant or cosine to 0."""
        cfg = self.config
        factor = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
        if cfg.lr_schedule == "cosine":
            span = max(1, cfg.steps - cfg.warmup_steps)
            progress = min(1.0, max(0.0, (step - cfg.warmup_steps) / span))
            factor *= 0.5 * (1.0 + math.cos(math.pi * progress))
        return cfg.lr * factor

    def batch(self, step: int, rank: int | None = None) -> Batch:
        """This process's share of the global batch of `step` (the same for any number of processes)."""
        cfg = self.config
        g = _generator(cfg.seed, step, 0)
        sizes = torch.tensor([float(len(ids)) for _, ids in self.clips.groups])
        _, ids = self.clips.groups[int(torch.multinomial(sizes, 1, generator=g))]
        picks = torch.randint(len(ids), (cfg.batch_size,), generator=g).tolist()
        share = cfg.batch_size // self.world
        first = (self.rank if rank is None else rank) * share
        samples = [
            self._sample(ids[picks[j]], _generator(cfg.seed, step, 1, j)) for j in range(first, first + share)
        ]
        kernels = [grp.kernel.name for grp in self.schedule.groups]
        history = [
            HistoryGroup(
                torch.stack([s["history"][i] for s in samples]),  # (B, C, f, h, w)
                torch.tensor([s["indices"][i] for s in samples]),  # (B, f)
                kernels[i],
            )
            for i in range(len(kernels))
        ]
        stack = lambda key: torch.stack([s[key] for s in samples])  # noqa: E731
        return Batch(
            noisy=stack("noisy"),
            target=stack("target"),
            sigma=torch.tensor([s["sigma"] for s in samples]),
            noisy_indices=torch.tensor([s["noisy_indices"] for s in samples]),
            history=history,
            text=stack("text"),
            text_mask=stack("text_mask"),
            pooled=stack("pooled"),
            image_embeds=stack("image_embeds"),
            clips=[s["clip"] for s in samples],
            positions=[s["position"] for s in samples],
            blanks=[s["blank"] for s in samples],
            weight=stack("weight") if cfg.motion_weight else None,
        )

    def _sample(self, clip_id: int, g: torch.Generator) -> dict:
        cfg, ws, schedule = self.config, self.window, self.schedule
        clip = self.clips[clip_id]
        latents = clip["latents"].float()  # (C, T, h, w)
        _, t, h, w = latents.shape
        if cfg.positions == "slots":
            p = ws * int(torch.randint((t - 1) // ws, (1,), generator=g))
        else:
            p = int(torch.randint(t - ws, (1,), generator=g))
        x0 = latents[:, 1 + p : 1 + p + ws]  # (C, ws, h, w)
        anchors = latents[:, : schedule.anchors]  # (C, A, h, w)
        blank = 0
        if self.order == "inverted":
            q = min(p // ws, cfg.max_blank)  # the true gap in windows, capped as inference caps it
            if float(torch.rand((), generator=g)) < cfg.blank_probability:
                q = int(torch.randint(q + 1, (1,), generator=g))  # long videos pad less than the gap
            blank = q * ws
            layout = inverted_layout(schedule, blank)
            history = latents[:, 1 + p + ws :]  # nearest first
            if cfg.end_probability and float(torch.rand((), generator=g)) < cfg.end_probability:
                # As if the video ended sooner: keep a uniform number of the future's whole windows,
                # so sections see the zero (not yet generated) history a shorter video gives them.
                windows = history.shape[1] // ws
                history = history[:, : ws * int(torch.randint(windows + 1, (1,), generator=g))]
        else:
            layout = forward_layout(schedule)
            history = latents[:, : 1 + p]  # time order, most recent last
        if self.codebook is not None and history.shape[1]:
            history = quantise(history, self.codebook)
        groups = [x[0] for x in gather_history(history[None], schedule, self.order)]  # (C, f, h, w) each
        groups[0] = torch.cat([anchors, groups[0]], dim=1)  # the clean k1 group: anchors first
        indices = [layout.clean_k1(), *layout.groups[1:]]

        mu = math.log(cfg.shift) if cfg.shift is not None else dynamic_mu(noisy_tokens(ws, h, w))
        if cfg.sigma_sampling == "shifted-uniform":
            u = torch.rand((), generator=g, dtype=torch.float64)
        else:
            u = torch.sigmoid(
                cfg.logit_mean + cfg.logit_std * torch.randn((), generator=g, dtype=torch.float64)
            )
        sigma = float(flow_shift(u, mu))
        noise = torch.randn(x0.shape, generator=g)
        text, mask, pooled = clip["text"].float(), clip["text_mask"].float(), clip["pooled"].float()
        if cfg.caption_dropout and float(torch.rand((), generator=g)) < cfg.caption_dropout:
            text, mask, pooled = (self.empty[k].float() for k in ("text", "text_mask", "pooled"))
        return {
            "noisy": (1 - sigma) * x0 + sigma * noise,
            "target": noise - x0,
            "sigma": sigma,
            "noisy_indices": list(layout.noisy),
            "history": groups,
            "indices": [list(i) for i in indices],
            "text": text,
            "text_mask": mask,
            "pooled": pooled,
            "image_embeds": clip["image_embeds"].float(),
            "clip": clip_id,
            "position": p,
            "blank": blank,
            "weight": motion_weights(x0, latents[:, :1], cfg.motion_weight) if cfg.motion_weight else None,
        }

    # ------------------------------------------------------------------------------- training
    def _autocast(self):
        mode, device = self.config.autocast, self.device
        on = mode == "bf16" or (mode == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
        return torch.autocast(device.type, dtype=torch.bfloat16) if on else contextlib.nullcontext()

    def _forward(self, batch: Batch) -> torch.Tensor:
        c, d = self.model.config, self.device
        b = batch.noisy.shape[0]
        history = [HistoryGroup(g.latents.to(d), g.indices.to(d), g.kernel) for g in batch.history]
        guidance = torch.full((b,), self.guidance * 1000.0, device=d) if c.guidance_embeds else None
        with self._autocast():
            return self.net(
                batch.noisy.to(d),
                batch.noisy_indices.to(d),
                history,
                (batch.sigma * 1000.0).to(d),
                batch.text.to(d),
                batch.text_mask.to(d),
                batch.pooled.to(d),
                guidance,
                batch.image_embeds.to(d) if c.has_image_proj else None,
            )  # (B, C, ws, h, w)

    def train_step(self) -> float:
        """One optimiser step; returns the loss averaged over the global batch."""
        cfg, step = self.config, self.step
        lr = self.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch = self.batch(step)
        torch.manual_seed(int(_generator(cfg.seed, step, 2, self.rank).initial_seed()))  # LoRA dropout
        pred = self._forward(batch)
        if self._probe is not None:  # before backward, which fails when no adapter was called
            check, self._probe = self._probe, None
            check()
        loss = weighted_mse(pred.float(), batch.target.to(self.device), batch.weight)
        loss.backward()
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(list(self.trainable.values()), cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            with torch.no_grad():
                for name, p in self.trainable.items():
                    self.ema[name].lerp_(p.detach(), 1.0 - cfg.ema_decay)
        value = loss.detach().float()
        if dist.is_initialized() and self.world > 1:
            dist.all_reduce(value)
            value /= self.world
        self.step += 1
        return float(value)

    def _probe_lora(self):
        """Hooks counting calls of each adapted layer: one that is never called would not train."""
        counts = {}
        handles = []
        for name, module in lora_lib.lora_layers(self.model).items():
            counts[name] = 0
            handles.append(
                module.register_forward_hook(lambda *_, n=name: counts.__setitem__(n, counts[n] + 1))
            )

        def check() -> None:
            for h in handles:
                h.remove()
            silent = [n for n, k in counts.items() if k == 0]
            if silent:
                raise ValueError(
                    f"the layer {silent[0]} is read as a raw weight, not called, so an adapter on it would "
                    "not train; remove it from lora_targets."
                )

        return check

    def run(self) -> TrainResult:
        """Train up to `config.steps`, logging and writing checkpoints; returns the losses of this call."""
        from tqdm import tqdm

        cfg = self.config
        losses: list[float] = []
        window: list[float] = []
        checkpoint = self.resume_from
        start, log = self.step, None  # the log opens at its first row: a failed first step writes nothing
        self._probe = self._probe_lora() if cfg.mode == "lora" else None
        bar = tqdm(
            total=cfg.steps,
            initial=self.step,
            desc="train",
            unit="step",
            disable=not cfg.progress or self.rank > 0,
        )
        started = time.perf_counter()
        try:
            while self.step < cfg.steps:
                loss = self.train_step()
                losses.append(loss)
                window.append(loss)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    if self.rank == 0:
                        log = log or _LossLog(self.output, start)
                        mean = sum(window) / len(window)
                        log.write(self.step, mean, self.lr_at(self.step - 1), time.perf_counter() - started)
                    window = []
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                    checkpoint = self.save_checkpoint()
        finally:
            bar.close()
            self._probe = None
            if log is not None:
                log.close()
        return TrainResult(losses[-1] if losses else None, losses, checkpoint, self.step)

    # ------------------------------------------------------------------------------- checkpoints
    def _model_state(self, names=None) -> dict[str, torch.Tensor]:
        """Full weights on the CPU (gathered from every rank under FSDP), optionally only `names`."""
        if self.config.fsdp and self.world > 1:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            state = {
                k.removeprefix("transformer."): v
                for k, v in get_model_state_dict(self.net, options=opts).items()
            }
        else:
            state = {
                k: v.detach().cpu() for k, v in self.model.state_dict().items() if names is None or k in names
            }
        return state if names is None else {k: v for k, v in state.items() if k in names}

    def _optimizer_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """The optimiser state split into tensors (`name/key`) and JSON (groups, scalars), by parameter name."""
        if self.config.fsdp and self.world > 1:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            sd = get_optimizer_state_dict(self.net, self.optimizer, options=opts)
            rename = lambda k: k.removeprefix("transformer.")  # noqa: E731
        else:
            sd = self.optimizer.state_dict()
            rename = self._opt_names.__getitem__
        tensors, scalars = {}, {}
        for key, entry in sd.get("state", {}).items():  # empty off rank 0 under FSDP
            for stat, value in entry.items():
                if torch.is_tensor(value):
                    tensors[f"{rename(key)}/{stat}"] = value.detach().cpu().contiguous()
                else:
                    scalars.setdefault(rename(key), {})[stat] = value
        groups = [{**g, "params": [rename(p) for p in g["params"]]} for g in sd.get("param_groups", [])]
        return tensors, {"param_groups": groups, "scalars": scalars}

    def _load_optimizer(self, checkpoint: Path, meta: dict) -> None:
        from safetensors.torch import load_file

        tensors = load_file(str(checkpoint / OPTIMIZER_NAME))
        state: dict = {}
        for key, value in tensors.items():
            name, _, stat = key.rpartition("/")
            state.setdefault(name, {})[stat] = value
        for name, entries in meta["scalars"].items():
            state.setdefault(name, {}).update(entries)
        groups = [{**g, "betas": tuple(g["betas"])} for g in meta["param_groups"]]
        if self.config.fsdp and self.world > 1:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            prefixed = {
                "state": {f"transformer.{n}": s for n, s in state.items()},
                "param_groups": [{**g, "params": [f"transformer.{p}" for p in g["params"]]} for g in groups],
            }
            opts = StateDictOptions(full_state_dict=True)
            set_optimizer_state_dict(self.net, self.optimizer, prefixed, options=opts)
            return
        index = {n: i for i, n in enumerate(self._opt_names)}
        missing = [n for g in groups for n in g["params"] if n not in index]
        if missing:
            raise ValueError(
                f"the optimiser state in {checkpoint} names {missing[0]!r}, which is not trained now."
            )
        self.optimizer.load_state_dict(
            {
                "state": {index[n]: s for n, s in state.items()},
                "param_groups": [{**g, "params": [index[p] for p in g["params"]]} for g in groups],
            }
        )

    def _load_training_state(self, checkpoint: Path) -> None:
        self._load_optimizer(checkpoint, self._state(checkpoint)["optimizer"])
        if self.ema is None:
            return
        if self.config.mode == "lora":
            _, saved = lora_lib.read_adapter(checkpoint / "lora_ema")
        else:
            saved = load_transformer(checkpoint / "transformer_ema", dtype=torch.float32).state_dict()
        for name, p in self.trainable.items():
            if name not in saved:
                raise ValueError(f"the EMA weights in {checkpoint} lack {name!r}.")
            self.ema[name] = _like(p, saved[name])

    def _rank_digests(self) -> list[str] | None:
        """SHA-256 of each rank's trained weights (DDP keeps them identical); None without DDP."""
        if not dist.is_initialized() or self.world == 1 or self.config.fsdp:
            return None
        h = hashlib.sha256()
        for name in sorted(self.trainable):
            h.update(self.trainable[name].detach().cpu().contiguous().numpy().tobytes())
        out: list = [None] * self.world
        dist.all_gather_object(out, h.hexdigest())
        return out

    def save_checkpoint(self) -> Path:
        """Write `output/checkpoint-<step>` (atomically, by rank 0); every rank must call it."""
        from safetensors.torch import save_file

        cfg, step = self.config, self.step
        final = step >= cfg.steps
        lora = cfg.mode == "lora"
        names = None if (not lora or (final and cfg.merge_lora)) else set(self.trainable)
        state = self._model_state(names)
        optim_tensors, optim_meta = self._optimizer_state()
        ema = {n: _full(t) for n, t in self.ema.items()} if self.ema is not None else None
        digests = self._rank_digests() if final else None
        folder = self.output / f"checkpoint-{step}"
        if self.rank == 0:
            tmp = self.output / f".checkpoint-{step}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            config = self.model.config
            if lora:
                lora_lib.save_adapter(tmp / "lora", {n: state[n] for n in self.trainable}, self.lora_settings)
                if ema is not None:
                    lora_lib.save_adapter(tmp / "lora_ema", ema, self.lora_settings)
                if final and cfg.merge_lora:
                    merged = lora_lib.merge_state(state, self.lora_settings)
                    save_transformer(_Weights(config, merged), tmp / "transformer")
            else:
                save_transformer(_Weights(config, state), tmp / "transformer")
                if ema is not None:
                    save_transformer(_Weights(config, {**state, **ema}), tmp / "transformer_ema")
            save_file(optim_tensors, str(tmp / OPTIMIZER_NAME), metadata={"format": "pt"})
            if self.codebook is not None:
                save_file({"codebook": self.codebook.contiguous()}, str(tmp / CODEBOOK_NAME))
            info = {
                "format": STATE_FORMAT,
                "step": step,
                "config": cfg.to_dict(),
                "order": self.order,
                "schedule": self.schedule.name,
                "world_size": self.world,
                "rank_digests": digests,
                "optimizer": optim_meta,
            }
            (tmp / STATE_NAME).write_text(json.dumps(info, indent=2, default=str) + "\n")  # written last
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(tmp, folder)
            self._prune()
        if dist.is_initialized() and self.world > 1:
            dist.barrier()
        return folder

    def _prune(self) -> None:
        keep = self.config.keep_checkpoints
        if not keep:
            return
        found = sorted(
            (int(m.group(1)), p) for p in self.output.iterdir() if (m := _CHECKPOINT.fullmatch(p.name))
        )
        for _, path in found[:-keep]:
            shutil.rmtree(path, ignore_errors=True)

    def close(self) -> None:
        """Leave the process group this trainer started (if any)."""
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_group = False


class _LossLog:
    """`loss.csv` (step, loss, lr, seconds), plus TensorBoard scalars when tensorboard is installed.

    A resumed run keeps the rows up to its checkpoint's step and appends after them.
    """

    FIELDS = ("step", "loss", "lr", "seconds")

    def __init__(self, output: Path, step: int) -> None:
        output.mkdir(parents=True, exist_ok=True)
        self.path = output / LOG_NAME
        rows = []
        if step > 0 and self.path.is_file():
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
        self.file = open(self.path, "w", newline="")
        self.csv = csv.DictWriter(self.file, self.FIELDS)
        self.csv.writeheader()
        self.csv.writerows(rows)
        self.file.flush()
        self.tb = None
        if importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(output / "tensorboard"), purge_step=step + 1 if step else None)

    def write(self, step: int, loss: float, lr: float, seconds: float) -> None:
        self.csv.writerow(
            {"step": step, "loss": f"{loss:.9g}", "lr": f"{lr:.9g}", "seconds": f"{seconds:.3f}"}
        )
        self.file.flush()
        if self.tb is not None:
            self.tb.add_scalar("loss", loss, step)
            self.tb.add_scalar("lr", lr, step)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def train(config: TrainConfig | str | os.PathLike) -> TrainResult:
    """Train from a `TrainConfig` or a config file path; resumes from `output`'s newest checkpoint.

    Under `torchrun` (RANK / WORLD_SIZE set) each process takes its share of every global batch
    (DDP, or FSDP with `fsdp = true`); rank 0 writes the checkpoints and the loss log.
    """
    if not isinstance(config, TrainConfig):
        config = load_config(config)
    trainer = Trainer(config)
    try:
        return trainer.run()
    finally:
        trainer.close()
