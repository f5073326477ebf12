"""Training a small causal 3D VAE on the demo world, so the demo bundle has a learned VAE.

The model is diffusers' `AutoencoderKLHunyuanVideo` with the released layout (FRAMEPACK.md
section 6): 16 latent channels, 8x spatial and 4x temporal compression (`4t - 3` frames <-> `t`
latents), four blocks, only narrower. Clips are drawn on the fly from the demo world
(`framepack.training.world`): clip `i` is a `clip_frames` window of `sample_scene(seed + i)`, a
73-frame scene like those of `write_dataset`, so the motion is as slow as in the demo videos.
Every `image_every`-th step trains on single first frames instead, the start images that the
image-to-video pipeline encodes alone (`T = 1`).

The loss is the L1 plus `mse_weight` times the squared error of the reconstruction of a posterior
sample, plus `kl_weight` times the KL divergence to N(0, 1) per pixel value (the Stable Diffusion
VAE's balance: both sums divided by the pixel count); AdamW with warmup, cosine decay and gradient
clipping.

Two settings matter far more than the rest for these flat frames. GroupNorm statistics cover whole
clips, and a plain background makes a clip nearly constant, so each group must span several
channels to carry its colour: with 2 channels per group (8 groups of 16) the output collapses to
one colour for every clip; `groups=2` learns. And the step size must stay small: at `lr` 1e-4 and
above the reconstruction stalls at the mean colour, at 2e-5..3e-5 it falls steadily.

After training, `latent_stats` measures the posterior-mean latents of held-out scenes and the
scaling factor is `1 / std`, so scaled latents have unit standard deviation (the bundle manifest's
`vae_scaling_factor`; also stored in the VAE's config). The demo bundle's VAE, in two runs on a
shared 2-core CPU (passive OpenMP waiting keeps two threads from stalling when another job holds a
core); the second weighs the shape's pixels 11x, which turned faint, colour-shifted blobs into
shapes of the right colour::

    OMP_WAIT_POLICY=PASSIVE python -m framepack.training.vae --out demo-work/vae --steps 2400 --max-minutes 20
    OMP_WAIT_POLICY=PASSIVE python -m framepack.training.vae --out demo-work/vae2 --init demo-work/vae \
        --steps 4000 --max-minutes 35 --shape-weight 10 --lr 4e-5 --seed 200000
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from framepack.training import world

if TYPE_CHECKING:
    from diffusers import AutoencoderKLHunyuanVideo

__all__ = [
    "HELDOUT_SEED",
    "VAETrainConfig",
    "VAETrainReport",
    "build_vae",
    "demo_clips",
    "latent_stats",
    "main",
    "reconstruction_psnr",
    "shape_weights",
    "train_vae",
]

HELDOUT_SEED = 1_000_000_000  # held-out scenes are seeds from here on; training uses `seed + i`
SPATIAL, TEMPORAL, LATENT_CHANNELS = 8, 4, 16  # the released VAE's layout
LOG_NAME, REPORT_NAME = "loss.csv", "train_report.json"
INIT_LOGVAR = -6.0  # posterior std e^-3 ~ 0.05 at the start of training


@dataclass(frozen=True)
class VAETrainConfig:
    """What `build_vae` builds and `train_vae` does. Defaults: the demo bundle's VAE (about 7 MB).

    `channels` are the widths of the four blocks (the release: 128, 256, 512, 512); `layers` the
    resnets per encoder block (the decoder has one more); `groups` the GroupNorm groups, dividing
    every width. `clip_frames` must be `4k + 1`. `image_every`: every that many steps a batch of
    `batch * clip_frames` single frames is trained on (0: never). `max_minutes` stops early, and
    still saves, when training runs past it; the learning rate then decays on that clock.
    `shape_weight` weighs the pixels that differ from a clip's background (its median colour)
    `1 + shape_weight` times in the reconstruction loss: the shape covers a few percent of a frame,
    so an unweighted loss is content with a blurred shape. `init` continues from a saved VAE folder
    of the same widths instead of a fresh one.
    """

    channels: tuple[int, int, int, int] = (16, 32, 48, 48)
    layers: int = 1
    groups: int = 2
    size: int = 64
    clip_frames: int = 9
    scene_frames: int = world.DEFAULT_FRAMES
    batch: int = 2
    steps: int = 1000
    lr: float = 3e-5
    warmup: int = 50
    weight_decay: float = 0.0
    mse_weight: float = 1.0
    kl_weight: float = 1e-5
    grad_clip: float = 1.0
    image_every: int = 4
    seed: int = 0
    device: str = "cpu"
    max_minutes: float | None = None
    heldout: int = 16
    shape_weight: float = 0.0
    init: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(self.channels))
        if len(self.channels) != 4 or not all(isinstance(c, int) and c > 0 for c in self.channels):
            raise ValueError(f"channels must be four positive integers, got {self.channels}.")
        if not isinstance(self.groups, int) or self.groups < 1 or any(c % self.groups for c in self.channels):
            raise ValueError(f"groups ({self.groups}) must divide every channel width {self.channels}.")
        ints = {
            "layers": (self.layers, 1),
            "batch": (self.batch, 1),
            "steps": (self.steps, 1),
            "warmup": (self.warmup, 0),
            "image_every": (self.image_every, 0),
            "heldout": (self.heldout, 1),
        }
        for name, (value, low) in ints.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer of at least {low}, got {value!r}.")
        if not isinstance(self.size, int) or self.size % SPATIAL or not 8 <= self.size <= world.MAX_SIZE:
            raise ValueError(
                f"size must be a multiple of 8 between 8 and {world.MAX_SIZE}, got {self.size!r}."
            )
        if not isinstance(self.clip_frames, int) or self.clip_frames < 1 or (self.clip_frames - 1) % TEMPORAL:
            raise ValueError(f"clip_frames must be 4k + 1 (1, 5, 9, 13, ...), got {self.clip_frames!r}.")
        if not isinstance(self.scene_frames, int) or self.scene_frames < self.clip_frames:
            raise ValueError(f"scene_frames must be at least clip_frames ({self.clip_frames}).")
        for name in ("lr", "mse_weight", "kl_weight", "grad_clip", "weight_decay", "shape_weight"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}.")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"max_minutes must be positive, got {self.max_minutes}.")


@dataclass
class VAETrainReport:
    """What a training run did; written as `train_report.json` beside the weights."""

    config: dict
    steps: int  # steps actually taken (fewer than asked when `max_minutes` stopped the run)
    seconds: float
    first_loss: float  # mean of the first 20 steps' losses
    final_loss: float  # mean of the last 20 steps' losses
    final_recon: float  # mean L1 (in [-1, 1] units) of the last 20 steps
    final_kl: float  # mean KL per pixel value of the last 20 steps
    latent_mean: float
    latent_std: float
    scaling_factor: float
    heldout_psnr: float  # dB, uint8 frames, posterior-mean latents, held-out scenes
    heldout_image_psnr: float  # the same for single first frames (T = 1)
    parameters: int
    size_bytes: int  # the safetensors weights on disk (0 when not saved)
    losses: list[float] = field(default_factory=list, repr=False)


def build_vae(config: VAETrainConfig) -> AutoencoderKLHunyuanVideo:
    """A fresh `AutoencoderKLHunyuanVideo` of the config's widths (seeded by `config.seed`, without
    touching the global RNG), with the released compression: 8x spatial, 4x temporal, 16 channels."""
    from diffusers import AutoencoderKLHunyuanVideo

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        vae = AutoencoderKLHunyuanVideo(
            latent_channels=LATENT_CHANNELS,
            block_out_channels=config.channels,
            layers_per_block=config.layers,
            norm_num_groups=config.groups,
            spatial_compression_ratio=SPATIAL,
            temporal_compression_ratio=TEMPORAL,
        )
    # The posterior's log-variance (quant_conv's second half) starts at INIT_LOGVAR, not ~0, so the
    # decoder sees nearly deterministic latents from the first step instead of unit noise.
    with torch.no_grad():
        vae.quant_conv.weight[LATENT_CHANNELS:].zero_()
        vae.quant_conv.bias[LATENT_CHANNELS:].fill_(INIT_LOGVAR)
    return vae


def _load_init(vae: AutoencoderKLHunyuanVideo, folder: str) -> None:
    """Copy the weights of the saved VAE in `folder` into `vae`; the widths must match."""
    from diffusers import AutoencoderKLHunyuanVideo

    try:
        saved = AutoencoderKLHunyuanVideo.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the VAE to continue from in {folder}: {e}") from e
    try:
        vae.load_state_dict(saved.state_dict())
    except RuntimeError as e:
        raise ValueError(
            f"the VAE in {folder} does not have the configured widths {vae.config.block_out_channels}."
        ) from e


def shape_weights(x: torch.Tensor, shape_weight: float, threshold: float = 0.1) -> torch.Tensor:
    """Per-pixel loss weights `(B, 1, T, H, W)` for clips `x` `(B, 3, T, H, W)` in [-1, 1]:
    `1 + shape_weight` where a pixel's colour is more than `threshold` from its clip's background
    (the per-channel median, since the shape covers less than half the frame), else 1; scaled to
    mean 1 so the loss keeps its scale."""
    if shape_weight == 0:
        return torch.ones_like(x[:, :1])
    background = x.flatten(2).median(dim=2).values[:, :, None, None, None]  # (B, 3, 1, 1, 1)
    shape = ((x - background).abs().amax(dim=1, keepdim=True) > threshold).to(x.dtype)
    weight = 1 + shape_weight * shape
    return weight / weight.mean()


def _to_video(frames: np.ndarray) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (3, T, H, W) float32 in [-1, 1]."""
    return torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1


def demo_clips(seeds: Iterable[int], config: VAETrainConfig, frames: int | None = None) -> torch.Tensor:
    """Clips `(N, 3, frames, size, size)` in [-1, 1], one per seed: a window of `frames`
    (default `clip_frames`) of `sample_scene(seed, scene_frames)` starting where the seed says.
    `frames=1` gives the scenes' first frames (the start images of image-to-video)."""
    frames = config.clip_frames if frames is None else frames
    clips = []
    for seed in seeds:
        scene = world.sample_scene(seed, max(config.scene_frames, frames))
        window = random.Random(f"window/{seed}")  # independent of the scene's own draws
        start = 0 if frames == 1 else window.randrange(config.scene_frames - frames + 1)
        clips.append(_to_video(world.render(scene, start + frames, config.size)[start:]))
    return torch.stack(clips)  # (N, 3, T, H, W)


def _device_dtype(vae: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(vae.parameters())
    return p.device, p.dtype


@torch.no_grad()
def _encode_mean(vae: AutoencoderKLHunyuanVideo, clips: torch.Tensor, chunk: int) -> list[torch.Tensor]:
    device, dtype = _device_dtype(vae)
    return [
        vae.encode(part.to(device=device, dtype=dtype)).latent_dist.mode().float().cpu()
        for part in clips.split(chunk)
    ]  # [(n, 16, t, h, w)]


def latent_stats(
    vae: AutoencoderKLHunyuanVideo, clips: torch.Tensor | Sequence[torch.Tensor], chunk: int = 4
) -> tuple[float, float]:
    """Mean and standard deviation of the posterior-mean latents of `clips` ((N, 3, T, H, W) in
    [-1, 1], or a sequence of such batches), over every element. The scaling factor that gives
    scaled latents unit standard deviation is `1 / std`."""
    batches = [clips] if isinstance(clips, torch.Tensor) else list(clips)
    latents = torch.cat([z.flatten() for b in batches for z in _encode_mean(vae, b, chunk)])
    return float(latents.mean()), float(latents.std())


@torch.no_grad()
def reconstruction_psnr(vae: AutoencoderKLHunyuanVideo, clips: torch.Tensor, chunk: int = 4) -> float:
    """PSNR (dB) of uint8 frames against their reconstruction from posterior-mean latents, over all
    of `clips` ((N, 3, T, H, W) in [-1, 1])."""
    device, dtype = _device_dtype(vae)
    squared, count = 0.0, 0
    for part, z in zip(clips.split(chunk), _encode_mean(vae, clips, chunk), strict=True):
        out = vae.decode(z.to(device=device, dtype=dtype)).sample.float().cpu()  # (n, 3, T, H, W)
        a = torch.round((part.clamp(-1, 1) + 1) * 127.5)
        b = torch.round((out.clamp(-1, 1) + 1) * 127.5)
        squared += float(((a - b) ** 2).sum())
        count += a.numel()
    mse = squared / count
    return float("inf") if mse == 0 else 10 * math.log10(255**2 / mse)


def lr_at(step: int, config: VAETrainConfig, elapsed: float = 0.0) -> float:
    """Linear warmup, then cosine decay to a tenth of `lr` by the last step, or by `max_minutes`
    when that comes first (so a run stopped by the clock still ends annealed)."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(config.steps - config.warmup, 1)
    if config.max_minutes is not None:
        progress = max(progress, elapsed / (60 * config.max_minutes))
    return config.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0))))


def train_vae(
    config: VAETrainConfig, out_dir: str | os.PathLike[str] | None, progress: bool = True
) -> tuple[AutoencoderKLHunyuanVideo, VAETrainReport]:
    """Train `build_vae(config)` on demo-world clips; returns the VAE (eval mode) and its report.

    Step `s` draws `batch` fresh scenes (seeds `seed + s * batch + j`; image steps draw first
    frames from negative seeds), so a run is repeatable (except for where `max_minutes` stops it).
    With `out_dir`, writes `loss.csv` as it goes, then the weights (`save_pretrained`, safetensors;
    `scaling_factor` set from `latent_stats` of held-out scenes) and `train_report.json`.
    """
    device = torch.device(config.device)
    vae = build_vae(config)
    if config.init is not None:
        _load_init(vae, config.init)
    vae = vae.to(device).train()
    params = [p for p in vae.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    rest = [p for p in params if p.ndim <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=config.lr,
    )
    noise = torch.Generator(device).manual_seed(config.seed)
    folder = Path(out_dir) if out_dir is not None else None
    log = None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        log = open(folder / LOG_NAME, "w", newline="", encoding="utf-8")  # noqa: SIM115 - closed below
        writer = csv.writer(log)
        writer.writerow(["step", "frames", "loss", "recon_l1", "kl", "lr", "seconds"])

    losses, recons, kls = [], [], []
    start = time.monotonic()
    bar = tqdm(range(config.steps), desc="vae", unit="step", disable=not progress)
    try:
        for step in bar:
            x = _step_clips(step, config).to(device)
            lr = lr_at(step, config, time.monotonic() - start)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss, recon, kl = _losses(vae, x, noise, config)

            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()

            losses.append(loss.item())
            recons.append(recon.item())
            kls.append(kl.item())
            elapsed = time.monotonic() - start
            if log is not None:
                row = [step, x.shape[2], f"{losses[-1]:.6f}", f"{recons[-1]:.6f}", f"{kls[-1]:.4f}"]
                writer.writerow(row + [f"{lr:.3g}", f"{elapsed:.1f}"])
                log.flush()
            bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
            if config.max_minutes is not None and elapsed > 60 * config.max_minutes:
                break
    finally:
        bar.close()
        if log is not None:
            log.close()
    seconds = time.monotonic() - start
    vae.eval()
    report = _report(vae, config, losses, recons, kls, seconds)
    if folder is not None:
        vae.save_pretrained(folder, safe_serialization=True)
        report.size_bytes = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        summary = {k: v for k, v in asdict(report).items() if k != "losses"}
        (folder / REPORT_NAME).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return vae, report


def _step_clips(step: int, config: VAETrainConfig) -> torch.Tensor:
    """The clips of training step `step`: `batch` scenes (B, 3, T, H, W), or on an image step as
    many single first frames (B * T, 3, 1, H, W), so a step costs the same."""
    seeds = range(config.seed + step * config.batch, config.seed + (step + 1) * config.batch)
    if config.image_every > 0 and step % config.image_every == config.image_every - 1:
        count = config.batch * config.clip_frames
        seeds = range(-(config.seed + step * count) - 1, -(config.seed + (step + 1) * count) - 1, -1)
        return demo_clips(seeds, config, frames=1)
    return demo_clips(seeds, config)


def _losses(vae, x: torch.Tensor, noise: torch.Generator, config: VAETrainConfig):
    """(loss, weighted L1, KL per pixel value) of reconstructing a posterior sample of `x`."""
    posterior = vae.encode(x).latent_dist  # mean, std: (B, 16, t, h, w)
    z = posterior.sample(generator=noise)  # (B, 16, t, h, w)
    y = vae.decode(z).sample  # (B, 3, T, H, W)
    weight = shape_weights(x, config.shape_weight)  # (B, 1, T, H, W), mean 1
    recon = ((y - x).abs() * weight).mean()
    mse = ((y - x).pow(2) * weight).mean()
    kl = posterior.kl().sum() / x.numel()  # nats per pixel value
    return recon + config.mse_weight * mse + config.kl_weight * kl, recon, kl


def _report(vae, config: VAETrainConfig, losses, recons, kls, seconds: float) -> VAETrainReport:
    """The report of a run (`vae` in eval mode): its losses, and the held-out latent statistics and
    PSNR; sets the VAE's scaling factor to `1 / std` of those latents."""
    heldout = range(HELDOUT_SEED, HELDOUT_SEED + config.heldout)
    clips = demo_clips(heldout, config)
    mean, std = latent_stats(vae, clips)
    scaling = 1.0 / std
    vae.register_to_config(scaling_factor=scaling)
    tail = min(20, len(losses))
    return VAETrainReport(
        config=asdict(config),
        steps=len(losses),
        seconds=round(seconds, 1),
        first_loss=float(np.mean(losses[:tail])),
        final_loss=float(np.mean(losses[-tail:])),
        final_recon=float(np.mean(recons[-tail:])),
        final_kl=float(np.mean(kls[-tail:])),
        latent_mean=mean,
        latent_std=std,
        scaling_factor=scaling,
        heldout_psnr=reconstruction_psnr(vae, clips),
        heldout_image_psnr=reconstruction_psnr(vae, demo_clips(heldout, config, frames=1)),
        parameters=sum(p.numel() for p in vae.parameters()),
        size_bytes=0,
        losses=losses,
    )


# ------------------------------------------------------------------------------------------ CLI
def _parser() -> argparse.ArgumentParser:
    d = VAETrainConfig()
    p = argparse.ArgumentParser(
        prog="python -m framepack.training.vae",
        description="Train a small AutoencoderKLHunyuanVideo (8x spatial, 4x temporal, 16 channels) on the demo world.",
    )
    p.add_argument("--out", required=True, help="folder for the weights, loss.csv and train_report.json")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument(
        "--channels", default=",".join(map(str, d.channels)), help="four block widths, e.g. 16,32,48,48"
    )
    p.add_argument("--layers", type=int, default=d.layers, help="resnets per encoder block")
    p.add_argument("--groups", type=int, default=d.groups, help="GroupNorm groups")
    p.add_argument("--size", type=int, default=d.size, help="frame side in pixels")
    p.add_argument("--clip-frames", type=int, default=d.clip_frames, help="frames per clip, 4k + 1")
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--mse-weight", type=float, default=d.mse_weight)
    p.add_argument("--kl-weight", type=float, default=d.kl_weight)
    p.add_argument(
        "--image-every", type=int, default=d.image_every, help="every N-th step trains on single frames"
    )
    p.add_argument(
        "--shape-weight", type=float, default=d.shape_weight, help="extra loss weight on the shape's pixels"
    )
    p.add_argument("--init", default=None, help="continue from this saved VAE folder (same widths)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device)
    p.add_argument("--max-minutes", type=float, default=None, help="stop (and save) after this long")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        channels = tuple(int(c) for c in args.channels.split(","))
    except ValueError:
        parser.error(f"--channels must be four comma-separated integers, got {args.channels!r}.")
    try:
        config = VAETrainConfig(
            channels=channels,
            layers=args.layers,
            groups=args.groups,
            size=args.size,
            clip_frames=args.clip_frames,
            batch=args.batch,
            steps=args.steps,
            lr=args.lr,
            mse_weight=args.mse_weight,
            kl_weight=args.kl_weight,
            image_every=args.image_every,
            seed=args.seed,
            device=args.device,
            max_minutes=args.max_minutes,
            shape_weight=args.shape_weight,
            init=args.init,
        )
        torch.device(config.device)
    except (ValueError, RuntimeError) as e:
        parser.error(str(e))
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"device {config.device!r} was asked for but CUDA is not available.")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be at least 1, got {args.threads}.")
        torch.set_num_threads(args.threads)
    try:
        _, report = train_vae(config, args.out, progress=not args.quiet)
    except ValueError as e:
        parser.error(str(e))
    summary = {k: v for k, v in asdict(report).items() if k not in ("losses", "config")}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
