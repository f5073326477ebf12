"""`framepack generate`: image + prompt -> mp4, with a progress bar and optional JSON events."""

from __future__ import annotations

import argparse
import json
import sys
import threading
import warnings

from ..devices import resolve_device
from .common import Interrupted, UserError, add_device_argument, add_model_argument
from .interrupts import stop_if_interrupted
from .outputs import check_events_file, check_out_folder, event_json
from .ranks import on_ranks

__all__ = ["add_parser", "dtypes_of", "timed_prompt_text"]

ONE_FRAME_GROUPS = "post,k2,k4"


def timed_prompt_text(prompt: str | None, prompt_at: list[str]) -> str:
    """Merge `--prompt` and `--prompt-at TIME:TEXT` options into the timed-prompt syntax."""
    if not prompt_at:
        return prompt or ""
    parts = []
    times = []
    for item in prompt_at:
        when, sep, text = item.partition(":")
        try:
            t = float(when.strip().rstrip("s"))
        except ValueError:
            t = None
        if not sep or t is None or not text.strip():
            raise ValueError(f"--prompt-at {item!r} is not TIME:TEXT, e.g. 3:the cat sits down.")
        times.append(t)
        parts.append(f"[{t:g}s: {text.strip()}]")
    if prompt and min(times) > 0:
        parts.insert(0, f"[0s: {prompt.strip()}]")
    return " ".join(parts)


def _keyframes(items: list[str]) -> tuple[tuple[float, str], ...]:
    out = []
    for item in items:
        when, sep, path = item.partition(":")
        try:
            t = float(when.strip().rstrip("s"))
        except ValueError:
            t = None
        if not sep or t is None or not path:
            raise ValueError(f"--keyframe {item!r} is not TIME:IMAGE, e.g. 2.5:pose.png.")
        out.append((t, path))
    return tuple(out)


def dtypes_of(name: str) -> dict | None:
    """The per-component weight dtypes of `--dtype` (None: `load_bundle`'s defaults)."""
    import torch

    from ..pipeline.bundle import component_dtypes

    if name == "fp32":
        return component_dtypes("cpu", torch.float32)
    return component_dtypes("cuda") if name == "release" else None


def _cache_option(args: argparse.Namespace) -> tuple[str | None, float, tuple[float, ...] | None]:
    """(cache name, threshold, coefficients) from --teacache / --cache / --cache-calibration."""
    if args.teacache is not None and args.cache:
        raise ValueError("give either --teacache or --cache, not both.")
    name, threshold = None, 0.15
    if args.teacache is not None:
        name, threshold = "teacache", args.teacache
    elif args.cache:
        name, sep, value = args.cache.partition(":")
        try:
            threshold = float(value) if sep else threshold
        except ValueError:
            raise ValueError(f"--cache {args.cache!r} is not NAME:THRESHOLD, e.g. fbcache:0.1.") from None
    coefficients = None
    if args.cache_calibration:
        from ..training.calibrate import load_coefficients

        coefficients = load_coefficients(args.cache_calibration, name or "teacache")
    return name, threshold, coefficients


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate a video from a start image and a prompt")
    _input_options(p)
    _sampling_options(p)
    _output_options(p)
    _device_options(p)
    p.set_defaults(func=cmd_generate)


def _input_options(p) -> None:
    """What to start from and what to make: images, video, prompts, length, model."""
    p.add_argument("--image", help="start image (leave out for text-to-video from a plain frame)")
    p.add_argument(
        "--video",
        help="a video to extend: continued after its end (forward order), or led into from --image (inverted)",
    )
    p.add_argument(
        "--loop",
        action="store_true",
        help="end on the start frame: a seamless loop (its seam goes in the sidecar)",
    )
    p.add_argument(
        "--t2v-colour",
        metavar="COLOUR",
        help="text-to-video: the plain start frame's colour (default #808080)",
    )
    p.add_argument("--prompt", help="prompt; timed prompts like '[0s-3s: ...] [3s: ...]' work too")
    p.add_argument(
        "--prompt-at", action="append", default=[], metavar="TIME:TEXT", help="a prompt from TIME seconds on"
    )
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--seconds", type=float, help="video length (default 5; a whole number of sections)")
    p.add_argument("--sections", type=int, help="number of sections instead of --seconds")
    add_model_argument(p)


def _sampling_options(p) -> None:
    """How to sample: seed, steps, guidance, window, order, sampler, end image, keyframes."""
    p.add_argument("--seed", type=int, default=31337)
    p.add_argument("--steps", type=int)
    p.add_argument(
        "--cfg",
        type=float,
        help="real CFG scale (1 = off, no negative pass; default: the model's, 1 for the release)",
    )
    p.add_argument("--cfg-rescale", type=float, default=0.0)
    p.add_argument("--distilled-cfg", type=float, help="distilled guidance scale (default 10)")
    p.add_argument("--window", type=int, help="latent frames per section (default 9)")
    p.add_argument("--order", choices=["inverted", "forward", "anti-drifting"])
    p.add_argument("--sampler", choices=["unipc", "euler"], default="unipc")
    p.add_argument("--shift", type=float, help="fixed sigma shift instead of the dynamic one")
    p.add_argument("--end-image")
    p.add_argument("--keyframe", action="append", default=[], metavar="TIME:IMAGE")


def _output_options(p) -> None:
    """The frame size and the files written; LoRAs; one-frame mode."""
    p.add_argument("--resolution", type=int, help="bucket base, e.g. 640 or 320")
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--fps", type=int)
    p.add_argument("--crf", type=int, default=16)
    p.add_argument("--gif", action="store_true", help="also write a GIF")
    p.add_argument("--png", action="store_true", help="also write every frame as a PNG")
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="FILE[:SCALE]",
        help="apply a LoRA (PEFT/diffusers, kohya/musubi-tuner or our training's folder); repeatable",
    )
    p.add_argument(
        "--lora-merge",
        action="store_true",
        help="merge the LoRAs into the weights for this run (no per-step cost) instead of applying them on the fly",
    )
    p.add_argument(
        "--one-frame",
        type=int,
        metavar="INDEX",
        help="one-frame mode: a single PNG at this latent time index (e.g. 9) instead of a video",
    )
    p.add_argument(
        "--one-frame-groups",
        default=ONE_FRAME_GROUPS,
        metavar="GROUPS",
        help="one-frame mode: the history groups fed to the model (comma list from post,k2,k4)",
    )


def _device_options(p) -> None:
    """Where and how fast: device, dtypes, memory, step caches; the output folder, events, resume."""
    add_device_argument(p)
    p.add_argument(
        "--dtype",
        choices=["auto", "fp32", "release"],
        default="auto",
        help="weight dtypes: auto (the release's on a GPU: bf16 transformer, fp16 encoders and VAE; fp32 "
        "on a CPU), fp32 everywhere, or release (the GPU's dtypes on any device)",
    )
    p.add_argument(
        "--vram-budget",
        metavar="GB|auto",
        help="device memory for all weights (transformer, encoders, VAE): they load onto the host and "
        "only what fits visits the device; transformer blocks beyond it stream",
    )
    p.add_argument(
        "--ram-budget",
        metavar="GB|auto",
        help="host memory for weights: a bundle larger than this is read from its files as it runs "
        "(on a CPU it bounds all weights; auto: the memory available now, less room for the system)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the transformer's blocks: faster steps after a one-off compile per process",
    )
    p.add_argument(
        "--fp8-compute",
        action="store_true",
        help="the transformer blocks' matrix products in fp8 (e4m3, torch._scaled_mm): faster, "
        "slightly less exact; needs an NVIDIA GPU of compute capability 8.9+ (RTX 40, L40, H100)",
    )
    p.add_argument(
        "--fp8-weights",
        action="store_true",
        help="fp8 copies of streamed blocks: half the transfers, but more host RAM (the originals stay)",
    )
    p.add_argument(
        "--teacache", type=float, metavar="THRESH", help="TeaCache threshold (0.15: ~2x, 0: exact)"
    )
    p.add_argument(
        "--cache", metavar="NAME:THRESH", help="step cache teacache|fbcache|magcache, e.g. magcache:0.1"
    )
    p.add_argument(
        "--cache-calibration",
        metavar="FILE",
        help="JSON from python -m framepack.training.calibrate (the fitted coefficients or ratios of the cache)",
    )
    p.add_argument("--out", default="outputs", help="output folder")
    p.add_argument("--name", help="output file name, without extension or folder (a plain file name)")
    p.add_argument("--events", help="write one JSON line per event to this file")
    p.add_argument(
        "--resume",
        metavar="JOBDIR",
        help="continue a stopped run from its last finished section (OUT/NAME.job, or its mp4); "
        "the job's own settings are used",
    )


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

    cache, cache_threshold, cache_coefficients = _cache_option(args)
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
        keyframes=_keyframes(args.keyframe),
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
