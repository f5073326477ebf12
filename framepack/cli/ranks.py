"""A command under `torchrun` with several processes: the process group, each process's device,
and one voice (rank 0's) for what goes wrong (`framepack.pipeline.ranks` splits the model calls)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from ..devices import resolve_device
from .common import UserError

__all__ = ["on_ranks"]


def on_ranks(command: Callable[[argparse.Namespace], None], args: argparse.Namespace) -> None:
    """Run `command(args)` in the process group `torchrun` launched (none with one process):
    `args.device` becomes this process's own (`auto` or `cuda`: GPU `LOCAL_RANK`). Rank 0 reports
    bad input as one sentence; the other ranks leave with the same exit status, silently."""
    from ..parallel import join_from_env, leave, local_rank, rank_device, ranks

    try:
        args.device = rank_device(resolve_device(args.device, rank=local_rank()))
    except ValueError as e:
        raise UserError(str(e)) from None
    started = join_from_env(args.device)
    try:
        command(args)
    except UserError:
        if ranks().leader:
            raise
        raise SystemExit(2) from None  # rank 0 says the same sentence
    finally:
        if started:
            leave()
