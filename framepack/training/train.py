"""Training the packed transformer on a latent cache (FramePack paper, arXiv 2504.12626, section 3).

`Trainer` sets a run up and trains it; `train` runs one from a config. One sample is one section
of a cached clip, built exactly as inference builds it (`framepack.training.samples`); the loss is
the flow-matching velocity MSE on the window. Every random draw comes from a generator seeded by
(seed, step, sample), so a run resumed from a checkpoint repeats an unbroken one and N processes
see the global batch of one process. The parts: `run_setup` (schedule, device, model),
`samples` (batches), `optimizer` (AdamW, learning rate, its state by name), `distributed` (DDP /
FSDP), `checkpoints` (the folders, no pickle) and `loss_log` (`loss.csv`, TensorBoard).
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from ..model import HistoryGroup
from . import distributed
from . import lora as lora_lib
from .checkpoints import (
    CODEBOOK_NAME,
    CheckpointContents,
    check_resume,
    latest_checkpoint,
    prune_checkpoints,
    read_ema,
    read_optimizer,
    read_state,
    write_checkpoint,
)
from .codebook import fit_cache_codebook, load_codebook, save_codebook
from .config import TrainConfig, load_config
from .data import LatentCache
from .loss_log import LossLog
from .optimizer import build_optimizer, load_optimizer_state, lr_at, optimizer_state
from .run_setup import build_model, bundle_manifest, check_data, resolve_schedule, train_device
from .samples import Batch, Clips, SectionSampler, seeded_generator, weighted_mse

__all__ = ["TrainResult", "Batch", "Trainer", "train", "latest_checkpoint"]


@dataclass
class TrainResult:
    final_loss: float | None  # loss of the last step this call ran (None if it ran none)
    losses: list[float]  # loss of every step this call ran, averaged over the global batch
    checkpoint: Path | None  # the newest checkpoint folder
    step: int  # steps done in all, resumed ones included


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
        manifest = bundle_manifest(cfg.model)
        self.order, self.schedule = resolve_schedule(cfg, manifest, self.cache)
        self.window = self.schedule.generate
        self.clips = Clips(self.cache, self.window + 1)
        # Caption dropout trains on the empty caption's real embeddings, the negative prompt ""
        # that real CFG feeds at inference.
        self.empty = self.cache.empty_prompt() if cfg.caption_dropout else None
        guidance = cfg.distilled_guidance
        self.guidance = (
            guidance if guidance is not None else (manifest.distilled_guidance if manifest else 10.0)
        )
        self.device = train_device(cfg.device, self.local_rank)
        self.resume_from = latest_checkpoint(self.output)
        if self.resume_from is not None:
            check_resume(self.resume_from, cfg, self.output)
        self.step = int(read_state(self.resume_from)["step"]) if self.resume_from else 0
        self.model = build_model(cfg, self.schedule, self.resume_from)
        self._probe = None  # the LoRA call check of the first step (`run`)
        check_data(self.model, self.clips[self.clips.groups[0][1][0]])
        self._owns_group = distributed.join_process_group(self.device, self.world)
        try:
            self._distributed_setup()
        except BaseException:
            self.close()
            raise

    def _distributed_setup(self) -> None:
        """Everything from the codebook on: may hold collectives, so it runs inside the process group."""
        cfg = self.config
        self.codebook = self._codebook()
        self.sampler = SectionSampler(
            cfg, self.clips, self.order, self.schedule, self.empty, self.codebook, self.world
        )
        if not self._sharded:  # fully_shard moves each shard to the device itself
            self.model.to(self.device)
        self.net: nn.Module = distributed.wrap(
            distributed.StepModule(self.model), self.model, self.device, self.world, cfg.fsdp
        )
        self.trainable = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        if not self.trainable:
            raise ValueError("the model has no trainable parameters in this mode.")
        self.optimizer, self._opt_names = build_optimizer(self.trainable, cfg)
        self.ema = {n: p.detach().clone() for n, p in self.trainable.items()} if cfg.ema_decay else None
        if self.resume_from is not None:
            self._load_training_state(self.resume_from)

    # ------------------------------------------------------------------------------- set-up
    @property
    def _sharded(self) -> bool:
        """Whether FSDP shards the model over the processes."""
        return self.config.fsdp and self.world > 1

    @property
    def lora_settings(self) -> dict:
        c = self.config
        return {
            "r": c.lora_rank,
            "lora_alpha": c.lora_alpha,
            "lora_dropout": c.lora_dropout,
            "targets": c.lora_targets,
        }

    def _codebook(self) -> torch.Tensor | None:
        """The +D codebook: the run's saved one, else fitted on the cache (the same on every rank)."""
        cfg = self.config
        k = cfg.discretize
        if k is None:
            return None
        path = self.output / CODEBOOK_NAME
        channels = self.model.config.in_channels
        if path.is_file():
            return load_codebook(path, k, channels)
        ids = [i for _, group in self.clips.groups for i in group]
        g = seeded_generator(cfg.seed, 0, 3)
        codebook = fit_cache_codebook(
            self.cache, ids, channels, k, cfg.discretize_samples, cfg.discretize_iters, g
        )
        # every rank fits the same one; rank 0's is the reference
        codebook = distributed.shared_from_rank0(codebook, self.device)
        if self.rank == 0:
            self.output.mkdir(parents=True, exist_ok=True)
            save_codebook(path, codebook)
        return codebook

    # ------------------------------------------------------------------------------- batches
    def lr_at(self, step: int) -> float:
        """Learning rate of step `step` (0-based): linear warm-up, then constant or cosine to 0."""
        return lr_at(self.config, step)

    def batch(self, step: int, rank: int | None = None) -> Batch:
        """This process's share of the global batch of `step` (the same for any number of processes)."""
        return self.sampler.batch(step, self.rank if rank is None else rank)

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
        torch.manual_seed(int(seeded_generator(cfg.seed, step, 2, self.rank).initial_seed()))  # LoRA dropout
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
        value = distributed.mean_over_ranks(loss.detach().float(), self.world)
        self.step += 1
        return float(value)

    def run(self) -> TrainResult:
        """Train up to `config.steps`, logging and writing checkpoints; returns the losses of this call."""
        from tqdm import tqdm

        cfg = self.config
        losses: list[float] = []
        window: list[float] = []
        checkpoint = self.resume_from
        start, log = self.step, None  # the log opens at its first row: a failed first step writes nothing
        self._probe = lora_lib.probe_calls(self.model) if cfg.mode == "lora" else None
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
                        log = log or LossLog(self.output, start)
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
    def _load_training_state(self, checkpoint: Path) -> None:
        """The optimiser state and the EMA weights of `checkpoint`."""
        state, groups = read_optimizer(checkpoint, read_state(checkpoint)["optimizer"])
        fsdp = self.net if self._sharded else None
        load_optimizer_state(self.optimizer, self._opt_names, state, groups, checkpoint, fsdp)
        if self.ema is None:
            return
        saved = read_ema(checkpoint, self.config.mode == "lora")
        for name, p in self.trainable.items():
            if name not in saved:
                raise ValueError(f"the EMA weights in {checkpoint} lack {name!r}.")
            self.ema[name] = distributed.laid_out_like(p, saved[name])

    def save_checkpoint(self) -> Path:
        """Write `output/checkpoint-<step>` (atomically, by rank 0); every rank must call it."""
        cfg, step = self.config, self.step
        final = step >= cfg.steps
        lora = cfg.mode == "lora"
        merge = lora and final and cfg.merge_lora
        names = None if (not lora or merge) else set(self.trainable)
        fsdp = self.net if self._sharded else None
        state = distributed.gathered_model_state(self.model, self.net, self._sharded, names)
        optim_tensors, optim_meta = optimizer_state(self.optimizer, self._opt_names, fsdp)
        ema = {n: distributed.cpu_copy(t) for n, t in self.ema.items()} if self.ema is not None else None
        digests = distributed.rank_digests(self.trainable, self.world, cfg.fsdp) if final else None
        folder = self.output / f"checkpoint-{step}"
        if self.rank == 0:
            info = {
                "step": step,
                "config": cfg.to_dict(),
                "order": self.order,
                "schedule": self.schedule.name,
                "world_size": self.world,
                "rank_digests": digests,
                "optimizer": optim_meta,
            }
            contents = CheckpointContents(
                model_config=self.model.config,
                weights=state,
                trainable=self.trainable,
                lora_settings=self.lora_settings if lora else None,
                merge=merge,
                ema=ema,
                optimizer_tensors=optim_tensors,
                info=info,
                codebook=self.codebook,
            )
            write_checkpoint(folder, contents)
            prune_checkpoints(self.output, cfg.keep_checkpoints)
        distributed.barrier(self.world)
        return folder

    def close(self) -> None:
        """Leave the process group this trainer started (if any)."""
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_group = False


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
