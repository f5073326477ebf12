"""`framepack train CONFIG`: train or fine-tune the packed transformer from a TOML or YAML config.

Run it under `torchrun --nproc-per-node N` for data-parallel training; docs/training.md lists
every config key.
"""

from __future__ import annotations

import argparse

from .common import UserError, run_command

__all__ = ["add_parser", "add_arguments", "cmd_train", "main"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="training config, a .toml or .yaml file (keys: docs/training.md)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="replace a config key, the value read as TOML (e.g. --set steps=200 --set output='runs/b')",
    )


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train or fine-tune the packed transformer on a latent cache")
    add_arguments(p)
    p.set_defaults(func=cmd_train)


def _parse_overrides(items: list[str]) -> dict:
    import tomllib

    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"--set {item!r} is not KEY=VALUE.")
        try:
            out[key] = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = text.strip()  # a bare word is a string
    return out


def cmd_train(args: argparse.Namespace) -> None:
    from ..training.config import load_config
    from ..training.train import train

    try:
        config = load_config(args.config, _parse_overrides(args.overrides))
        result = train(config)
    except ValueError as e:  # config, cache and checkpoint errors: one sentence each
        raise UserError(str(e)) from None
    import os

    if int(os.environ.get("RANK", 0)) == 0:
        loss = "no steps left to run" if result.final_loss is None else f"last loss {result.final_loss:.5f}"
        print(f"trained to step {result.step} ({loss}); checkpoint: {result.checkpoint}")


def main(argv: list[str] | None = None) -> int:
    """`python -m framepack.train CONFIG`: the same as `framepack train CONFIG`."""
    parser = argparse.ArgumentParser(prog="python -m framepack.train", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run_command(cmd_train, args)
