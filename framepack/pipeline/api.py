"""`framepack.generate(...)`: the one-call Python API around bundles and the generation loop."""

from __future__ import annotations

import gc
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from .generate import Event, Finished, GenerationSettings, generate_events, prepare
from .named import DEFAULT_MODEL, default_model  # re-exported until their users import .named

__all__ = ["generate", "generate_iter", "DEFAULT_MODEL", "default_model"]


LOADED_BUNDLES: OrderedDict[tuple[str, str, str], object] = OrderedDict()  # (model, device, home) -> Bundle
_KEEP = 2  # bundles kept loaded


def loaded_bundle(model: str, device: str, vram_budget=None):
    """The bundle `model` for runs on `device`, loaded once per place its weights wait (`home`):
    on the device, or on the host for a run with a VRAM budget (`bundle.weights_home`). Loading it
    one way drops a cached copy loaded the other way, so one model never holds the device twice."""
    from .bundle import load_bundle, weights_home

    home = str(weights_home(device, vram_budget))
    key = (model, device, home)
    if key in LOADED_BUNDLES:
        LOADED_BUNDLES.move_to_end(key)
        return LOADED_BUNDLES[key]
    for other in [k for k in LOADED_BUNDLES if k[:2] == key[:2]]:
        del LOADED_BUNDLES[other]
    while len(LOADED_BUNDLES) >= _KEEP:
        LOADED_BUNDLES.popitem(last=False)
    gc.collect()  # the dropped weights go before the new ones arrive
    LOADED_BUNDLES[key] = load_bundle(model, device=device, vram_budget=vram_budget)
    return LOADED_BUNDLES[key]


def _settings(kwargs: dict) -> GenerationSettings:
    try:
        return GenerationSettings(**kwargs)
    except TypeError as e:
        raise ValueError(f"unknown generation setting: {e}.") from None


def generate_iter(
    model: str | Path | None = None,
    out_dir: str | Path | None = None,
    image: np.ndarray | str | Path | None = None,
    cancel: Callable[[], bool] | None = None,
    device: str = "cpu",
    resume: str | Path | None = None,
    **settings,
) -> Iterator[Event]:
    """Yield the events of one generation (stages, steps with previews, sections, the end).

    `model` is a bundle directory or a named bundle (default: the shipped demo model); the loaded
    bundle is kept for the next call. `out_dir` defaults to `outputs`.
    `image` is the start image: a file (recorded in the sidecar) or `(H, W, 3)` uint8 pixels.
    `settings` are the other fields of `GenerationSettings` (prompt, seconds, seed, ...).
    `resume` continues a stopped run instead (its job directory `OUT/NAME.job`, or its mp4) with
    the job's own settings, folder and model (unless `model` is given): the finished video equals
    that of an uninterrupted run.
    """
    if resume is not None:
        yield from _resume(model, resume, out_dir, image, cancel, device, settings)
        return
    if isinstance(image, (str, Path)):  # a file: recorded in the sidecar as the CLI's --image is
        settings["image"], image = str(image), None
    if model is None:
        model = default_model()
    bundle = loaded_bundle(str(model), device, settings.get("vram_budget"))
    prepared = prepare(bundle, _settings(settings), image)
    yield from generate_events(bundle, prepared, "outputs" if out_dir is None else out_dir, cancel)


def _resume(model, resume, out_dir, image, cancel, device: str, settings: dict) -> Iterator[Event]:
    from .extend import extend_events
    from .jobs import Job, check_free, find_job, resume_job

    given = (
        [*settings] + (["out_dir"] if out_dir is not None else []) + (["image"] if image is not None else [])
    )
    if given:
        raise ValueError(f"resume continues a job with its own settings and folder; drop {', '.join(given)}.")
    job_dir = find_job(resume)
    check_free(job_dir)
    if model is None:
        model = Job(job_dir).read().get("bundle") or ""
        if model in ("", "None"):  # a named bundle records no directory
            raise ValueError(f"the job {job_dir} does not record its model directory; pass model=.")
    budget = Job(job_dir).read()["settings"].get("vram_budget")  # the job's own budget
    bundle = loaded_bundle(str(model), device, budget)
    prepared, source = resume_job(bundle, job_dir)  # a generation or a video extension
    if source is not None:
        yield from extend_events(bundle, prepared, source, job_dir.parent, cancel, job=job_dir)
    else:
        yield from generate_events(bundle, prepared, job_dir.parent, cancel, job=job_dir)


def generate(
    model: str | Path | None = None,
    out_dir: str | Path | None = None,
    image: np.ndarray | str | Path | None = None,
    on_event: Callable[[Event], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    device: str = "cpu",
    resume: str | Path | None = None,
    **settings,
) -> Finished:
    """Generate one video and return its `Finished` event (video path, frames, sidecar).

    Example: `framepack.generate("bundle/", image="cat.png", prompt="a cat walks", seconds=5)`;
    `framepack.generate(resume="outputs/NAME.job")` finishes a stopped run (see `generate_iter`).
    """
    last = None
    for event in generate_iter(model, out_dir, image, cancel, device, resume, **settings):
        if on_event is not None:
            on_event(event)
        last = event
    assert isinstance(last, Finished)
    return last
