"""`framepack batch JOBS.jsonl`: many generations, skipping finished ones, sharded under torchrun.

One line per job on stdout: `done NAME PATH (rank R)` or `skipped NAME PATH (rank R)`. A job whose
settings are rejected is reported on stderr and the others still run; the command then exits
with status 2 naming how many failed.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..devices import resolve_device

__all__ = ["add_parser"]


def add_parser(sub) -> None:
    p = sub.add_parser(
        "batch",
        help="run many generations from a JSON-lines file (skips finished jobs; shards under torchrun)",
    )
    p.add_argument(
        "jobs", help="JSON-lines file: one object of generation settings (+ model, one_frame) per line"
    )
    p.add_argument("--model", help="bundle for jobs that name none; default: the shipped demo model")
    p.add_argument("--out", default="outputs", help="output folder of every job")
    p.add_argument(
        "--device", default="auto", help="cpu, cuda, ... (auto: this rank's GPU when there is one)"
    )
    p.add_argument(
        "--list", action="store_true", help="only list this process's jobs and whether they are finished"
    )
    p.set_defaults(func=cmd_batch)


def cmd_batch(args: argparse.Namespace) -> None:
    from ..pipeline.batch import is_finished, job_outputs, process_rank, read_jobs, shard
    from .common import UserError

    try:
        jobs = read_jobs(args.jobs)
        rank, world = process_rank()
        device = resolve_device(args.device, rank=int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError as e:
        raise UserError(str(e)) from None
    mine = shard(jobs, rank, world)
    if args.list:
        for job in mine:
            state = "finished" if is_finished(job, args.out) else "to do"
            print(f"{job.name} (line {job.line}, rank {rank}): {state}")
        return

    import diffusers.utils.logging
    import transformers.utils.logging

    for library in (transformers.utils.logging, diffusers.utils.logging):
        library.disable_progress_bar()
        library.set_verbosity_error()
    from ..pipeline.bundle import load_bundle
    from ..pipeline.named import model_or_default
    from ..pipeline.run import open_run
    from ..pipeline.speed import check_device_settings

    loaded: tuple[str, object] | None = None  # one bundle at a time: a 13B model is big
    failed: list[str] = []
    for job in mine:
        output = job_outputs(job, args.out)[0]
        if is_finished(job, args.out):
            print(f"skipped {job.name} {output} (rank {rank})", flush=True)
            continue
        print(f"running {job.name} (line {job.line}, rank {rank})", flush=True)
        try:
            model = model_or_default(job.model or args.model)  # as generate: the demo model
            check_device_settings(job.settings, device)  # before loading anything
            key = (model, job.settings.ram_budget)  # under a RAM budget the weights wait in their files
            if loaded is None or loaded[0] != key:
                loaded = None
                # With a budget the weights wait on the host (load_bundle); a later job of the same
                # model without one moves them onto the device, one with one plans them there.
                s = job.settings
                loaded = (
                    key,
                    load_bundle(model, device=device, vram_budget=s.vram_budget, ram_budget=s.ram_budget),
                )
            open_run(loaded[1], job.request()).run(args.out)
        except ValueError as e:
            failed.append(job.name)
            print(f"framepack: job {job.name} (line {job.line}): {e}", file=sys.stderr, flush=True)
            continue
        print(f"done {job.name} {output} (rank {rank})", flush=True)
    if failed:
        raise UserError(
            f"{len(failed)} of {len(mine)} jobs failed (first: {failed[0]}); rerun to retry them."
        )
