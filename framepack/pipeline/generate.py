"""The generation loop: image + prompt -> a video that grows section by section.

`generate_events(bundle, settings, out_dir)` is a generator of typed events (stages, sampling
steps with a latent preview, finished sections with the video written so far, the end). It imports
no UI code; the CLI, the GUI and scripts all drive it. One CPU generator seeded once serves every
section, so the same seed gives the same video. Every run works in a job directory
(`framepack.pipeline.jobs`): after every section its latents, the generator's state and its newly
settled frames are committed there and the playable mp4 is rebuilt atomically from encoded segments,
so a stopped run keeps every finished section and `generate_events(..., job=DIR)` resumes it.
"""

from __future__ import annotations

import dataclasses
import math
import queue
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..lora import applied_loras, check_lora_spec, load_loras
from ..model.transformer import HistoryGroup
from ..packing.layout import gather_history
from ..sampling import cfg_velocity, get_sampler, noisy_tokens, sigma_schedule, velocity_to_x0
from .decode import IncrementalDecoder, from_uint8_frames, latent_preview
from .loop import record_loop_seam
from .plan import MAX_SECONDS, SectionPlan, plan_sections
from .prompts import parse_timed_prompt
from .speed import accelerate_run, check_speed_settings, offloaded
from .text_to_video import neutral_frame

__all__ = [
    "GenerationSettings",
    "Stage",
    "StepEvent",
    "SectionDone",
    "Finished",
    "Event",
    "prepare",
    "generate_events",
    "generate",
    "settings_from_dict",
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
    loras: tuple[tuple[str, float], ...] = ()  # (file, scale) pairs, applied on the fly
    t2v_colour: str | None = None  # no image: the plain start frame's colour (default mid-grey)
    loop: bool = False  # end on the start frame: a seamless loop (framepack.pipeline.loop)
    cache: str | None = None  # step cache: "teacache" or "fbcache" (framepack.caching)
    cache_threshold: float = 0.15
    cache_coefficients: tuple[float, ...] | None = None  # from `python -m framepack.caching.calibrate`
    vram_budget: str | float | None = None  # GiB of device memory, or "auto"; None: all resident
    fp8_weights: bool = False  # fp8 copies of the streamed blocks: half the transfers, +half their RAM

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Stage:
    name: str  # "encoding", "sampling", "decoding", "writing"


@dataclass
class StepEvent:
    section: int  # 0-based, in generation order
    sections: int
    step: int  # 0-based
    steps: int
    preview: np.ndarray  # (T, h, w, 3) uint8 x0 preview at latent resolution


@dataclass
class SectionDone:
    section: int
    sections: int
    video: Path | None  # the mp4 written so far (None if this section is not visible yet)
    frames: int  # frames in that video
    seconds: float  # wall time of the section


@dataclass
class Finished:
    video: Path
    frames: int
    sidecar: Path
    gif: Path | None = None
    seconds: float = 0.0
    info: dict = field(default_factory=dict)


Event = Stage | StepEvent | SectionDone | Finished


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


def prepare(bundle, settings: GenerationSettings, image: np.ndarray | None = None) -> Prepared:
    """Validate the settings against the bundle and load the images and LoRAs; raises ValueError."""
    return prepare_checked(bundle, check_settings(bundle.manifest, settings, image))


def prepare_checked(bundle, prepared: Prepared) -> Prepared:
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
    without LoRAs; raises ValueError. The command line runs it before loading a bundle."""
    from ..io import check_file_name, prepare_image

    m = manifest
    if settings.name is not None:  # None: a name from the time and seed
        check_file_name(settings.name)
    _check_number("steps", settings.steps, 1, 1000)
    _check_number("cfg", settings.cfg, 0.0, 100.0)
    _check_number("cfg rescale", settings.cfg_rescale, 0.0, 1.0)
    _check_number("distilled guidance", settings.distilled_cfg, 0.0, 100.0)
    _check_number("window", settings.window, 1, 33)
    _check_number("fps", settings.fps, 1, 240)
    _check_number("crf", settings.crf, 0, 51)
    if not isinstance(settings.seed, int) or not 0 <= settings.seed < 2**63:
        raise ValueError(f"seed must be an integer from 0 to 2**63 - 1, got {settings.seed!r}.")
    if settings.sampler not in ("unipc", "euler"):
        raise ValueError(f"unknown sampler {settings.sampler!r}; choose unipc or euler.")
    if not settings.prompt or not settings.prompt.strip():
        raise ValueError("the prompt is empty.")
    check_speed_settings(
        settings.cache, settings.cache_threshold, settings.vram_budget, settings.cache_coefficients
    )
    window = int(settings.window or m.window)
    fps = int(settings.fps or m.fps)
    _check_number("width", settings.width, 16, 4096)
    _check_number("height", settings.height, 16, 4096)
    _check_number("sections", settings.sections, 1, math.ceil(MAX_SECONDS * fps / (4 * window)))
    order = settings.order or m.order
    resolution = settings.resolution or m.resolution

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
        settings=settings,
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


def generate_events(
    bundle,
    prepared: Prepared,
    out_dir: str | Path,
    cancel: Callable[[], bool] | None = None,
    job: str | Path | None = None,
) -> Iterator[Event]:
    """Run one prepared generation, yielding events; the video lands in `out_dir`.

    The run works in the job directory `<out_dir>/<name>.job` (`framepack.pipeline.jobs`), removed
    when the run finishes; an unfinished one with the same settings is resumed, one with other
    settings is refused (ValueError). `job` names a job directory to resume instead (its folder
    and name replace `out_dir` and the settings' name; see `jobs.resume_prepared`).
    Raises `framepack.sampling.Cancelled` when `cancel()` turns true (between sampling steps);
    the video written after the last finished section stays in place. LoRAs are applied on the
    fly for the run and removed after it, leaving the bundle's transformer as it was.
    """
    from .jobs import open_job

    with (  # the memory plan first: a budget too small fails before the job directory exists
        applied_loras(bundle.transformer, prepared.loras),
        offloaded(bundle, prepared.settings.vram_budget, prepared.settings.fp8_weights, prepared) as memory,
        open_job(out_dir, job, prepared.settings, bundle, prepared.plan.packing_order) as job,
    ):
        job.check_images(prepared)
        for event in _run(bundle, prepared, job, cancel, memory):
            if isinstance(event, Finished) and prepared.settings.loop:
                event.info["loop_seam"] = record_loop_seam(event.video, event.sidecar)
            yield event


def encode_inputs(bundle, prepared: Prepared) -> dict[str, torch.Tensor]:
    """Every conditioning tensor of a run, by name (what a job directory stores)."""
    from .conditioning import encode_image, encode_prompt, vae_encode

    s = prepared.settings
    tensors = {}
    for i, text in enumerate(prepared.prompts + ([s.negative_prompt] if prepared.cfg != 1 else [])):
        p = encode_prompt(bundle, text)
        key = f"prompt_{i}" if i < len(prepared.prompts) else "negative"
        tensors.update({f"{key}.text": p.text, f"{key}.mask": p.mask, f"{key}.pooled": p.pooled})
    tensors["siglip"] = encode_image(bundle, prepared.image)
    tensors["start_latent"] = vae_encode(bundle, from_uint8_frames(prepared.image[None]))  # (1, C, 1, h, w)
    refs = [prepared.end_image] if prepared.end_image is not None else []
    for i, im in enumerate(refs + prepared.keyframe_images):
        tensors[f"ref_latent_{i}"] = vae_encode(bundle, from_uint8_frames(im[None]))
    return {k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in tensors.items()}


def prompt_embeds(inputs: dict[str, torch.Tensor], prepared: Prepared, device) -> tuple[list, object]:
    """The stored prompt embeddings of a run on `device`: one per timed prompt, and the negative
    prompt's (None without real CFG)."""
    from .conditioning import PromptEmbeds

    def embeds(key: str) -> PromptEmbeds:
        return PromptEmbeds(inputs[f"{key}.text"], inputs[f"{key}.mask"], inputs[f"{key}.pooled"]).to(device)

    prompts = [embeds(f"prompt_{i}") for i in range(len(prepared.prompts))]
    return prompts, embeds("negative") if prepared.cfg != 1 else None


def _run(bundle, prepared: Prepared, job, cancel, memory) -> Iterator[Event]:
    from .jobs import JobRun, SegmentedVideo

    s, plan = prepared.settings, prepared.plan
    model = bundle.transformer
    device, ws = bundle.device, plan.window

    # 1. Conditioning, encoded once per job (a resumed run reads it back from the job directory).
    #    Under a VRAM budget the transformer is off the device meanwhile (framepack.memory.offload).
    yield Stage("encoding")

    def encode() -> dict[str, torch.Tensor]:
        with torch.no_grad(), memory.transformer_away(model):
            return encode_inputs(bundle, prepared)

    inputs = job.inputs(prepared, encode)
    speed = accelerate_run(model, device, s, memory)  # weight streaming and the step cache, as hooks
    prompts, negative = prompt_embeds(inputs, prepared, device)
    siglip = inputs["siglip"].to(device)
    start_latent = inputs["start_latent"]  # (1, C, 1, h, w)
    ref_latents = [inputs[f"ref_latent_{i}"] for i in range(sum(k.startswith("ref_latent_") for k in inputs))]

    _, c, _, h, w = start_latent.shape
    bank = torch.zeros(1, c, plan.total_latents + len(ref_latents), h, w)  # every latent on one axis
    bank[:, :, 0] = start_latent[:, :, 0]
    for i, lat in enumerate(ref_latents):
        bank[:, :, plan.total_latents + i] = lat[:, :, 0]
    done = np.zeros(plan.total_latents, dtype=bool)
    done[0] = True

    generator = torch.Generator("cpu").manual_seed(s.seed)
    sampler = get_sampler(s.sampler)
    sigmas = sigma_schedule(prepared.steps, seq_len=noisy_tokens(ws, h, w), shift=s.shift)
    guidance = torch.tensor([prepared.distilled_cfg * 1000.0])
    decoder = section_decoder(bundle, device, ws)
    video = SegmentedVideo(job, decoder, plan.packing_order != "forward", prepared.fps, s.crf, s.gif or s.png)
    info = {
        "settings": s.to_dict(),
        "used": used_settings(prepared),
        "bundle": str(getattr(bundle, "root", "")),
        "sections": len(plan.sections),
    }
    run = JobRun(job, video, info, len(plan.sections))
    saved, restored = run.restore([section.number for section in plan.sections], generator)
    for section in plan.sections:
        if section.number in saved:
            bank[:, :, list(section.window)] = saved[section.number]
            done[list(section.window)] = True
    if restored is not None:
        yield restored

    for section in plan.sections:
        if section.number in saved:
            continue
        t0 = time.perf_counter()
        layout = section.layout
        packed = [
            HistoryGroup(g.latents.to(device), g.indices, g.kernel)
            for g in packed_history(plan, section, bank)
        ]
        noisy_indices = torch.tensor(layout.noisy)
        cond, neg = prompts[section.prompt_index], negative
        denoise = make_denoiser(model, device, noisy_indices, packed, cond, neg, guidance, siglip, prepared)

        noise = torch.randn((1, c, ws, h, w), generator=generator)  # one CPU generator, every section
        speed.new_section(len(sigmas) - 1, 1 if neg is None else 2)
        yield Stage("sampling")
        for event in sample_live(sampler, denoise, noise, sigmas, section.number, len(plan.sections), cancel):
            if isinstance(event, StepEvent):
                yield event
            else:
                latents = event
        window = list(section.window)
        bank[:, :, window] = latents.float().cpu()
        done[window] = True

        # 2. Show it: the contiguous block next to the start (forward) or the end (inverted orders).
        if plan.packing_order == "forward":
            lo, hi = 0, int(np.argmin(done)) if not done.all() else plan.total_latents
        else:
            first = plan.total_latents - int(np.argmin(done[::-1])) if not done.all() else 0
            lo, hi = (first if first > 1 else 0), plan.total_latents
        yield Stage("decoding")
        yield run.commit(section.number, latents, bank, lo, hi, bool(done.all()), generator, t0)

    yield Stage("writing")
    yield run.finish(s.png, s.gif, prepared.fps, speed.info())


def packed_history(plan, section, bank: torch.Tensor) -> list[HistoryGroup]:
    """The packed history groups of `section`: the anchors (start latent, end or keyframe latents)
    before the clean k1 group, then the k2/k4/... groups, gathered from `bank` (B, C, T, h, w)."""
    layout, schedule = section.layout, plan.schedule
    history = bank[:, :, list(section.history())] if section.history() else bank[:, :, :0]
    groups = gather_history(history, schedule, plan.packing_order)
    anchors = bank[:, :, list(section.anchors_from)]
    kernels = [g.kernel.name for g in schedule.groups]
    packed = [
        HistoryGroup(torch.cat([anchors, groups[0]], dim=2), torch.tensor(layout.clean_k1()), kernels[0])
    ]
    packed += [
        HistoryGroup(groups[i], torch.tensor(layout.groups[i]), kernels[i]) for i in range(1, len(groups))
    ]
    return packed


def section_decoder(bundle, device, window: int) -> IncrementalDecoder:
    """The incremental decoder of a run: the bundle's VAE on `device`, frames back on the host,
    sections blended in the VAE's dtype (as the release blends)."""
    from .conditioning import vae_decode

    return IncrementalDecoder(
        lambda lat: vae_decode(bundle, lat.to(device)).cpu(), window, bundle.dtypes()["vae"]
    )


def make_denoiser(model, device, noisy_indices, packed, cond, neg, guidance, siglip, prepared: Prepared):
    """The x0 prediction `denoise(x, sigma)` the samplers call for one section's packed inputs.

    One model call for the velocity, a second for the negative prompt when real CFG is on. As in
    the release, the latent, the timestep and the distilled guidance are cast to the model's dtype
    before the call (in bf16, sigma 0.9673 -> t 968 and guidance 10000 -> 9984), and x0 is computed
    in fp32 from the latent as cast; in fp32 nothing changes.
    """
    dtype = model.dtype
    guidance = None if guidance is None else guidance.to(device, dtype)

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        t = (sigma * 1000.0).to(device, dtype)
        cast = x.to(device, dtype)  # (B, C, T, h, w)

        def velocity(p):
            return model.forward_packed(
                cast, noisy_indices, packed, t, p.text, p.mask, p.pooled, guidance, siglip
            ).float()

        v = velocity(cond)
        if neg is not None:
            v = cfg_velocity(v, velocity(neg), prepared.cfg, prepared.settings.cfg_rescale)
        return velocity_to_x0(cast.float().to(x.device), v.to(x.device), sigma.to(x.device))

    return denoise


def sample_live(sampler, denoise, noise, sigmas, number: int, sections: int, cancel) -> Iterator:
    """Run the sampler in a worker thread, yielding a `StepEvent` as each step ends, then the latents.

    The sampler calls back synchronously; a queue hands its steps to this generator so a caller
    sees (and can show) every step while the next one runs. When this generator ends early (Ctrl-C
    in the caller's thread, or the caller closing it), the worker stops at its next step and is
    joined before the exception goes on, so no sampling thread outlives the run (an interpreter
    shutting down under one aborts the process).
    """
    done = object()
    q: queue.Queue = queue.Queue()
    left = threading.Event()  # the caller has gone: stop at the next step

    def on_step(i, n, x, x0):
        q.put(StepEvent(number, sections, i, n, latent_preview(x0)))

    def stop() -> bool:
        return left.is_set() or (cancel is not None and cancel())

    def work():
        try:
            with torch.no_grad():
                q.put((done, sampler(denoise, noise, sigmas, callback=on_step, cancel=stop)))
        except BaseException as e:  # handed to the caller's thread
            q.put((done, e))

    thread = threading.Thread(target=work, name="framepack-sampler", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if isinstance(item, tuple) and item[0] is done:
                thread.join()
                if isinstance(item[1], BaseException):
                    raise item[1]
                yield item[1]
                return
            yield item
    finally:
        if thread.is_alive():
            left.set()
            thread.join()


def generate(
    bundle,
    settings: GenerationSettings,
    out_dir: str | Path = "outputs",
    image: np.ndarray | None = None,
    on_event: Callable[[Event], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> Finished:
    """Generate one video (Python API); returns the `Finished` event."""
    prepared = prepare(bundle, settings, image)
    last = None
    for event in generate_events(bundle, prepared, out_dir, cancel):
        if on_event is not None:
            on_event(event)
        last = event
    assert isinstance(last, Finished)
    return last


def settings_from_dict(data: dict) -> GenerationSettings:
    """Settings back from a sidecar (to reproduce or vary a video)."""
    fields = {f.name for f in dataclasses.fields(GenerationSettings)}
    kwargs = {k: v for k, v in data.items() if k in fields}
    kwargs["keyframes"] = tuple(tuple(k) for k in kwargs.get("keyframes", ()))
    kwargs["loras"] = tuple(tuple(k) for k in kwargs.get("loras", ()))
    if kwargs.get("cache_coefficients") is not None:
        kwargs["cache_coefficients"] = tuple(kwargs["cache_coefficients"])
    return GenerationSettings(**kwargs)
