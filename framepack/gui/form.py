"""The GUI form <-> `GenerationSettings` (+ the modes), and settings read back from a sidecar.

Pure functions (no Gradio): the form's values are validated here, at the edge, into one sentence
per mistake. Uploaded images, videos to extend and LoRA files are stored content-addressed under
`<outputs>/inputs/` and `<outputs>/loras/`, so a result's sidecar names them and the settings can
be loaded back to reproduce or vary it. LoRAs may also be picked from the folder given to
`framepack serve --loras`.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..pipeline.settings import GenerationSettings

__all__ = [
    "FIELDS",
    "FormValues",
    "Request",
    "demo_examples",
    "list_loras",
    "request_from_form",
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
    "sampler",
    "png",
    "t2v_colour",
    "loop",
    "video",
    "one_frame",
    "one_frame_index",
    "one_frame_groups",
    "keyframe_images",
    "keyframe_times",
    "loras",
    "lora_files",
    "lora_scales",
)
DEFAULT_COLOUR = "#808080"
ONE_FRAME_GROUPS = ("post", "k2", "k4")

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
    cache: str | None = "off"  # step cache: off, teacache, fbcache or magcache
    cache_threshold: float = 0.15
    vram_budget: str | None = (
        ""  # GiB of device memory for all weights, "auto", "none", or empty: the server's
    )
    sampler: str | None = "unipc"
    png: bool = False  # also every frame as a PNG
    t2v_colour: str | None = DEFAULT_COLOUR  # no start image (and no video): text-to-video from this colour
    loop: bool = False
    video: str | None = None  # path of an uploaded video to extend
    one_frame: bool = False  # one PNG at `one_frame_index` instead of a video
    one_frame_index: int | float | None = 9
    one_frame_groups: list[str] | None = field(default_factory=lambda: list(ONE_FRAME_GROUPS))
    keyframe_images: list[str] | None = None  # paths of uploaded images
    keyframe_times: str | None = ""  # one time in seconds per keyframe image: "1.5, 3"
    loras: list[str] | None = None  # names picked from the --loras folder
    lora_files: list[str] | None = None  # paths of uploaded LoRA files
    lora_scales: str | None = ""  # one scale for all, or one per LoRA (picked first): "0.8, 1"


@dataclass
class Request:
    """A validated form: the settings and the mode arguments of `JobQueue.submit`."""

    settings: GenerationSettings
    video: str | None = None
    one_frame: int | None = None
    one_frame_groups: tuple[str, ...] = ONE_FRAME_GROUPS

    def submit_kwargs(self) -> dict:
        return dict(video=self.video, one_frame=self.one_frame, one_frame_groups=self.one_frame_groups)


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


def _store_file(path: str | Path, folder: Path, what: str) -> Path:
    """Copy an uploaded file to `folder/<sha256[:16]>_<name>` (once per content)."""
    src = Path(path)
    if not src.is_file():
        raise ValueError(f"the {what} {src.name} was not received; upload it again.")
    digest = hashlib.sha256()
    with src.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    prefix = digest.hexdigest()[:16] + "_"
    name = src.name.removeprefix(prefix)  # a stored file that comes back (a loaded sidecar) keeps its name
    dest = folder / (prefix + re.sub(r"[^A-Za-z0-9._-]", "_", name)[-80:])
    if not dest.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        shutil.copyfile(src, tmp)
        tmp.replace(dest)
    return dest


def _hex_colour(text: str | None) -> str:
    """The colour picker's value as #rrggbb (some browsers send rgba(r, g, b, a)); other text as is."""
    text = (text or "").strip() or DEFAULT_COLOUR
    m = re.fullmatch(r"rgba?\(\s*([\d.]+)[,\s]+([\d.]+)[,\s]+([\d.]+)(?:[,\s/]+[\d.]+%?)?\s*\)", text)
    if m is None:
        return text
    return "#" + "".join(f"{min(255, round(float(v))):02x}" for v in m.groups())


def list_loras(folder: str | Path | None) -> list[str]:
    """LoRAs in the `--loras` folder: `.safetensors` files and folders (PEFT or our training's)."""
    if folder is None or not Path(folder).is_dir():
        return []
    names = []
    for p in sorted(Path(folder).iterdir()):
        if p.is_file() and p.suffix == ".safetensors":
            names.append(p.name)
        elif p.is_dir() and (any(p.glob("*.safetensors")) or (p / "lora").is_dir()):
            names.append(p.name)
    return names


def _numbers(what: str, text: str | None) -> list[float]:
    items = [t for t in re.split(r"[,;\s]+", (text or "").strip()) if t]
    try:
        values = [float(t.rstrip("s")) for t in items]
    except ValueError:
        raise ValueError(f"the {what} must be numbers separated by commas, got {text.strip()!r}.") from None
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"the {what} must be finite numbers, got {text.strip()!r}.")
    return values


def _loras(form: FormValues, outputs: Path, loras_dir: Path | None) -> tuple[tuple[str, float], ...]:
    known = list_loras(loras_dir)
    paths = []
    for name in form.loras or []:
        if name not in known:
            raise ValueError(f"the LoRA {name!r} is not in the LoRA folder.")
        paths.append(str(Path(loras_dir).resolve() / name))
    paths += [str(_store_file(f, outputs / "loras", "LoRA file")) for f in form.lora_files or []]
    scales = _numbers("LoRA scales", form.lora_scales)
    if not paths:
        return ()
    if len(scales) > 1 and len(scales) != len(paths):
        raise ValueError(
            f"give one LoRA scale for all or one per LoRA ({len(paths)} LoRAs, {len(scales)} scales)."
        )
    scales = scales * len(paths) if len(scales) == 1 else scales or [1.0] * len(paths)
    for v in scales:
        _number("a LoRA scale", v, -10.0, 10.0)
    return tuple(zip(paths, scales, strict=True))


def _keyframes(form: FormValues, outputs: Path) -> tuple[tuple[float, str], ...]:
    from ..io import load_image

    files = list(form.keyframe_images or [])
    times = _numbers("keyframe times", form.keyframe_times)
    if len(times) != len(files):
        raise ValueError(
            f"give one keyframe time (seconds) per keyframe image ({len(files)} images, {len(times)} times)."
        )
    return tuple(
        (t, str(save_input_image(load_image(f), outputs))) for t, f in zip(times, files, strict=True)
    )


def request_from_form(form: FormValues, outputs: str | Path, loras_dir: str | Path | None = None) -> Request:
    """Validate the form into settings and modes (inputs are stored under `outputs`); raises ValueError."""
    outputs = Path(outputs)
    prompt = (form.prompt or "").strip()
    if not prompt:
        raise ValueError("the prompt is empty; describe the motion you want.")
    seconds = _number("seconds", form.seconds, 0.1, 3600.0)
    one_frame = None
    if form.one_frame:
        if form.image is None:
            raise ValueError("one-frame mode edits a start image; upload one.")
        one_frame = _number("the one-frame index", form.one_frame_index, 1, 1000, whole=True)
        if not form.one_frame_groups:
            raise ValueError("one-frame mode needs at least one history group (post, k2, k4).")
    video = str(_store_file(form.video, outputs / "inputs", "video")) if form.video else None
    colour = None
    if form.image is None and video is None:  # text-to-video from a plain frame
        colour = _hex_colour(form.t2v_colour)
    settings = GenerationSettings(
        prompt=prompt,
        image=str(save_input_image(form.image, outputs)) if form.image is not None else None,
        end_image=str(save_input_image(form.end_image, outputs)) if form.end_image is not None else None,
        negative_prompt=(form.negative_prompt or "").strip(),
        seconds=seconds,
        seed=parse_seed(form.seed),
        steps=_number("steps", form.steps, 1, 1000, whole=True),
        distilled_cfg=_number("distilled guidance", form.distilled_cfg, 0.0, 100.0),
        cfg=_number("CFG", form.cfg, 0.0, 100.0),
        window=_number("window", form.window, 1, 33, whole=True),
        order=form.order or None,
        sampler=form.sampler or "unipc",
        keyframes=_keyframes(form, outputs),
        resolution=_number("resolution", form.resolution, 64, 2048, whole=True),
        crf=_number("mp4 quality (crf)", form.crf, 0, 51, whole=True),
        gif=bool(form.gif),
        png=bool(form.png),
        t2v_colour=colour,
        loop=bool(form.loop),
        loras=_loras(form, outputs, Path(loras_dir) if loras_dir else None),
        cache=None if form.cache in (None, "", "off") else form.cache,
        cache_threshold=_number("cache threshold", form.cache_threshold, 0.0, 10.0),
        vram_budget=(form.vram_budget or "").strip() or None,
    )
    groups = tuple(form.one_frame_groups or ONE_FRAME_GROUPS)
    return Request(settings, video=video, one_frame=one_frame, one_frame_groups=groups)


def settings_from_form(
    form: FormValues, outputs: str | Path, loras_dir: str | Path | None = None
) -> GenerationSettings:
    """The settings of a validated form (see `request_from_form`); raises ValueError."""
    return request_from_form(form, outputs, loras_dir).settings


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
    settings = dict(settings)  # + the modes, by their `framepack batch` names
    one_frame = data.get("one_frame")
    if isinstance(one_frame, dict):
        settings["one_frame"] = one_frame.get("index")
        settings["one_frame_groups"] = one_frame.get("groups")
    extension = data.get("extension")
    if isinstance(extension, dict) and extension.get("source"):
        settings["video"] = str(extension["source"])
    return settings


def _inside(path: str | None, outputs: Path) -> Path | None:
    """`path` when it is a file inside `outputs` (a sidecar must not point the server elsewhere)."""
    if not path:
        return None
    p = Path(path).resolve()
    root = outputs.resolve()
    return p if p.is_file() and (p == root or root in p.parents) else None


def form_from_settings(
    settings: dict, outputs: str | Path, manifest, loras_dir: str | Path | None = None
) -> dict:
    """Form values (by field name) from a sidecar's settings; missing values take the model's defaults.

    Files are loaded only from inside `outputs` (LoRAs also from `loras_dir`); a file that is gone
    (or elsewhere) comes back as None or is left out of its list. Settings of the wrong shape raise
    ValueError with one sentence.
    """
    for key, what in (("loras", "[path, scale]"), ("keyframes", "[seconds, image]")):
        pairs = settings.get(key) or []
        pair = (list, tuple)  # JSON gives lists, `GenerationSettings.to_dict` tuples
        if not isinstance(pairs, pair) or not all(isinstance(p, pair) and len(p) == 2 for p in pairs):
            raise ValueError(f"the settings' {key} are not a list of {what} pairs, so they cannot be loaded.")
    try:
        return _form_values(settings, Path(outputs), manifest, loras_dir)
    except (TypeError, ValueError, AttributeError):
        raise ValueError("the settings hold values of the wrong kind, so they cannot be loaded.") from None


def _form_values(settings: dict, outputs: Path, manifest, loras_dir: str | Path | None) -> dict:
    from ..io import load_image

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
        "cfg": float(pick("cfg", manifest.cfg)),
        "window": int(pick("window", manifest.window)),
        "order": str(pick("order", manifest.order)),
        "resolution": int(pick("resolution", manifest.resolution)),
        "crf": int(pick("crf", 16)),
        "gif": bool(settings.get("gif", False)),
        "cache": str(settings.get("cache") or "off"),
        "cache_threshold": float(pick("cache_threshold", 0.15)),
        "vram_budget": str(settings.get("vram_budget") or ""),
        **_modes_from_settings(settings, outputs, manifest, loras_dir),
    }


def _modes_from_settings(settings: dict, outputs: Path, manifest, loras_dir: str | Path | None) -> dict:
    video = _inside(settings.get("video"), outputs)
    keyframes = [(t, _inside(path, outputs)) for t, path in settings.get("keyframes") or []]
    keyframes = [(t, p) for t, p in keyframes if p is not None]
    picked, uploaded, scales = [], [], []
    root = Path(loras_dir).resolve() if loras_dir else None
    known = set(list_loras(root))
    for path, scale in settings.get("loras") or []:
        p = Path(path).resolve()
        if root is not None and p.parent == root and p.name in known:
            picked.append(p.name)
        elif (q := _inside(path, outputs)) is not None:
            uploaded.append(str(q))
        else:
            continue
        scales.append(float(scale))
    one_frame = settings.get("one_frame")
    return {
        "sampler": str(settings.get("sampler") or "unipc"),
        "png": bool(settings.get("png", False)),
        "t2v_colour": str(settings.get("t2v_colour") or DEFAULT_COLOUR),
        "loop": bool(settings.get("loop", False)),
        "video": str(video) if video is not None else None,
        "one_frame": one_frame is not None,
        "one_frame_index": int(
            one_frame if one_frame is not None else settings.get("window") or manifest.window
        ),
        "one_frame_groups": list(settings.get("one_frame_groups") or ONE_FRAME_GROUPS),
        "keyframe_images": [str(p) for _, p in keyframes],
        "keyframe_times": ", ".join(f"{t:g}" for t, _ in keyframes),
        "loras": picked,
        "lora_files": uploaded,
        "lora_scales": ", ".join(f"{v:g}" for v in scales),
    }


def demo_examples(model_root: str | Path | None) -> list[tuple[str | None, str]]:
    """(start image or None, prompt) examples: the demo model's own when `model_root` is the
    shipped demo bundle (its start images once `examples/` holds them), else `QUICK_PROMPTS`."""
    from ..pipeline.named import DEFAULT_MODEL

    if model_root is None or Path(model_root).resolve() != DEFAULT_MODEL.resolve():
        return [(None, prompt) for prompt in QUICK_PROMPTS]
    from ..training.demo import EXAMPLES

    out = []
    for title, caption, _ in EXAMPLES:
        image = DEFAULT_MODEL / "examples" / (title.replace(" ", "_") + ".png")
        out.append((str(image) if image.is_file() else None, caption))
    return out
