"""The options of `framepack generate` (`add_generate_options`) and the readings of the ones
that are not plain values: timed prompts, keyframes, dtypes and the step cache."""

from __future__ import annotations

import argparse

from .common import add_device_argument, add_model_argument

# The kernels a user picks (framepack.model.attention.BACKENDS, less the tests' sage-emulate;
# spelled out here so that --help does not import torch)
ATTENTION_CHOICES = ("sdpa", "sage", "flash", "xformers")

__all__ = [
    "ONE_FRAME_GROUPS",
    "add_generate_options",
    "cache_option",
    "dtypes_of",
    "keyframe_items",
    "timed_prompt_text",
]

ONE_FRAME_GROUPS = "post,k2,k4"


def _timed(item: str, option: str, example: str) -> tuple[float, str]:
    """(seconds, rest) of a `TIME:REST` option value (`3s:...` too); ValueError naming `option`."""
    when, sep, rest = item.partition(":")
    try:
        t = float(when.strip().rstrip("s"))
    except ValueError:
        t = None
    if not sep or t is None or not rest.strip():
        raise ValueError(f"{option} {item!r} is not {example}.")
    return t, rest


def timed_prompt_text(prompt: str | None, prompt_at: list[str]) -> str:
    """Merge `--prompt` and `--prompt-at TIME:TEXT` options into the timed-prompt syntax."""
    if not prompt_at:
        return prompt or ""
    timed = [_timed(item, "--prompt-at", "TIME:TEXT, e.g. 3:the cat sits down") for item in prompt_at]
    parts = [f"[{t:g}s: {text.strip()}]" for t, text in timed]
    if prompt and min(t for t, _ in timed) > 0:
        parts.insert(0, f"[0s: {prompt.strip()}]")
    return " ".join(parts)


def keyframe_items(items: list[str]) -> tuple[tuple[float, str], ...]:
    """The (seconds, image path) pairs of `--keyframe TIME:IMAGE` options."""
    return tuple(_timed(item, "--keyframe", "TIME:IMAGE, e.g. 2.5:pose.png") for item in items)


def dtypes_of(name: str) -> dict | None:
    """The per-component weight dtypes of `--dtype` (None: `load_bundle`'s defaults)."""
    import torch

    from ..pipeline.bundle import component_dtypes

    if name == "fp32":
        return component_dtypes("cpu", torch.float32)
    return component_dtypes("cuda") if name == "release" else None


def cache_option(args: argparse.Namespace) -> tuple[str | None, float, tuple[float, ...] | None]:
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
        "--attention",
        choices=list(ATTENTION_CHOICES),
        default="sdpa",
        help="attention kernel: sdpa (PyTorch, default), sage (8-bit SageAttention: faster, slightly "
        "less exact), flash or xformers; all but sdpa need an NVIDIA GPU and their package",
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


def add_generate_options(p) -> None:
    """Every option of `framepack generate` on the parser `p`."""
    _input_options(p)
    _sampling_options(p)
    _output_options(p)
    _device_options(p)
