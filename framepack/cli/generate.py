"""`framepack generate`: image + prompt -> mp4, with a progress bar and optional JSON events."""

from __future__ import annotations

import argparse
import json
import sys
import threading
import warnings

from ..devices import resolve_device

__all__ = ["add_parser", "timed_prompt_text"]


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


def _dtypes(name: str) -> dict | None:
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
    p.add_argument(
        "--model",
        help="bundle directory or named bundle (hunyuan-i2v, hunyuan-f1); default: the shipped demo model",
    )
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
        default="post,k2,k4",
        metavar="GROUPS",
        help="one-frame mode: the history groups fed to the model (comma list from post,k2,k4)",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: cuda when available)")
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
        "--fp8-weights",
        action="store_true",
        help="fp8 copies of streamed blocks: half the transfers, but more host RAM (the originals stay)",
    )
    p.add_argument(
        "--teacache", type=float, metavar="THRESH", help="TeaCache threshold (0.15: ~2x, 0: exact)"
    )
    p.add_argument("--cache", metavar="NAME:THRESH", help="step cache teacache|fbcache, e.g. fbcache:0.1")
    p.add_argument(
        "--cache-calibration", metavar="FILE", help="JSON from python -m framepack.training.calibrate"
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
    p.set_defaults(func=cmd_generate)


def _event_json(event) -> dict:
    from ..pipeline.generate import Finished, SectionDone, Stage, StepEvent

    if isinstance(event, StepEvent):
        return {
            "event": "step",
            "section": event.section,
            "sections": event.sections,
            "step": event.step,
            "steps": event.steps,
        }
    if isinstance(event, SectionDone):
        return {
            "event": "section",
            "section": event.section,
            "sections": event.sections,
            "video": str(event.video) if event.video else None,
            "frames": event.frames,
            "seconds": round(event.seconds, 3),
        }
    if isinstance(event, Finished):
        return {
            "event": "finished",
            "video": str(event.video),
            "frames": event.frames,
            "sidecar": str(event.sidecar),
        }
    if isinstance(event, Stage):
        return {"event": "stage", "name": event.name}
    return {"event": type(event).__name__}


def _one_frame(bundle, prepared, args: argparse.Namespace) -> None:
    """`--one-frame INDEX`: one PNG (and its JSON sidecar) instead of a video."""
    from ..pipeline.one_frame import generate_frame
    from ..sampling import Cancelled
    from .main import UserError

    groups = [g.strip() for g in args.one_frame_groups.split(",") if g.strip()]
    try:
        done = generate_frame(bundle, prepared, args.out, index=args.one_frame, groups=groups)
    except ValueError as e:
        raise UserError(str(e)) from None
    except Cancelled:
        raise UserError("cancelled.") from None
    print(done.image)


def _so_far(video) -> str:
    """Where a stopped run's video and job directory are, for the one-line message."""
    if not video or not video.with_suffix(".job").is_dir():
        return f"; the video so far is {video}" if video else ""
    job = video.with_suffix(".job")
    return f"; the video so far is {video}; continue with framepack generate --resume {job}"


def _check_writable(out: str) -> None:
    """Refuse an output folder this process cannot create files in, before any work is done."""
    import os
    import tempfile
    from pathlib import Path

    folder = Path(out)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".framepack-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        what = e.strerror or type(e).__name__
        raise ValueError(f"cannot write to the output folder {folder} ({what}).") from None


def _quiet_loaders() -> None:
    """Our progress bar is the one to show: silence diffusers' and transformers' loading bars."""
    import diffusers.utils.logging
    import transformers.utils.logging

    for library in (transformers.utils.logging, diffusers.utils.logging):
        library.disable_progress_bar()
        library.set_verbosity_error()


def _plan_line(prepared, args: argparse.Namespace, extension: bool, bundle=None) -> str:
    """What the run will make, in one line: sections, frames and seconds (and why not the seconds
    asked for: a video is a whole number of sections, rounded as the release rounds); under a VRAM
    budget, what the device holds besides weights (`framepack.pipeline.budget`)."""
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
    if bundle is not None and prepared.settings.vram_budget is not None:
        from ..pipeline.budget import bundle_need

        line += f"; besides weights the device holds {bundle_need(bundle, prepared).describe()}"
    return line + "."


def cmd_generate(args: argparse.Namespace) -> None:
    from .main import Interrupted, UserError

    job_dir = None
    if args.resume:
        from ..pipeline.jobs import Job, JobError, check_free, find_job

        try:
            job_dir = find_job(args.resume)
            check_free(job_dir)  # another process runs it: refused before any loading
            args.model = args.model or Job(job_dir).read()["bundle"]
        except JobError as e:
            raise UserError(str(e)) from None
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
    if args.seconds is None and args.sections is None:
        args.seconds = 5.0
    if not args.model:
        from ..pipeline.api import default_model

        try:
            args.model = str(default_model())
        except ValueError as e:
            raise UserError(str(e)) from None

    from tqdm import tqdm

    from ..io import InputWarning
    from ..lora import parse_lora_arg
    from ..pipeline.bundle import load_bundle
    from ..pipeline.generate import (
        Finished,
        GenerationSettings,
        SectionDone,
        StepEvent,
        check_settings,
        generate_events,
        prepare_checked,
    )
    from ..sampling import Cancelled

    with warnings.catch_warnings(record=True) as caught:  # shown as one line each, below
        warnings.simplefilter("always", InputWarning)
        try:
            cache, cache_threshold, cache_coefficients = _cache_option(args)
            settings = GenerationSettings(
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
            )
            checked = None
            device, dtypes = resolve_device(args.device), _dtypes(args.dtype)
            if job_dir is None:  # the settings, images and output folder before a long load
                from ..pipeline.bundle import read_manifest

                manifest = read_manifest(args.model)
                if not args.video:
                    from ..pipeline.budget import check_budget

                    checked = check_settings(manifest, settings)
                    check_budget(args.model, checked, device, dtypes)
                _check_writable(args.out)
            _quiet_loaders()
            budget = args.vram_budget  # with a budget the weights wait on the host (load_bundle)
            if job_dir is not None:
                from ..pipeline.jobs import Job

                budget = Job(job_dir).read()["settings"].get("vram_budget")  # the job's own
            bundle = load_bundle(args.model, device=device, vram_budget=budget, dtypes=dtypes)
            source = None
            if job_dir is not None:  # a generation or an extension, as the job holds
                from ..pipeline.jobs import resume_job

                prepared, source = resume_job(bundle, job_dir)
            elif args.video:
                from ..pipeline.extend import prepare_extension

                if args.one_frame is not None:
                    raise ValueError("--one-frame makes one image from a start image; drop --video.")
                prepared, source = prepare_extension(bundle, settings, args.video)
            else:
                prepared = prepare_checked(bundle, checked)
        except ValueError as e:
            raise UserError(str(e)) from None
    for w in caught:
        if issubclass(w.category, InputWarning):
            print(f"framepack: warning: {w.message}", file=sys.stderr)
    if args.lora_merge and prepared.loras:  # folded into this process's weights: no per-step cost
        from ..lora import merge_loras

        merge_loras(bundle.transformer, prepared.loras)
        prepared.loras = []
    if args.one_frame is not None:
        _one_frame(bundle, prepared, args)
        return

    print(_plan_line(prepared, args, extension=source is not None, bundle=bundle), file=sys.stderr)
    stop = threading.Event()
    events_file = open(args.events, "w") if args.events else None
    total = len(prepared.plan.sections) * prepared.steps
    bar = tqdm(total=total, unit="step", desc=f"section 1/{len(prepared.plan.sections)}", file=sys.stderr)
    video = None
    try:
        if source is not None:
            from ..pipeline.extend import extend_events

            events = extend_events(bundle, prepared, source, args.out, cancel=stop.is_set, job=job_dir)
        else:
            events = generate_events(bundle, prepared, args.out, cancel=stop.is_set, job=job_dir)
        for event in events:
            if events_file:
                events_file.write(json.dumps(_event_json(event)) + "\n")
                events_file.flush()
            if isinstance(event, StepEvent):
                bar.set_description(f"section {event.section + 1}/{event.sections}")
                bar.update(1)
            elif isinstance(event, SectionDone):
                video = event.video
            elif isinstance(event, Finished):
                bar.close()
                print(event.video)
                if event.gif:
                    print(event.gif)
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
