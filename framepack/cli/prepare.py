"""`framepack prepare`: a folder of captioned videos (or a JSONL manifest) -> a latent cache."""

from __future__ import annotations

import argparse
import sys
import warnings

from .common import UserError, cli_device

__all__ = ["add_parser"]


def add_parser(sub) -> None:
    p = sub.add_parser(
        "prepare", help="encode captioned videos once into a cache of latents and embeddings for training"
    )
    p.add_argument("source", help="folder of videos with a <name>.txt caption each, or a .jsonl manifest")
    p.add_argument("--model", required=True, help="bundle directory or named bundle whose encoders to use")
    p.add_argument("--out", required=True, help="cache folder (index.json + one .safetensors per clip)")
    p.add_argument("--resolution", type=int, help="bucket setting, e.g. 640 (default: the bundle's)")
    p.add_argument("--fps", type=float, help="frame rate to resample to (default: the bundle's, 30)")
    p.add_argument("--window", type=int, help="latents per section (default: the bundle's, 9)")
    p.add_argument("--max-frames", type=int, help="keep at most this many frames of each clip")
    p.add_argument("--device", help="where the encoders run (default: cuda if available, else cpu)")
    p.set_defaults(func=cmd_prepare)


def cmd_prepare(args: argparse.Namespace) -> None:
    import torch

    from ..pipeline.bundle import load_bundle
    from ..training.prepare import PrepareWarning, prepare_dataset

    device = cli_device(args.device or "auto")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but torch sees no CUDA GPU here.")
    try:
        bundle = load_bundle(args.model, device=device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PrepareWarning)  # listed once below, not between bar updates
            report = prepare_dataset(
                args.source,
                bundle,
                args.out,
                resolution=args.resolution,
                fps=args.fps,
                window=args.window,
                max_frames=args.max_frames,
            )
    except ValueError as e:  # InputError and BundleError: one sentence each
        raise UserError(str(e)) from None
    for problem in report.problems:
        print(f"skipped: {problem}", file=sys.stderr)
    print(report.summary())
    print(report.index)
