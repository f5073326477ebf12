"""`framepack generate`: image + prompt -> mp4, with a progress bar and optional JSON events."""

from __future__ import annotations

import argparse
import json
import sys
import threading
import warnings

from ..devices import resolve_device
from .common import Interrupted, UserError
from .generate_options import (
    ONE_FRAME_GROUPS,
    add_generate_options,
    cache_option,
    dtypes_of,
    keyframe_items,
    timed_prompt_text,
)
from .interrupts import stop_if_interrupted
from .outputs import check_events_file, check_out_folder, event_json
from .ranks import on_ranks

__all__ = ["add_parser", "cmd_generate"]


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate a video from a start image and a prompt")
    add_generate_options(p)
    p.set_defaults(func=cmd_generate)


def _so_far(video) -> str:
    """Where a stopped run's video and job directory are, for the one-line message."""
    if not video or not video.with_suffix(".job").is_dir():
        return f"; the video so far is {video}" if video else ""
    job = video.with_suffix(".job")
    return f"; the video so far is {video}; continue with framepack generate --resume {job}"


def _quiet_loaders() -> None:
    """Our progress bar is the one to show: silence diffusers' and transformers' loading bars."""
    import diffusers.utils.logging
    import transformers.utils.logging

    for library in (transformers.utils.logging, diffusers.utils.logging):
        library.disable_progress_bar()
        library.set_verbosity_error()


def _plan_line(run, args: argparse.Namespace) -> str:
    """What the run will make, in one line: sections, frames and seconds (and why not the seconds
    asked for: a video is a whole number of sections, rounded as the release rounds); under a VRAM
    budget, what the device holds besides weights (`framepack.pipeline.budget`)."""
    prepared, extension = run.prepared, run.source is not None
    plan, fps = prepared.plan, prepared.fps
    forward_extension = extension and plan.packing_order == "forward"
    frames = plan.frames() - (1 if forward_extension else 0)  # its start latent is the source's last
    seconds = frames / fps
    line = (
        f"framepack: {len(plan.sections)} section(s) of {plan.window} latents: {frames} "
        f"{'new ' if extension else ''}frames, {seconds:.2f} s at {fps} fps"
    )
    asked = None if args.resume or args.sections else args.seconds
    if asked and abs(seconds - asked) > 1 / fps:
        line += f" (asked for {asked:g} s; the length is a whole number of {4 * plan.window / fps:.2f} s sections)"
    if prepared.settings.vram_budget is not None:
        from ..pipeline.budget import bundle_need

        line += f"; besides weights the device holds {bundle_need(run.bundle, prepared).describe()}"
    if prepared.settings.vram_budget is not None or prepared.settings.ram_budget is not None:
        from ..pipeline.tiers import tier_plan

        line += f"; {tier_plan(run.bundle, prepared).describe()}"
    return line + "."


def _check_args(args: argparse.Namespace) -> None:
    """The options that contradict each other, before anything else; fills in the defaults."""
    if args.sections is not None and args.seconds is not None:
        raise UserError("give the length as --seconds or as --sections, not both.")
    if args.one_frame is not None:
        video_only = {"--gif": args.gif, "--png": args.png, "--seconds": args.seconds is not None}
        video_only["--sections"] = args.sections is not None
        if any(video_only.values()):
            given = ", ".join(k for k, v in video_only.items() if v)
            raise UserError(f"--one-frame makes one image, not a video; drop {given}.")
        if not args.image and not args.resume:
            print(
                "framepack: warning: --one-frame without --image edits a plain grey frame.", file=sys.stderr
            )
    if args.one_frame is None and args.one_frame_groups != ONE_FRAME_GROUPS:
        raise UserError("--one-frame-groups is for one-frame mode; add --one-frame INDEX or drop it.")
    if args.seconds is None and args.sections is None:
        args.seconds = 5.0


def _settings(args: argparse.Namespace):
    """The `GenerationSettings` of the options; ValueError."""
    from ..lora import parse_lora_arg
    from ..pipeline.settings import GenerationSettings

    cache, cache_threshold, cache_coefficients = cache_option(args)
    return GenerationSettings(
        prompt=timed_prompt_text(args.prompt, args.prompt_at),
        image=args.image,
        negative_prompt=args.negative_prompt,
        seconds=None if args.sections else args.seconds,
        sections=args.sections,
        seed=args.seed,
        steps=args.steps,
        cfg=args.cfg,
        cfg_rescale=args.cfg_rescale,
        distilled_cfg=args.distilled_cfg,
        window=args.window,
        order=args.order,
        sampler=args.sampler,
        shift=args.shift,
        end_image=args.end_image,
        keyframes=keyframe_items(args.keyframe),
        resolution=args.resolution,
        width=args.width,
        height=args.height,
        fps=args.fps,
        crf=args.crf,
        gif=args.gif,
        png=args.png,
        t2v_colour=args.t2v_colour,
        loop=args.loop,
        name=args.name,
        loras=tuple(parse_lora_arg(item) for item in args.lora),
        cache=cache,
        cache_threshold=cache_threshold,
        cache_coefficients=cache_coefficients,
        vram_budget=args.vram_budget,
        fp8_weights=args.fp8_weights,
        ram_budget=args.ram_budget,
        compile=args.compile,
        fp8_compute=args.fp8_compute,
        attention=args.attention,
    )


def _request(args: argparse.Namespace, job):
    """The `Request` of the options (`job`: the `JobTarget` of `--resume`); ValueError."""
    from ..pipeline.run import Request

    if job is not None:
        return Request(resume=job.root)
    groups = tuple(g.strip() for g in args.one_frame_groups.split(",") if g.strip())
    return Request(
        _settings(args),
        video=args.video,
        one_frame=args.one_frame,
        one_frame_groups=groups,
        lora_merge=args.lora_merge,
    )


def _open(args: argparse.Namespace, job):
    """Check the options, then load the bundle and open the run; ValueError. What needs no
    weights (the settings, images, budget and output folder) is checked before the long load."""
    from ..parallel import ranks
    from ..pipeline.bundle import load_bundle
    from ..pipeline.run import check_request, open_run

    request = _request(args, job)
    device, dtypes = resolve_device(args.device), dtypes_of(args.dtype)
    checked = None
    leader = ranks().leader  # the other ranks of a torchrun launch write nothing
    if job is None:
        checked = check_request(args.model, request, device, dtypes)
        if leader:
            check_out_folder(args.out)
    if leader:
        check_events_file(args.events)
    _quiet_loaders()
    settings = request.settings if job is None else job  # a resumed job's own budgets
    bundle = load_bundle(
        args.model,
        device=device,
        vram_budget=settings.vram_budget,
        dtypes=dtypes,
        ram_budget=settings.ram_budget,
        transformer_only=not leader,  # the other ranks only serve the transformer's calls
    )
    stop_if_interrupted()  # a Ctrl-C that the loaders swallowed
    return open_run(bundle, request, checked)


def _resolve_model(args: argparse.Namespace):
    """The job `--resume` names (or None) and the model to load into `args.model`; UserError."""
    from ..pipeline.named import model_or_default
    from ..pipeline.run import job_to_resume

    job = None
    try:
        if args.resume:
            job = job_to_resume(args.resume)  # another process runs it: refused before any loading
            if not args.model and job.model is None:
                raise ValueError(f"the job {job.root} does not record its model directory; pass --model.")
            args.model = args.model or job.model
        args.model = model_or_default(args.model)
    except ValueError as e:
        raise UserError(str(e)) from None
    return job


def cmd_generate(args: argparse.Namespace) -> None:
    """Generate; under `torchrun` with several processes, one video with each model call split
    across them (`framepack.pipeline.ranks`): rank 0 prints and writes, the others nothing."""
    on_ranks(_generate, args)


def _generate(args: argparse.Namespace) -> None:
    from ..io import InputWarning
    from ..parallel import ranks

    job = _resolve_model(args)
    _check_args(args)
    with warnings.catch_warnings(record=True) as caught:  # shown as one line each, below
        warnings.simplefilter("always", InputWarning)
        try:
            run = _open(args, job)
        except ValueError as e:
            raise UserError(str(e)) from None
    if not ranks().leader:  # serves rank 0's model calls; prints and writes nothing
        run.run(args.out)
        return
    for w in caught:
        if issubclass(w.category, InputWarning):
            print(f"framepack: warning: {w.message}", file=sys.stderr)
    if run.one_frame is None:
        print(_plan_line(run, args), file=sys.stderr)
    _show(run, args)


def _show(run, args: argparse.Namespace) -> None:
    """Run it with a progress bar (and `--events` lines); every way it can stop is one sentence."""
    from tqdm import tqdm

    from ..pipeline.events import Finished, FrameDone, SectionDone, StepEvent
    from ..sampling import Cancelled

    stop = threading.Event()
    events_file = open(args.events, "w") if args.events else None
    bar = tqdm(
        total=run.sections * run.prepared.steps,
        unit="step",
        desc=f"section 1/{run.sections}",
        file=sys.stderr,
    )
    video = None
    try:
        for event in run.events(args.out, cancel=stop.is_set):
            stop_if_interrupted()
            if events_file:
                events_file.write(json.dumps(event_json(event)) + "\n")
                events_file.flush()
            if isinstance(event, StepEvent):
                bar.set_description(f"section {event.section + 1}/{event.sections}")
                bar.update(1)
            elif isinstance(event, SectionDone):
                video = event.video
            elif isinstance(event, Finished):
                bar.close()
                if "compile" in event.info:  # what --compile cost, once per process
                    c = event.info["compile"]
                    print(
                        f"framepack: compiled {c['graphs_compiled']} block graph(s) in {c['compile_seconds']:.1f} s.",
                        file=sys.stderr,
                    )
                print(event.video)
                if event.gif:
                    print(event.gif)
            elif isinstance(event, FrameDone):
                bar.close()
                print(event.image)
    except KeyboardInterrupt:
        stop.set()
        bar.close()
        raise Interrupted(f"interrupted{_so_far(video)}.") from None
    except OSError as e:  # a full disk, a folder that went away: finished sections stay resumable
        bar.close()
        what = e.strerror or str(e) or type(e).__name__
        raise UserError(f"cannot write the output ({what}: {e.filename}){_so_far(video)}.") from None
    except Cancelled:
        bar.close()
        raise UserError("cancelled.") from None
    except ValueError as e:
        bar.close()
        raise UserError(str(e)) from None
    except (RuntimeError, MemoryError) as e:
        from ..memory.runtime import is_out_of_memory

        if not is_out_of_memory(e):
            raise
        bar.close()
        hint = "a smaller --vram-budget" if args.vram_budget else "--vram-budget auto (or a number of GiB)"
        raise UserError(
            f"the device ran out of memory; run again with {hint} to stream the weights, or a lower "
            f"resolution or window{_so_far(video)}."
        ) from None
    finally:
        if events_file:
            events_file.close()
