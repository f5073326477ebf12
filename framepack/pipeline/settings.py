"""What one run is asked to do, checked: the settings, their validation and the `Prepared` inputs.

`check_settings(manifest, settings)` needs no weights (the command line runs it before loading a
bundle); `prepare(bundle, settings)` adds what needs them (the tokenizer's prompt-length warning,
the LoRAs read for the transformer). Nothing is written to disk here.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from dataclasses import dataclass, field

import numpy as np

from ..lora import check_lora_spec, load_loras, lora_specs
from ..model.attention import check_backend
from .fp8_compute import check_fp8_compute
from .plan import MAX_SECONDS, SectionPlan, plan_sections
from .prompts import parse_timed_prompt
from .speed import check_speed_settings
from .text_to_video import neutral_frame

__all__ = [
    "GenerationSettings",
    "Prepared",
    "check_settings",
    "complete_prepared",
    "prepare",
    "settings_from_dict",
    "used_settings",
    "with_absolute_paths",
]


@dataclass(frozen=True)
class GenerationSettings:
    """Every setting of one generation; `None` takes the bundle manifest's default."""

    prompt: str
    image: str | None = None  # start image path (or pass the array to `prepare`)
    negative_prompt: str = ""
    seconds: float | None = 5.0
    sections: int | None = None
    seed: int = 31337
    steps: int | None = None
    cfg: float | None = None  # real CFG scale; None: the manifest's (1 = off, no negative pass)
    cfg_rescale: float = 0.0
    distilled_cfg: float | None = None
    window: int | None = None
    order: str | None = None
    sampler: str = "unipc"
    shift: float | None = None
    end_image: str | None = None
    keyframes: tuple[tuple[float, str], ...] = ()
    resolution: int | None = None
    width: int | None = None
    height: int | None = None
    fps: int | None = None
    crf: int = 16
    gif: bool = False
    png: bool = False  # also write every frame as a PNG into `<name>_frames/`
    name: str | None = None  # output file stem
    loras: tuple[tuple[str, float], ...] = ()  # (file, scale) pairs or "FILE[:SCALE]" (`lora_specs`)
    t2v_colour: str | None = None  # no image: the plain start frame's colour (default mid-grey)
    loop: bool = False  # end on the start frame: a seamless loop (framepack.pipeline.loop)
    cache: str | None = None  # step cache: "teacache", "fbcache" or "magcache" (framepack.caching)
    cache_threshold: float = 0.15
    # From `python -m framepack.training.calibrate` (`load_coefficients`): a rescale polynomial, or
    # MagCache's per-step magnitude ratios.
    cache_coefficients: tuple[float, ...] | None = None
    vram_budget: str | float | None = None  # GiB of device memory, or "auto"; None: all resident
    fp8_weights: bool = False  # fp8 copies of the streamed blocks: half the transfers, +half their RAM
    ram_budget: str | float | None = None  # GiB of host memory for weights, or "auto"; None: no limit
    compile: bool = False  # torch.compile the transformer's blocks (`framepack.pipeline.compiled`)
    # The blocks' linear layers as e4m3 products (`framepack.pipeline.fp8_compute`; a GPU of compute
    # capability 8.9+); "emulate": the same arithmetic in fp32 on any device (tests, benches).
    fp8_compute: bool | str = False
    # The blocks' attention kernel (`framepack.model.attention`): sdpa, flash, sage or xformers (an
    # NVIDIA GPU and the package), or sage-emulate (sage's 8-bit arithmetic on any device).
    attention: str = "sdpa"

    @property
    def fp8_copies(self) -> bool:
        """Whether streamed blocks travel as fp8 host copies (`--fp8-weights`, or `--fp8-compute`)."""
        return self.fp8_weights or bool(self.fp8_compute)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Prepared:
    """Validated inputs of one generation (no file is written before this succeeds)."""

    settings: GenerationSettings
    plan: SectionPlan
    image: np.ndarray  # (H, W, 3) uint8 at the bucket size
    end_image: np.ndarray | None
    keyframe_images: list[np.ndarray]
    prompts: list[str]
    steps: int
    distilled_cfg: float
    fps: int
    cfg: float = 1.0  # real CFG scale: the setting's, else the manifest's (1 = no negative pass)
    loras: list = field(default_factory=list)  # (framepack.lora.Lora, scale) pairs


def _check_number(name: str, value, low: float, high: float) -> None:
    if value is None:
        return
    if not isinstance(value, (int, float)) or not np.isfinite(value) or not low <= value <= high:
        raise ValueError(f"{name} must be a number from {low} to {high}, got {value!r}.")


def _check_values(settings: GenerationSettings) -> None:
    """Each setting on its own, in its range (ValueError): everything that sampling, the sigma
    schedule or the job file would otherwise refuse only once a run has begun."""
    from ..io import buckets

    _check_number("steps", settings.steps, 1, 1000)
    _check_number("cfg", settings.cfg, 0.0, 100.0)
    _check_number("cfg rescale", settings.cfg_rescale, 0.0, 1.0)
    _check_number("distilled guidance", settings.distilled_cfg, 0.0, 100.0)
    _check_number("shift", settings.shift, 0.01, 1000.0)  # beyond, the sigmas stop decreasing
    _check_number("window", settings.window, 1, 33)
    _check_number("fps", settings.fps, 1, 240)
    _check_number("crf", settings.crf, 0, 51)
    _check_number("width", settings.width, 16, 4096)
    _check_number("height", settings.height, 16, 4096)
    if settings.resolution is not None:  # 0 is not "the default"
        buckets(settings.resolution)
    if not isinstance(settings.seed, int) or not 0 <= settings.seed < 2**63:
        raise ValueError(f"seed must be an integer from 0 to 2**63 - 1, got {settings.seed!r}.")
    check_fp8_compute(settings.fp8_compute)  # the value; the device is checked before a run loads
    check_backend(settings.attention)  # a known name (the device, too, is checked before loading)
    if settings.sampler not in ("unipc", "euler"):
        raise ValueError(f"unknown sampler {settings.sampler!r}; choose unipc or euler.")
    if not settings.prompt or not settings.prompt.strip():
        raise ValueError("the prompt is empty.")

    check_speed_settings(
        settings.cache,
        settings.cache_threshold,
        settings.vram_budget,
        settings.cache_coefficients,
        settings.ram_budget,
    )


def prepare(bundle, settings: GenerationSettings, image: np.ndarray | None = None) -> Prepared:
    """Validate the settings against the bundle and load the images and LoRAs; raises ValueError."""
    return complete_prepared(bundle, check_settings(bundle.manifest, settings, image))


def complete_prepared(bundle, prepared: Prepared) -> Prepared:
    """`check_settings`'s result completed with what needs the weights: the warning for a prompt
    the tokenizer cuts, and the LoRAs read for the transformer; raises ValueError."""
    from ..io import InputWarning
    from .conditioning import prompt_is_cut

    for text in prepared.prompts:
        if prompt_is_cut(bundle, text):
            short = text if len(text) <= 40 else text[:37] + "..."
            limit = bundle.manifest.max_prompt_tokens
            warnings.warn(
                InputWarning(f"the prompt {short!r} is over {limit} tokens; the rest is cut off."),
                stacklevel=2,
            )
    prepared.loras = load_loras(bundle.transformer, prepared.settings.loras)
    return prepared


def check_settings(manifest, settings: GenerationSettings, image: np.ndarray | None = None) -> Prepared:
    """Everything of `prepare` that needs no weights: the settings against the bundle's `manifest`,
    the images, the section plan and the timed prompts, the LoRA files' existence. A `Prepared`
    without LoRAs, whose settings name their files by absolute paths (`with_absolute_paths`: the
    job and the sidecar record those); raises ValueError. The command line runs it before loading
    a bundle."""
    from ..io import check_file_name, prepare_image

    m = manifest
    settings = dataclasses.replace(settings, loras=lora_specs(settings.loras))
    if settings.name is not None:  # None: a name from the time and seed
        check_file_name(settings.name)
    _check_values(settings)
    window = int(settings.window or m.window)
    fps = int(settings.fps or m.fps)
    _check_number("sections", settings.sections, 1, math.ceil(MAX_SECONDS * fps / (4 * window)))
    order = settings.order or m.order
    resolution = m.resolution if settings.resolution is None else settings.resolution

    source = image if image is not None else settings.image
    if source is None:  # text-to-video: a plain start frame (framepack.pipeline.text_to_video)
        source = neutral_frame(settings.t2v_colour, settings.height, settings.width)
    elif settings.t2v_colour is not None:
        raise ValueError("a text-to-video colour is only used without a start image; drop one of them.")
    size = dict(resolution=resolution, width=settings.width, height=settings.height)
    start = prepare_image(source, **size)
    exact = dict(resolution=resolution, width=start.shape[1], height=start.shape[0])
    if settings.loop and settings.end_image:
        raise ValueError("a loop ends on its start image; drop the end image.")
    end = prepare_image(settings.end_image, **exact) if settings.end_image else None
    if settings.loop:  # the start frame is also the end frame
        end = start
    keyframe_images = [prepare_image(path, **exact) for _, path in settings.keyframes]

    duration = settings.seconds if settings.sections is None else None
    sections = settings.sections
    plan_kwargs = dict(window=window, order=order, schedule=m.packing, end_image=end is not None, fps=fps)
    draft = plan_sections(sections, seconds=duration, **plan_kwargs)  # validates length first
    timed = parse_timed_prompt(settings.prompt, draft.duration)
    for path, scale in settings.loras:
        check_lora_spec(path, scale)
    plan = plan_sections(
        sections,
        seconds=duration,
        keyframes=[t for t, _ in settings.keyframes],
        prompts=timed,
        **plan_kwargs,
    )
    return Prepared(
        settings=with_absolute_paths(settings),
        plan=plan,
        image=start,
        end_image=end,
        keyframe_images=keyframe_images,
        prompts=[p.text for p in timed],
        steps=int(settings.steps or m.steps),
        distilled_cfg=float(
            m.distilled_guidance if settings.distilled_cfg is None else settings.distilled_cfg
        ),
        fps=fps,
        cfg=float(m.cfg if settings.cfg is None else settings.cfg),
    )


def with_absolute_paths(settings: GenerationSettings) -> GenerationSettings:
    """`settings` with its files (images, keyframes, LoRAs) as absolute paths, the same files seen
    from anywhere: what a run records in its job and sidecar, which other folders read back."""

    def absolute(path):
        return os.path.abspath(path) if path else path

    return dataclasses.replace(
        settings,
        image=absolute(settings.image),
        end_image=absolute(settings.end_image),
        keyframes=tuple((t, absolute(path)) for t, path in settings.keyframes),
        loras=tuple((absolute(path), scale) for path, scale in settings.loras),
    )


def used_settings(prepared: Prepared) -> dict:
    """The values a run used where its settings left the model's defaults (None): for the sidecar."""
    plan = prepared.plan
    height, width = prepared.image.shape[:2]
    return {
        "steps": prepared.steps,
        "cfg": prepared.cfg,
        "distilled_cfg": prepared.distilled_cfg,
        "window": plan.window,
        "order": plan.order,
        "fps": prepared.fps,
        "width": int(width),
        "height": int(height),
    }


def settings_from_dict(data: dict) -> GenerationSettings:
    """Settings back from a sidecar (to reproduce or vary a video)."""
    fields = {f.name for f in dataclasses.fields(GenerationSettings)}
    kwargs = {k: v for k, v in data.items() if k in fields}
    kwargs["keyframes"] = tuple(tuple(k) for k in kwargs.get("keyframes", ()))
    kwargs["loras"] = tuple(tuple(k) for k in kwargs.get("loras", ()))
    if kwargs.get("cache_coefficients") is not None:
        kwargs["cache_coefficients"] = tuple(kwargs["cache_coefficients"])
    return GenerationSettings(**kwargs)
