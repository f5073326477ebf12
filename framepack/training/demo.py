"""Build the demo bundle: every learned part trained by our own code on the demo world.

    python -m framepack.training.demo --vae DIR --work demo-work --out framepack/demo_model \\
        --clips 400 --steps 3000

Steps: (1) the tiny text/image encoders and tokenizers of `framepack.testing` (frozen at random
init, as the issue allows); (2) the VAE trained by `framepack.training.vae` (passed in with
`--vae`); (3) demo-world clips rendered and encoded by `framepack prepare`; (4) the packed
transformer trained from scratch by `framepack train` in the inverted anti-drifting order with the
released packing preset; (5) the bundle assembled in the real layout with a model card.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import shutil
import sys
import time
from pathlib import Path

__all__ = [
    "DEMO_TRANSFORMER",
    "EXAMPLES",
    "build_demo_bundle",
    "main",
    "merge_caches",
    "plain_caption_cache",
    "write_examples",
]

# The demo transformer: the tiny encoders' widths, a few blocks of inner dim 192 (sized so that
# training fits about an hour on a shared 2-core CPU).
DEMO_TRANSFORMER = dict(
    num_attention_heads=3,
    attention_head_dim=64,
    rope_axes_dim=[8, 28, 28],
    num_layers=2,
    num_single_layers=4,
    num_refiner_layers=1,
)
DEMO_MANIFEST = dict(name="framepack-demo", resolution=64, steps=25, window=9, fps=30)
ENCODERS = (
    "text_encoder",
    "tokenizer",
    "text_encoder_2",
    "tokenizer_2",
    "feature_extractor",
    "image_encoder",
)


def _loss_table(csv_path: Path, rows: int = 12) -> str:
    with csv_path.open() as f:
        data = list(csv.DictReader(f))
    if not data:
        return "(no loss rows)"
    pick = [data[round(i * (len(data) - 1) / (rows - 1))] for i in range(rows)] if len(data) > rows else data
    lines = ["| step | loss |", "| --- | --- |"]
    lines += [f"| {r['step']} | {float(r['loss']):.4f} |" for r in pick]
    return "\n".join(lines)


# Start images for the README and the GUI's examples: scenes from seeds no training run drew.
EXAMPLES = (
    ("red circle moves right", "a red circle moves right on a blue background", 900_001),
    ("yellow square moves up", "a yellow square moves up on a black background", 900_002),
    ("white triangle moves left", "a white triangle moves left on a purple background", 900_003),
    ("green circle moves down", "a green circle moves down on a yellow background", 900_004),
)


def write_examples(folder: Path, size: int = 64) -> list[Path]:
    """Write each example's start image (`<name>.png`) and caption (`<name>.txt`) into `folder`."""
    from PIL import Image

    from .world import first_frame, scene_from_caption

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for title, caption, seed in EXAMPLES:
        stem = folder / title.replace(" ", "_")
        Image.fromarray(first_frame(scene_from_caption(caption, seed), size)).save(stem.with_suffix(".png"))
        stem.with_suffix(".txt").write_text(caption + "\n")
        written.append(stem.with_suffix(".png"))
    return written


def scale_text_encoder(bundle_dir: Path, factor: float) -> None:
    """Multiply the LLaMA token embeddings of a bundle by `factor`, in place.

    The tiny random LLaMA's hidden states have a norm of about 0.1 per token (embeddings drawn
    with std 0.02), against O(1) per element for a trained LLaMA; the packed transformer's text
    projection then sees little but its own bias, and learns to ignore the tokens. Scaled
    embeddings dominate the residual stream (every layer reads it through an RMSNorm), so the
    states keep each token's identity at a useful size. The encoder stays frozen random weights.
    """
    import torch
    from transformers import LlamaModel

    llama = LlamaModel.from_pretrained(bundle_dir / "text_encoder")
    with torch.no_grad():
        llama.embed_tokens.weight.mul_(factor)
    llama.save_pretrained(bundle_dir / "text_encoder")


def merge_caches(out: Path, caches: list[Path]) -> Path:
    """One training cache from several `prepare` caches made with the same bundle: `out` gets an
    index of all their clips (each file a symlink named `<cache>__<file>`) and the first cache's
    empty-caption embeddings. Returns `out`."""
    from ..io import write_json_atomic
    from .data import LatentCache
    from .prepare import CACHE_FORMAT

    out.mkdir(parents=True, exist_ok=True)
    entries, settings = [], None
    for cache in caches:
        data = LatentCache(cache)
        settings = settings or data.settings
        for entry in data.entries:
            name = f"{cache.name}__{entry['file']}"
            link = out / name
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to((cache / entry["file"]).resolve())
            entries.append({**entry, "file": name})
    empty = caches[0] / "empty_prompt.safetensors"
    if empty.is_file():
        shutil.copyfile(empty, out / empty.name)
    write_json_atomic({"format": CACHE_FORMAT, "settings": settings, "clips": entries}, out / "index.json")
    return out


BACKGROUND_PHRASE = re.compile(r" on an? \w+ background$")


def plain_caption_cache(cache: Path, bundle, out: Path) -> Path:
    """A copy of the `prepare` cache `cache` whose captions lose their "on a <colour> background"
    phrase (`world.Scene.plain_caption`), the text encoded again with `bundle` (a `Bundle` or its
    folder: the one that made `cache`); latents and image embeddings are copied as they are, so a
    clip costs one text encode, not a VAE pass. Clips without the phrase are left out. Returns
    `out`."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from ..io import write_json_atomic
    from ..pipeline.bundle import Bundle, load_bundle
    from ..pipeline.conditioning import encode_prompt
    from .data import LatentCache

    data = LatentCache(cache)
    bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, entry in enumerate(data.entries):
        caption = BACKGROUND_PHRASE.sub("", entry["caption"])
        if caption == entry["caption"]:
            continue
        tensors = data[i]
        prompt = encode_prompt(bundle, caption)
        tensors.update(text=prompt.text[0], text_mask=prompt.mask[0], pooled=prompt.pooled[0])
        with safe_open(str(cache / entry["file"]), framework="pt") as f:
            meta = {**(f.metadata() or {}), "caption": caption}
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(out / entry["file"]), meta)
        entries.append({**entry, "caption": caption})
    shutil.copyfile(cache / "empty_prompt.safetensors", out / "empty_prompt.safetensors")
    index = {"format": json.loads((cache / "index.json").read_text())["format"], "settings": data.settings}
    write_json_atomic({**index, "clips": entries}, out / "index.json")
    return out


def build_demo_bundle(
    vae_dir: Path,
    work: Path,
    out: Path,
    clips: int = 400,
    frames: int = 145,
    steps: int = 3000,
    batch_size: int = 8,
    lr: float = 3e-4,
    scaling_factor: float | None = None,
    init: Path | None = None,
    end_probability: float = 0.5,
    run_name: str = "run",
    cache_name: str = "cache",
    order: str = "inverted",
    centre_clips: int = 0,
    caption_dropout: float = 0.0,
    cfg: float = 1.0,
    text_scale: float = 1.0,
    motion_weight: float = 0.0,
    centre_only: bool = False,
) -> Path:
    """Train the demo transformer on top of `vae_dir` and write the bundle to `out`.

    `init`: a transformer folder to continue from (a checkpoint's `transformer/`) instead of
    training from scratch; `run_name` the run folder under `work`, `cache_name` the latent cache's
    (a cache made with another VAE is encoded again). `order`: "inverted" (anti-drifting, the
    shipped model) or "forward" (the F1 layout; for the drift comparison). `centre_clips`: that
    many more clips whose shapes start near the middle (`world.sample_scene(start="centre")`), so
    only the caption tells the direction; `caption_dropout` trains the unconditional that real
    CFG needs, and `cfg` becomes the bundle's default real CFG scale. `text_scale` multiplies
    the frozen LLaMA's token embeddings (`scale_text_encoder`); `motion_weight` is the train
    config key of that name. `centre_only` trains on the centre clips alone: where the shape
    starts then says nothing about where it goes, so the loss rewards reading the caption.
    """
    import torch

    from ..model import load_transformer, save_transformer
    from ..pipeline.manifest import MANIFEST_NAME
    from .train import train

    started = time.time()
    work.mkdir(parents=True, exist_ok=True)
    staging = work / "bundle"
    manifest = _stage_bundle(vae_dir, staging, scaling_factor, text_scale)
    work = work.resolve()
    cache = _training_cache(work, staging, cache_name, clips, frames, centre_clips, centre_only)
    run = work / run_name
    config = work / f"train-{run_name}.toml"
    config.write_text(
        _train_config(
            cache, run, init, order, steps, batch_size, lr, end_probability, caption_dropout, motion_weight
        )
    )
    result = train(config)

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name in (*ENCODERS, "vae"):
        shutil.copytree(staging / name, out / name)
    # Stored in bf16 to keep the shipped bundle small; a CPU loads it back as fp32.
    trained = load_transformer(Path(result.checkpoint) / "transformer", dtype=torch.bfloat16)
    save_transformer(trained, out / "transformer")
    manifest.replace(order=order, packing=order, cfg=cfg).save(out / MANIFEST_NAME)
    write_examples(out / "examples")
    how = _training_summary(
        order, clips, frames, centre_clips, centre_only, end_probability, caption_dropout, cfg
    )
    origin = f"on from `{init}`" if init else "from scratch"
    minutes = (time.time() - started) / 60
    card = _model_card(manifest, how, origin, minutes, steps, batch_size, result.final_loss, out, run)
    (out / "README.md").write_text(card)
    return out


def _stage_bundle(vae_dir: Path, staging: Path, scaling_factor: float | None, text_scale: float):
    """A fresh bundle in `staging`: the tiny tokenizers and frozen random encoders, the VAE of
    `vae_dir` and a placeholder demo transformer; returns its manifest."""
    from ..model import PackedTransformer, get_spec, save_transformer
    from ..pipeline.manifest import MANIFEST_NAME, Manifest
    from ..testing import make_tiny_bundle

    if staging.exists():
        shutil.rmtree(staging)
    make_tiny_bundle(staging, **DEMO_MANIFEST)  # tokenizers + frozen random encoders
    shutil.rmtree(staging / "vae")
    shutil.copytree(vae_dir, staging / "vae")
    if text_scale != 1:
        scale_text_encoder(staging, text_scale)
    manifest = Manifest.load(staging / MANIFEST_NAME)
    if scaling_factor is not None:
        manifest = manifest.replace(vae_scaling_factor=scaling_factor)
    manifest = manifest.replace(vae_temporal_tiles=False)  # the demo VAE was trained on whole clips
    manifest.save(staging / MANIFEST_NAME)
    spec = get_spec("tiny").replace(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in DEMO_TRANSFORMER.items()}
    )
    shutil.rmtree(staging / "transformer")
    save_transformer(PackedTransformer(spec), staging / "transformer")  # replaced after training
    return manifest


def _training_cache(
    work: Path,
    staging: Path,
    cache_name: str,
    clips: int,
    frames: int,
    centre_clips: int,
    centre_only: bool,
) -> Path:
    """The latent cache to train on: demo-world clips rendered (unless already there) and encoded
    with the `staging` bundle, the centre clips' cache, or both merged."""
    from .prepare import prepare_dataset
    from .world import write_dataset

    clip_dir, cache = work / "clips", work / cache_name
    if centre_only and not centre_clips:
        raise ValueError("centre_only needs centre_clips.")
    if not centre_only:
        if not (clip_dir / "manifest.jsonl").exists():
            write_dataset(clip_dir, clips, frames=frames, size=64, seed=1000)
        prepare_dataset(clip_dir, staging, cache)
    if centre_clips:
        centre_dir, centre_cache = work / "clips-centre", work / f"{cache_name}-centre"
        if not (centre_dir / "manifest.jsonl").exists():
            write_dataset(centre_dir, centre_clips, frames=frames, size=64, seed=3000, start="centre")
        prepare_dataset(centre_dir, staging, centre_cache)
        cache = (
            centre_cache if centre_only else merge_caches(work / f"{cache_name}-mix", [centre_cache, cache])
        )
    return cache


def _train_config(
    cache: Path,
    run: Path,
    init: Path | None,
    order: str,
    steps: int,
    batch_size: int,
    lr: float,
    end_probability: float,
    caption_dropout: float,
    motion_weight: float,
) -> str:
    """The TOML training config of the demo transformer (`framepack train`)."""
    overrides = ", ".join(f"{k} = {json.dumps(v)}" for k, v in DEMO_TRANSFORMER.items())
    return (
        "\n".join(
            [
                f'data = "{cache}"',
                f'output = "{run}"',
                f'model = "{Path(init).resolve()}"' if init else 'model = "tiny"',
                "" if init else f"config_overrides = {{ {overrides} }}",
                f'order = "{order}"',
                f'schedule = "{order}"',
                f"steps = {steps}",
                f"batch_size = {batch_size}",
                f"lr = {lr}",
                'lr_schedule = "cosine"',
                f"warmup_steps = {50 if init else 100}",
                f"end_probability = {end_probability if order == 'inverted' else 0.0}",
                f"caption_dropout = {caption_dropout}",
                f"motion_weight = {motion_weight}",
                "checkpoint_every = 500",
                "log_every = 25",
                "seed = 0",
            ]
        )
        + "\n"
    )


def _training_summary(
    order: str,
    clips: int,
    frames: int,
    centre_clips: int,
    centre_only: bool,
    end_probability: float,
    caption_dropout: float,
    cfg: float,
) -> str:
    """How the transformer was trained, for the model card (the rest of its sentence)."""
    if order != "inverted":
        return (
            "forward (F1) order with the released packing preset (start + 16 k4 + 2 k2 + 1 k1), "
            f"window 9, on {clips} clips of {frames} frames."
        )
    return (
        "inverted anti-drifting order with the released packing preset (start + 1 k1 + 2 k2 + 16 k4), "
        + (
            f"window 9, on {centre_clips} clips of {frames} frames whose shapes start near the middle"
            if centre_only
            else f"window 9, on {clips} clips of {frames} frames"
            + (f" and {centre_clips} more whose shapes start near the middle" if centre_clips else "")
        )
        + f"; a sample's future is cut after a random window with probability {end_probability}"
        + (f"; captions dropped with probability {caption_dropout}" if caption_dropout else "")
        + (f'. Generation uses real CFG {cfg:g} by default (negative prompt "").' if cfg != 1 else ".")
    )


def _model_card(
    manifest,
    how: str,
    origin: str,
    minutes: float,
    steps: int,
    batch_size: int,
    final_loss: float,
    out: Path,
    run: Path,
) -> str:
    """The bundle's README.md: what each part is, how it was built, and the loss table of `run`."""
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 1e6
    return f"""# framepack demo model

A small FramePack bundle in the real layout, every learned part trained by this repository's code
on the procedural demo world (`framepack.training.world`: one coloured shape on a plain background
moving as its caption says, 64x64 pixels, 30 fps). Not a general video model.

- Encoders: the tiny LLaMA / CLIP / SigLIP of `framepack.testing`, frozen at random init, with a
  small local byte-level tokenizer (the issue allows frozen random encoders).
- VAE: `AutoencoderKLHunyuanVideo` (8x spatial, 4x temporal, 16 channels) trained by
  `python -m framepack.training.vae`, scaling factor {manifest.vae_scaling_factor:.4f}.
- Transformer: the packed transformer ({json.dumps(DEMO_TRANSFORMER)}), trained {origin} by
  `framepack train` in the {how}

Built with `{" ".join(sys.argv) or "build_demo_bundle(...)"}` in {minutes:.0f} minutes on a
2-core CPU; {steps} steps, batch {batch_size}, final loss {final_loss:.4f}; {size:.1f} MB.

Loss (mean over the logging interval):

{_loss_table(run / "loss.csv")}
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Train and assemble the demo bundle.")
    p.add_argument("--vae", required=True, type=Path, help="trained demo VAE folder (save_pretrained layout)")
    p.add_argument(
        "--scaling-factor", type=float, help="VAE latent scaling factor (from the VAE training report)"
    )
    p.add_argument("--work", type=Path, default=Path("demo-work"))
    p.add_argument("--out", type=Path, default=Path("framepack/demo_model"))
    p.add_argument("--clips", type=int, default=400)
    p.add_argument("--frames", type=int, default=145)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument(
        "--init", type=Path, help="continue from this transformer folder (a checkpoint's transformer/)"
    )
    p.add_argument(
        "--end-probability",
        type=float,
        default=0.5,
        help="chance a sample's clip is cut after a random window",
    )
    p.add_argument("--run", default="run", help="run folder name under --work")
    p.add_argument("--cache", default="cache", help="latent cache folder name under --work")
    p.add_argument(
        "--order", choices=("inverted", "forward"), default="inverted", help="section order to train"
    )
    p.add_argument(
        "--centre-clips", type=int, default=0, help="more clips whose shapes start near the middle"
    )
    p.add_argument("--caption-dropout", type=float, default=0.0, help="chance a caption is dropped")
    p.add_argument("--cfg", type=float, default=1.0, help="the bundle's default real CFG scale")
    p.add_argument("--text-scale", type=float, default=1.0, help="factor on the LLaMA token embeddings")
    p.add_argument("--motion-weight", type=float, default=0.0, help="train config motion_weight")
    p.add_argument(
        "--centre-only", action="store_true", help="train on the --centre-clips alone (no position cue)"
    )
    a = p.parse_args(argv)
    if a.centre_only and not a.centre_clips:
        print("demo: --centre-only needs --centre-clips N.", file=sys.stderr)
        return 2
    if not (a.vae / "config.json").is_file():
        print(f"demo: {a.vae} is not a trained VAE folder (no config.json).", file=sys.stderr)
        return 2
    out = build_demo_bundle(
        a.vae,
        a.work,
        a.out,
        a.clips,
        a.frames,
        a.steps,
        a.batch_size,
        a.lr,
        a.scaling_factor,
        a.init,
        a.end_probability,
        a.run,
        a.cache,
        a.order,
        a.centre_clips,
        a.caption_dropout,
        a.cfg,
        a.text_scale,
        a.motion_weight,
        a.centre_only,
    )
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
