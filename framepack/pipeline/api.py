"""`framepack.generate(...)`: the one-call Python API: a cache of loaded bundles around `open_run`."""

from __future__ import annotations

import gc
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from ..devices import resolve_device
from ..lora import lora_specs
from ..parallel import local_rank, rank_device, ranks
from .events import Event, Finished, FrameDone
from .named import model_or_default
from .run import Request, job_to_resume, open_run
from .settings import GenerationSettings
from .speed import check_device_settings

__all__ = ["LOADED_BUNDLES", "generate", "generate_iter", "loaded_bundle"]

LOADED_BUNDLES: OrderedDict[tuple[str, str, str], object] = OrderedDict()  # (model, device, home) -> Bundle
_KEEP = 2  # bundles kept loaded


def loaded_bundle(model: str, device: str, vram_budget=None, ram_budget=None, transformer_only=False):
    """The bundle `model` for runs on `device`, loaded once per place its weights wait (`home`):
    on the device, on the host for a run with a VRAM budget (`bundle.weights_home`), or in their
    files under a RAM budget; `transformer_only` without the encoders and the VAE (a rank other
    than 0 of several, `framepack.pipeline.ranks`). Loading it one way drops a cached copy loaded
    another way, so one model never holds the device (or the host) twice."""
    from .bundle import load_bundle, weights_home

    home = str(weights_home(device, vram_budget)) + ("" if ram_budget is None else f", RAM {ram_budget}")
    home += ", transformer only" if transformer_only else ""
    key = (model, device, home)
    if key in LOADED_BUNDLES:
        LOADED_BUNDLES.move_to_end(key)
        return LOADED_BUNDLES[key]
    for other in [k for k in LOADED_BUNDLES if k[:2] == key[:2]]:
        del LOADED_BUNDLES[other]
    while len(LOADED_BUNDLES) >= _KEEP:
        LOADED_BUNDLES.popitem(last=False)
    gc.collect()  # the dropped weights go before the new ones arrive
    LOADED_BUNDLES[key] = load_bundle(
        model,
        device=device,
        vram_budget=vram_budget,
        ram_budget=ram_budget,
        transformer_only=transformer_only,
    )
    return LOADED_BUNDLES[key]


def _request(settings: dict, image) -> Request:
    """The request of an API call: the settings, plus the kind of run (`video`, `one_frame`)."""
    kinds = {k: settings.pop(k) for k in ("video", "one_frame", "one_frame_groups") if k in settings}
    if isinstance(image, (str, Path)):  # a file: recorded in the sidecar as the CLI's --image is
        settings["image"], image = str(image), None
    if "loras" in settings:  # "FILE", "FILE:SCALE" or (FILE, SCALE), as in jobs files and --lora
        settings["loras"] = lora_specs(settings["loras"])
    try:
        return Request(GenerationSettings(**settings), image, **kinds)
    except TypeError as e:
        raise ValueError(f"unknown generation setting: {e}.") from None


def generate_iter(
    model: str | Path | None = None,
    out_dir: str | Path | None = None,
    image: np.ndarray | str | Path | None = None,
    cancel: Callable[[], bool] | None = None,
    device: str = "auto",
    resume: str | Path | None = None,
    **settings,
) -> Iterator[Event]:
    """Yield the events of one run (stages, steps with previews, sections, the end).

    `model` is a bundle directory or a named bundle (default: the shipped demo model); the loaded
    bundle is kept for the next call. `out_dir` defaults to `outputs`.
    `image` is the start image: a file (recorded in the sidecar) or `(H, W, 3)` uint8 pixels.
    `settings` are the other fields of `GenerationSettings` (prompt, seconds, seed, ...), and
    `video` (a video to extend) or `one_frame` (a latent time index: one PNG, ending in `FrameDone`)
    with `one_frame_groups`.
    `resume` continues a stopped run instead (its job directory `OUT/NAME.job`, or its mp4) with
    the job's own settings, folder and model (unless `model` is given): the finished video equals
    that of an uninterrupted run.
    `device` is a torch device name, or "auto" (the default, as in the CLI and the GUI): the CUDA
    GPU when there is one, else the CPU (`framepack.devices.resolve_device`).
    """
    parallel = ranks().parallel
    device = resolve_device(device, rank=local_rank() if parallel else None, what="device")
    device = rank_device(device) if parallel else device
    if resume is not None:
        given = (
            [*settings]
            + (["out_dir"] if out_dir is not None else [])
            + (["image"] if image is not None else [])
        )
        if given:
            raise ValueError(
                f"resume continues a job with its own settings and folder; drop {', '.join(given)}."
            )
        job = job_to_resume(resume)
        if model is None and job.model is None:
            raise ValueError(f"the job {job.root} does not record its model directory; pass model=.")
        serving = not ranks().leader  # another rank of several: no encoders, no VAE
        bundle = loaded_bundle(str(model or job.model), device, job.vram_budget, job.ram_budget, serving)
        yield from open_run(bundle, Request(resume=job.root)).events(job.root.parent, cancel)
        return
    request = _request(settings, image)
    s = request.settings
    check_device_settings(s, device)  # before loading anything
    serving = not ranks().leader
    bundle = loaded_bundle(model_or_default(model), device, s.vram_budget, s.ram_budget, serving)
    yield from open_run(bundle, request).events("outputs" if out_dir is None else out_dir, cancel)


def generate(
    model: str | Path | None = None,
    out_dir: str | Path | None = None,
    image: np.ndarray | str | Path | None = None,
    on_event: Callable[[Event], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    device: str = "auto",
    resume: str | Path | None = None,
    **settings,
) -> Finished | FrameDone | None:
    """Run one generation and return its last event: `Finished` (video path, frames, sidecar), or
    `FrameDone` for one frame.

    With `torch.distributed` started with several processes (`torchrun`), every process calls it
    with the same arguments and each model call is split across them (`framepack.pipeline.ranks`):
    rank 0 gets the events and writes the outputs, the others get None and write nothing.
    The device "auto" (or "cuda") is then each process's own GPU (`LOCAL_RANK`; with NCCL, call
    `torch.cuda.set_device` with it before starting the group, as `torchrun` scripts do).

    Example: `framepack.generate("bundle/", image="cat.png", prompt="a cat walks", seconds=5)`;
    `framepack.generate(resume="outputs/NAME.job")` finishes a stopped run (see `generate_iter`).
    """
    last = None
    for event in generate_iter(model, out_dir, image, cancel, device, resume, **settings):
        if on_event is not None:
            on_event(event)
        last = event
    assert isinstance(last, (Finished, FrameDone)) or not ranks().leader
    return last
