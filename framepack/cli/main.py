"""The `framepack` command line.

Each subcommand validates its input here, at the edge: bad input is one sentence on stderr and
exit status 2, never a traceback (`cli/common.py`).
"""

from __future__ import annotations

import argparse
import sys
import time

from .common import UserError, run_command

__all__ = ["main"]


def _parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UserError(f"size {text!r} is not HEIGHTxWIDTH in pixels, e.g. 480x832.") from None
    if h <= 0 or w <= 0 or h % 16 or w % 16:
        raise UserError(f"size {text!r} must be positive multiples of 16 pixels.")
    return h, w


def cmd_pack(args: argparse.Namespace) -> None:
    """Token arithmetic of a packing schedule at a frame size."""
    from ..packing import frame_tokens, get_schedule

    try:
        schedule = get_schedule(args.schedule)
    except ValueError as e:
        raise UserError(str(e)) from None
    h, w = _parse_size(args.size)
    lh, lw = h // 8, w // 8
    lf = frame_tokens(lh, lw)
    print(f"schedule {schedule.name}: {len(schedule.groups)} groups, window {schedule.generate} latents")
    print(f"frame {h}x{w} px -> latent {lh}x{lw} -> {lf} tokens per full-rate frame")
    for group, tokens in zip(schedule.groups, schedule.group_tokens(lh, lw), strict=True):
        print(f"  {group.frames:3d} x {group.kernel.name:<6} -> {tokens:6d} tokens")
    for n in args.history:
        total = schedule.context_length(lh, lw, history=n)
        print(f"history {n:6d} latents: context {total} tokens")
    longest = schedule.context_length(lh, lw, history=schedule.history_frames + 1)  # the tail too
    print(
        f"slots full ({schedule.history_frames} latents): {schedule.context_length(lh, lw)} tokens; "
        f"any longer history: {longest} tokens; bound {schedule.bound(lh, lw):.0f}"
    )


def cmd_info(args: argparse.Namespace) -> None:
    """Versions, the transformer specs and a smoke run of a tiny packed section on this machine."""
    import torch

    from .. import __version__
    from ..model import SPECS, HistoryGroup, PackedTransformer
    from ..model.attention import available_backends

    print(
        f"framepack {__version__}, torch {torch.__version__}, attention backends: {', '.join(available_backends())}"
    )
    for name, cfg in SPECS.items():
        with torch.device("meta"):
            n = sum(p.numel() for p in PackedTransformer(cfg).parameters())
        print(
            f"  spec {name:<12} {n / 1e9:8.3f} B parameters ({cfg.num_layers} dual + {cfg.num_single_layers} single)"
        )
    torch.manual_seed(0)
    cfg = SPECS["tiny"]
    model = PackedTransformer(cfg).eval()
    noisy = torch.randn(1, 16, 9, 8, 8)
    history = [
        HistoryGroup(torch.randn(1, 16, 2, 8, 8), torch.tensor([0, 10]), "k1"),
        HistoryGroup(torch.randn(1, 16, 2, 8, 8), torch.tensor([11, 12]), "k2"),
        HistoryGroup(torch.randn(1, 16, 16, 8, 8), torch.arange(13, 29), "k4"),
    ]
    start = time.perf_counter()
    with torch.no_grad():
        v = model.forward_packed(
            noisy,
            torch.arange(1, 10),
            history,
            torch.tensor([1000.0]),
            torch.randn(1, 8, cfg.text_embed_dim),
            None,
            torch.randn(1, cfg.pooled_projection_dim),
            torch.tensor([10000.0]),
            torch.randn(1, 16, cfg.image_proj_dim),
        )
    ms = (time.perf_counter() - start) * 1000
    print(f"smoke test: one packed section (tiny random model) -> velocity {tuple(v.shape)} in {ms:.0f} ms")
    if args.model or args.vram_budget or args.ram_budget:
        print(_memory_plan(args))


def _memory_plan(args: argparse.Namespace) -> str:
    """The tiers of a `--seconds` run of `--model` at its resolution under the given budgets, from
    the files' headers alone (`framepack.pipeline.tiers`); a budget too small is a UserError."""
    import numpy as np

    from ..pipeline.bundle import load_bundle
    from ..pipeline.settings import GenerationSettings, prepare
    from ..pipeline.tiers import tier_plan
    from .common import cli_device, cli_model
    from .generate_options import dtypes_of

    model, device = cli_model(args.model), cli_device(args.device)
    settings = GenerationSettings(
        prompt="a plan", seconds=args.seconds, vram_budget=args.vram_budget, ram_budget=args.ram_budget
    )
    try:
        bundle = load_bundle(
            model,
            device,
            vram_budget=args.vram_budget,
            ram_budget=args.ram_budget,
            lazy=True,
            dtypes=dtypes_of(args.dtype),
        )
        side = bundle.manifest.resolution
        prepared = prepare(bundle, settings, np.full((side, side, 3), 127, np.uint8))
        tiers = tier_plan(bundle, prepared)
    except ValueError as e:
        raise UserError(str(e)) from None
    size = f"{prepared.image.shape[1]}x{prepared.image.shape[0]}"
    return f"memory plan of a {args.seconds:g} s {size} run of {model} on {device}: {tiers.describe()}"


def cmd_download(args: argparse.Namespace) -> None:
    """Fetch a named bundle's files into the Hugging Face cache (resumes partial downloads)."""
    from ..pipeline.named import download_bundle

    try:
        dirs = download_bundle(args.name, progress=True, cache_dir=args.cache_dir)
    except ValueError as e:
        raise UserError(str(e)) from None
    for component, path in dirs.items():
        print(f"{component:<18} {path}")


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors as one sentence (`framepack: ...`) and exit status 2."""

    def error(self, message: str):
        print(f"framepack: {message}; see {self.prog} --help.", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="framepack", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "info", help="versions, model specs, a smoke run, and a model's memory plan under budgets"
    )
    p.add_argument(
        "--model", help="also state where this bundle's weights would live (read from headers only)"
    )
    p.add_argument("--device", default="auto", help="the device of that plan (default: CUDA if available)")
    p.add_argument("--vram-budget", metavar="GB|auto", help="the plan under this device budget")
    p.add_argument("--ram-budget", metavar="GB|auto", help="the plan under this host memory budget")
    p.add_argument("--seconds", type=float, default=5.0, help="the planned video's length (default 5)")
    p.add_argument(
        "--dtype", choices=["auto", "fp32", "release"], default="auto", help="weight dtypes, as in generate"
    )
    p.set_defaults(func=cmd_info)

    from .batch import add_parser as add_batch
    from .eval import add_parser as add_eval
    from .generate import add_parser as add_generate
    from .prepare import add_parser as add_prepare
    from .serve import add_parser as add_serve
    from .train import add_parser as add_train

    add_generate(sub)
    add_prepare(sub)
    add_train(sub)
    add_eval(sub)
    add_serve(sub)
    add_batch(sub)

    p = sub.add_parser("download", help="fetch a named model bundle (hunyuan-i2v, hunyuan-f1)")
    p.add_argument("name", help="named bundle: hunyuan-i2v or hunyuan-f1")
    p.add_argument("--cache-dir", help="Hugging Face cache folder (default: the hub's own)")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("pack", help="token counts of a packing schedule at a frame size")
    p.add_argument(
        "schedule", nargs="?", default="inverted", help="preset or paper name, e.g. f16k4f2k2f1k1_g9"
    )
    p.add_argument("--size", default="480x832", help="frame size HEIGHTxWIDTH in pixels")
    p.add_argument("--history", type=int, nargs="*", default=[0, 1, 3, 19, 100, 10000])
    p.set_defaults(func=cmd_pack)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # usage errors (already printed) and --help
        return e.code if isinstance(e.code, int) else 2
    except KeyboardInterrupt:  # before a command runs (`run_command` handles Ctrl-C after)
        print("framepack: interrupted.", file=sys.stderr)
        return 130
    return run_command(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
