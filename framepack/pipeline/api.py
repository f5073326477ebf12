"""`framepack.generate(...)`: the one-call Python API around bundles and the generation loop."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from .generate import Event, Finished, GenerationSettings, generate_events, prepare

__all__ = ["generate", "generate_iter", "DEFAULT_MODEL", "default_model"]

# The demo bundle shipped inside the package (trained by `framepack.training.demo`).
DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "demo_model"


def default_model() -> Path:
    """The shipped demo bundle; ValueError if this installation lacks it."""
    if not (DEFAULT_MODEL / "framepack.json").is_file():
        raise ValueError(f"no model given and the demo model is missing from {DEFAULT_MODEL}; pass a bundle.")
    return DEFAULT_MODEL


@functools.lru_cache(maxsize=2)
def _bundle(model: str, device: str):
    from .bundle import load_bundle

    return load_bundle(model, device=device)


def _settings(kwargs: dict) -> GenerationSettings:
    try:
        return GenerationSettings(**kwargs)
    except TypeError as e:
        raise ValueError(f"unknown generation setting: {e}.") from None


def generate_iter(
    model: str | Path | None = None,
    out_dir: str | Path = "outputs",
    image: np.ndarray | None = None,
    cancel: Callable[[], bool] | None = None,
    device: str = "cpu",
    **settings,
) -> Iterator[Event]:
    """Yield the events of one generation (stages, steps with previews, sections, the end).

    `model` is a bundle directory or a named bundle (default: the shipped demo model); the loaded
    bundle is kept for the next call.
    `settings` are the fields of `GenerationSettings` (prompt, image, seconds, seed, ...).
    """
    if model is None:
        model = default_model()
    bundle = _bundle(str(model), device)
    yield from generate_events(bundle, prepare(bundle, _settings(settings), image), out_dir, cancel)


def generate(
    model: str | Path | None = None,
    out_dir: str | Path = "outputs",
    image: np.ndarray | None = None,
    on_event: Callable[[Event], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    device: str = "cpu",
    **settings,
) -> Finished:
    """Generate one video and return its `Finished` event (video path, frames, sidecar).

    Example: `framepack.generate("bundle/", image="cat.png", prompt="a cat walks", seconds=5)`.
    """
    last = None
    for event in generate_iter(model, out_dir, image, cancel, device, **settings):
        if on_event is not None:
            on_event(event)
        last = event
    assert isinstance(last, Finished)
    return last
