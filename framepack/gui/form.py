"""The GUI form <-> `GenerationSettings`, and settings read back from a finished video's sidecar.

Pure functions (no Gradio): the form's values are validated here, at the edge, into one sentence
per mistake. Uploaded images are stored content-addressed under `<outputs>/inputs/`, so a video's
sidecar names its start image and the settings can be loaded back to reproduce or vary it.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..pipeline.generate import GenerationSettings

__all__ = [
    "FIELDS",
    "FormValues",
    "QUICK_PROMPTS",
    "load_sidecar",
    "parse_seed",
    "save_input_image",
    "settings_from_form",
    "form_from_settings",
    "orders_for",
]

# The form's fields, in the order of the `/generate` endpoint's parameters.
FIELDS = (
    "image",
    "end_image",
    "prompt",
    "negative_prompt",
    "seconds",
    "seed",
    "steps",
    "distilled_cfg",
    "cfg",
    "window",
    "order",
    "resolution",
    "crf",
    "gif",
    "cache",
    "cache_threshold",
    "vram_budget",
)

QUICK_PROMPTS = (
    "The cat walks slowly towards the camera.",
    "The camera slowly zooms in while the light changes.",
    "The woman turns her head and smiles, her hair moving in the wind.",
    "[0s-2s: The man waves at the camera.] [2s: The man walks away down the street.]",
)


@dataclass
class FormValues:
    """The form as the browser sends it (numbers may arrive as floats, the seed as text)."""

    image: np.ndarray | None
    end_image: np.ndarray | None
    prompt: str
    negative_prompt: str = ""
    seconds: float = 5.0
    seed: str | int | float | None = "31337"
    steps: int | float = 25
    distilled_cfg: float = 10.0
    cfg: float = 1.0
    window: int | float = 9
    order: str = "inverted"
    resolution: int | float = 640
    crf: int | float = 16
    gif: bool = False
    cache: str | None = "off"  # step cache: off, teacache or fbcache
    cache_threshold: float = 0.15
    vram_budget: str | None = ""  # GiB of device memory for the transformer, "auto", or empty: all of it


def orders_for(model_order: str) -> list[str]:
    """Section orders a model can run: the inverted models also run the anti-drifting order."""
    return ["forward"] if model_order == "forward" else ["inverted", "anti-drifting"]


def parse_seed(value: str | int | float | None) -> int:
    """A seed from the form: a whole number, or empty / "random" for a fresh random one."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "random", "-1")):
        return secrets.randbelow(2**31)
    if isinstance(value, bool):
        raise ValueError(f"the seed must be a whole number or 'random', got {value!r}.")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"the seed must be a whole number or 'random', got {value!r}.")
        value = int(value)
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise ValueError(f"the seed must be a whole number or 'random', got {value.strip()!r}.") from None
    if value == -1:
        return secrets.randbelow(2**31)
    if not 0 <= value < 2**63:
        raise ValueError(f"the seed must be from 0 to 2**63 - 1 (or 'random'), got {value}.")
    return value


def _number(name: str, value, low: float, high: float, whole: bool = False) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a number, got {value!r}.")
    if whole and not float(value).is_integer():
        raise ValueError(f"{name} must be a whole number, got {value!r}.")
    if not low <= value <= high:
        raise ValueError(f"{name} must be from {low:g} to {high:g}, got {value:g}.")
    return int(value) if whole else float(value)


def save_input_image(image: np.ndarray, outputs: str | Path) -> Path:
    """Store an uploaded image as `<outputs>/inputs/<sha256[:16]>.png` (once per content)."""
    from PIL import Image

    from ..io import write_bytes_atomic

    array = np.ascontiguousarray(image)
    if array.ndim != 3 or array.shape[2] not in (3, 4) or array.dtype != np.uint8:
        raise ValueError(f"the uploaded image has shape {array.shape} ({array.dtype}), not an RGB image.")
    array = array[..., :3]
    digest = hashlib.sha256(array.tobytes() + repr(array.shape).encode()).hexdigest()[:16]
    path = Path(outputs) / "inputs" / f"{digest}.png"
    if not path.is_file():
        import io

        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        write_bytes_atomic(buffer.getvalue(), path)
    return path


def settings_from_form(form: FormValues, outputs: str | Path) -> GenerationSettings:
    """Validate the form into settings (images are stored under `outputs`); raises ValueError."""
    if form.image is None:
        raise ValueError("upload a start image first.")
    prompt = (form.prompt or "").strip()
    if not prompt:
        raise ValueError("the prompt is empty; describe the motion you want.")
    seconds = _number("seconds", form.seconds, 0.1, 3600.0)
    return GenerationSettings(
        prompt=prompt,
        image=str(save_input_image(form.image, outputs)),
        end_image=str(save_input_image(form.end_image, outputs)) if form.end_image is not None else None,
        negative_prompt=(form.negative_prompt or "").strip(),
        seconds=seconds,
        seed=parse_seed(form.seed),
        steps=_number("steps", form.steps, 1, 1000, whole=True),
        distilled_cfg=_number("distilled guidance", form.distilled_cfg, 0.0, 100.0),
        cfg=_number("CFG", form.cfg, 0.0, 100.0),
        window=_number("window", form.window, 1, 33, whole=True),
        order=form.order or None,
        resolution=_number("resolution", form.resolution, 64, 2048, whole=True),
        crf=_number("mp4 quality (crf)", form.crf, 0, 51, whole=True),
        gif=bool(form.gif),
        cache=None if form.cache in (None, "", "off") else form.cache,
        cache_threshold=_number("cache threshold", form.cache_threshold, 0.0, 10.0),
        vram_budget=(form.vram_budget or "").strip() or None,
    )


def load_sidecar(path: str | Path) -> dict:
    """The settings dict of a finished video: its JSON sidecar, or the metadata of its mp4."""
    p = Path(path)
    if p.suffix.lower() == ".mp4":
        from ..io import read_video

        _, _, meta = read_video(p, max_frames=1)
        text = meta.get("framepack")
        if text is None:
            raise ValueError(f"{p.name} holds no FramePack settings (it was not made by framepack).")
    else:
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{p.name} cannot be read ({e}).") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        raise ValueError(f"{p.name} is not JSON, so it is not a FramePack sidecar.") from None
    settings = data.get("settings", data) if isinstance(data, dict) else None
    if not isinstance(settings, dict) or "prompt" not in settings:
        raise ValueError(f"{p.name} is not a FramePack sidecar (it has no settings with a prompt).")
    return settings


def _inside(path: str | None, outputs: Path) -> Path | None:
    """`path` when it is a file inside `outputs` (a sidecar must not point the server elsewhere)."""
    if not path:
        return None
    p = Path(path).resolve()
    root = outputs.resolve()
    return p if p.is_file() and (p == root or root in p.parents) else None


def form_from_settings(settings: dict, outputs: str | Path, manifest) -> dict:
    """Form values (by field name) from a sidecar's settings; missing values take the model's defaults.

    Images are loaded only from inside `outputs`; an image that is gone (or elsewhere) comes back as None.
    """
    from ..io import load_image

    outputs = Path(outputs)
    images = {}
    for key in ("image", "end_image"):
        p = _inside(settings.get(key), outputs)
        images[key] = load_image(p) if p is not None else None
    seconds = settings.get("seconds")
    if seconds is None and settings.get("sections"):
        window = settings.get("window") or manifest.window
        seconds = settings["sections"] * window * 4 / (settings.get("fps") or manifest.fps)

    def pick(key, default):
        value = settings.get(key)
        return default if value is None else value

    return {
        **images,
        "prompt": str(settings.get("prompt", "")),
        "negative_prompt": str(settings.get("negative_prompt") or ""),
        "seconds": float(seconds if seconds is not None else 5.0),
        "seed": str(pick("seed", 31337)),
        "steps": int(pick("steps", manifest.steps)),
        "distilled_cfg": float(pick("distilled_cfg", manifest.distilled_guidance)),
        "cfg": float(pick("cfg", 1.0)),
        "window": int(pick("window", manifest.window)),
        "order": str(pick("order", manifest.order)),
        "resolution": int(pick("resolution", manifest.resolution)),
        "crf": int(pick("crf", 16)),
        "gif": bool(settings.get("gif", False)),
        "cache": str(settings.get("cache") or "off"),
        "cache_threshold": float(pick("cache_threshold", 0.15)),
        "vram_budget": str(settings.get("vram_budget") or ""),
    }
