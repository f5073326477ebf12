"""Model bundles: every component a generation needs, loaded from one place.

A bundle is a directory in the Hugging Face layout (FRAMEPACK.md section 8)::

    framepack.json        the manifest: section order, packing, prompt template, defaults
    tokenizer/            LLaMA fast tokenizer          text_encoder/    LlamaModel
    tokenizer_2/          CLIP tokenizer                text_encoder_2/  CLIPTextModel
    feature_extractor/    SiglipImageProcessor          image_encoder/   SiglipVisionModel
    vae/                  AutoencoderKLHunyuanVideo     transformer/     our PackedTransformer

or a named bundle (`NAMED_BUNDLES`) whose components live in the released repos, read from the
local Hugging Face cache. Loading never downloads: `download_bundle` does, once, explicitly.
Every weight file is safetensors; pickle files are refused and no remote code runs.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

__all__ = [
    "COMPONENTS",
    "HUNYUAN_PROMPT_TEMPLATE",
    "MANIFEST_NAME",
    "NAMED_BUNDLES",
    "Bundle",
    "BundleError",
    "BundleSpec",
    "Manifest",
    "component_dtypes",
    "download_bundle",
    "download_plan",
    "load_bundle",
    "weights_home",
]

MANIFEST_NAME = "framepack.json"
COMPONENTS = (
    "tokenizer",
    "text_encoder",
    "tokenizer_2",
    "text_encoder_2",
    "feature_extractor",
    "image_encoder",
    "vae",
    "transformer",
)
MODEL_ORDERS = ("inverted", "forward")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

# diffusers' HunyuanVideo `DEFAULT_PROMPT_TEMPLATE["template"]` (the text the LLaMA encoder reads;
# `{}` takes the prompt). Its first 95 tokens (bos + the system turn + the user header) are cropped.
HUNYUAN_PROMPT_TEMPLATE = (
    "<|start_header_id|>system<|end_header_id|>\n\nDescribe the video by detailing the following aspects: "
    "1. The main content and theme of the video."
    "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
    "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects."
    "4. background environment, light, style and atmosphere."
    "5. camera angles, movements, and transitions used in the video:<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
)


class BundleError(ValueError):
    """A bundle that cannot be found or loaded; the message is one sentence for the user."""


# ---------------------------------------------------------------------------------------- manifest
@dataclass(frozen=True)
class Manifest:
    """What a bundle's weights expect and the defaults of a generation (`framepack.json`)."""

    order: str = "inverted"  # section order the transformer was trained for: "inverted" | "forward"
    packing: str = "inverted"  # packing schedule: a preset or a paper name like "f16k4f2k2f1k1_g9"
    prompt_template: str = HUNYUAN_PROMPT_TEMPLATE
    template_crop: int = 95  # template tokens before the prompt (bos included), cropped away
    max_prompt_tokens: int = 256
    text_hidden_layer: int = -3  # LLaMA hidden state read (index into `hidden_states`)
    window: int = 9  # latent frames per section
    fps: int = 30
    resolution: int = 640  # bucket setting
    steps: int = 25
    distilled_guidance: float = 10.0
    cfg: float = 1.0  # real CFG scale by default (1: off, as the release; negative prompt "")
    shift: float | None = None  # None: resolution-dependent shift (FRAMEPACK.md section 5)
    vae_scaling_factor: float = 0.476986
    # True: the VAE codes clips of more than 16 frames in diffusers' overlapping temporal tiles (the
    # release's behaviour, and its memory saving); False: whole clips in one pass, exact for a VAE
    # trained on whole clips (the demo's), and 4-5x faster on a CPU.
    vae_temporal_tiles: bool = True
    name: str = ""

    def __post_init__(self) -> None:
        from ..packing import get_schedule

        if self.order not in MODEL_ORDERS:
            raise ValueError(f"manifest order {self.order!r} is not one of {', '.join(MODEL_ORDERS)}.")
        get_schedule(self.packing)  # raises a ValueError naming the presets
        if not isinstance(self.prompt_template, str) or self.prompt_template.count("{}") != 1:
            raise ValueError("the manifest's prompt_template must hold exactly one '{}' for the prompt.")
        for key in ("template_crop", "max_prompt_tokens", "window", "fps", "resolution", "steps"):
            value = getattr(self, key)
            low = 0 if key == "template_crop" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"manifest {key} must be an integer of at least {low}, got {value!r}.")
        if isinstance(self.text_hidden_layer, bool) or not isinstance(self.text_hidden_layer, int):
            raise ValueError(
                f"manifest text_hidden_layer must be an integer, got {self.text_hidden_layer!r}."
            )
        if self.resolution % 16:
            raise ValueError(f"manifest resolution must be a multiple of 16, got {self.resolution}.")
        for key in ("distilled_guidance", "vae_scaling_factor", "shift", "cfg"):
            value = getattr(self, key)
            if value is None and key == "shift":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"manifest {key} must be a positive number, got {value!r}.")
        if not isinstance(self.name, str):
            raise ValueError(f"manifest name must be a string, got {self.name!r}.")
        if not isinstance(self.vae_temporal_tiles, bool):
            raise ValueError(
                f"manifest vae_temporal_tiles must be true or false, got {self.vae_temporal_tiles!r}."
            )

    def replace(self, **changes: Any) -> Manifest:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        """Build from a dict; an unknown key is an error (a typo must not silently fall back)."""
        if not isinstance(data, dict):
            raise ValueError(f"a manifest is a JSON object, got {type(data).__name__}.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in data if k not in known)
        if unknown:
            raise ValueError(
                f"the manifest has unknown key {unknown[0]!r}; known keys are {', '.join(sorted(known))}."
            )
        return cls(**data)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Manifest:
        """Read `framepack.json` (`path` is the file or the bundle directory)."""
        p = Path(path)
        if p.is_dir():
            p = p / MANIFEST_NAME
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{p} is not a readable JSON manifest ({e}).") from None
        return cls.from_dict(data)

    def save(self, path: str | os.PathLike) -> Path:
        """Write `framepack.json` (`path` is the file or the bundle directory); returns the file."""
        p = Path(path)
        if p.is_dir():
            p = p / MANIFEST_NAME
        p.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return p


# ------------------------------------------------------------------------------------ named specs
@dataclass(frozen=True)
class BundleSpec:
    """A named bundle: where each component lives on the hub, and its manifest."""

    manifest: Manifest
    sources: dict[str, tuple[str, str]] = field(default_factory=dict)  # component -> (repo, subfolder)


_HUNYUAN = "hunyuanvideo-community/HunyuanVideo"
_REDUX = "lllyasviel/flux_redux_bfl"
_ENCODERS = {
    "tokenizer": (_HUNYUAN, "tokenizer"),
    "text_encoder": (_HUNYUAN, "text_encoder"),
    "tokenizer_2": (_HUNYUAN, "tokenizer_2"),
    "text_encoder_2": (_HUNYUAN, "text_encoder_2"),
    "vae": (_HUNYUAN, "vae"),
    "feature_extractor": (_REDUX, "feature_extractor"),
    "image_encoder": (_REDUX, "image_encoder"),
}
NAMED_BUNDLES: dict[str, BundleSpec] = {
    # The original image-to-video model, trained for the inverted anti-drifting order.
    "hunyuan-i2v": BundleSpec(
        Manifest(order="inverted", packing="inverted", name="hunyuan-i2v"),
        {**_ENCODERS, "transformer": ("lllyasviel/FramePackI2V_HY", "")},
    ),
    # FramePack-F1: the forward (vanilla) order.
    "hunyuan-f1": BundleSpec(
        Manifest(order="forward", packing="forward", name="hunyuan-f1"),
        {**_ENCODERS, "transformer": ("lllyasviel/FramePack_F1_I2V_HY_20250503", "")},
    ),
}

# Files each kind of component needs: configs, tokenizer files and safetensors weights only
# (no pickle `.bin`, no fp16/fp8 variants, nothing else the repos hold).
_TOKENIZER_FILES = ("*.json", "*.txt")  # tokenizer.json / *_config.json / vocab.json, merges.txt
_TRANSFORMERS_FILES = (
    "config.json",
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
)
_DIFFUSERS_FILES = (
    "config.json",
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model-*-of-*.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
)
_FILES = {
    "tokenizer": _TOKENIZER_FILES,
    "tokenizer_2": _TOKENIZER_FILES,
    "feature_extractor": ("preprocessor_config.json",),
    "text_encoder": _TRANSFORMERS_FILES,
    "text_encoder_2": _TRANSFORMERS_FILES,
    "image_encoder": _TRANSFORMERS_FILES,
    "vae": _DIFFUSERS_FILES,
    "transformer": _DIFFUSERS_FILES,
}


def _spec(name: str) -> BundleSpec:
    try:
        return NAMED_BUNDLES[name]
    except (KeyError, TypeError):
        raise BundleError(
            f"{name!r} is neither a bundle directory nor a named bundle ({', '.join(NAMED_BUNDLES)})."
        ) from None


def download_plan(name: str) -> dict[str, list[str]]:
    """The `allow_patterns` per hub repo that `download_bundle(name)` fetches (a pure function)."""
    plan: dict[str, list[str]] = {}
    for component, (repo, sub) in _spec(name).sources.items():
        prefix = f"{sub}/" if sub else ""
        patterns = plan.setdefault(repo, [])
        patterns.extend(prefix + p for p in _FILES[component] if prefix + p not in patterns)
    return plan


def _offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return bool(constants.HF_HUB_OFFLINE) or env


def _component_dirs(spec: BundleSpec, snapshots: dict[str, Path]) -> dict[str, Path]:
    return {c: snapshots[repo] / sub if sub else snapshots[repo] for c, (repo, sub) in spec.sources.items()}


def download_bundle(
    name: str, progress: bool = True, cache_dir: str | os.PathLike | None = None
) -> dict[str, Path]:
    """Fetch a named bundle into the Hugging Face cache; returns each component's directory.

    Only the files of `download_plan(name)` are fetched; an interrupted download resumes where it
    stopped (the hub client keeps partial files). More than 30 GB for the released bundles.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    spec = _spec(name)
    quiet = not progress and not are_progress_bars_disabled("huggingface_hub")
    if quiet:
        disable_progress_bars("huggingface_hub")
    snapshots: dict[str, Path] = {}
    try:
        for repo, patterns in download_plan(name).items():
            try:
                snapshots[repo] = Path(snapshot_download(repo, allow_patterns=patterns, cache_dir=cache_dir))
            except (LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError, TimeoutError) as e:
                why = "HF_HUB_OFFLINE is set" if _offline() else type(e).__name__
                raise BundleError(
                    f"cannot download bundle {name!r}: the Hugging Face hub is offline or unreachable "
                    f"({why}) and {repo} is not complete in the local cache."
                ) from None
            except (HfHubHTTPError, OSError) as e:
                raise BundleError(f"cannot download {repo} for bundle {name!r} ({e}).") from None
    finally:
        if quiet:
            enable_progress_bars("huggingface_hub")
    return _component_dirs(spec, snapshots)


def _cached_named(name: str, cache_dir: str | os.PathLike | None) -> tuple[Manifest, dict[str, Path]]:
    """A named bundle's component directories in the local hub cache (no network)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    spec = _spec(name)
    snapshots: dict[str, Path] = {}
    for repo, patterns in download_plan(name).items():
        try:
            path = snapshot_download(
                repo, allow_patterns=patterns, cache_dir=cache_dir, local_files_only=True
            )
        except (LocalEntryNotFoundError, OSError):
            raise BundleError(
                f"bundle {name!r} is not (completely) in the local Hugging Face cache ({repo} is missing); "
                f"fetch it once with `framepack download {name}` (in Python: "
                f"framepack.pipeline.bundle.download_bundle({name!r}))."
            ) from None
        snapshots[repo] = Path(path)
    return spec.manifest, _component_dirs(spec, snapshots)


# ------------------------------------------------------------------------------------ the bundle
@dataclass
class Bundle:
    """Every loaded component of a FramePack model (see the module docstring for the layout)."""

    manifest: Manifest
    tokenizer: Any  # LLaMA fast tokenizer
    text_encoder: nn.Module  # transformers LlamaModel
    tokenizer_2: Any  # CLIP tokenizer
    text_encoder_2: nn.Module  # transformers CLIPTextModel
    feature_extractor: Any  # SiglipImageProcessor
    image_encoder: nn.Module  # transformers SiglipVisionModel
    vae: nn.Module  # diffusers AutoencoderKLHunyuanVideo
    transformer: nn.Module  # framepack.model.PackedTransformer
    root: Path | None = None  # the bundle directory (None for a named bundle)
    target: torch.device | None = None  # where runs compute, when the weights were loaded elsewhere

    def modules(self) -> dict[str, nn.Module]:
        """The components with weights, by name."""
        names = ("text_encoder", "text_encoder_2", "image_encoder", "vae", "transformer")
        return {n: getattr(self, n) for n in names}

    @property
    def device(self) -> torch.device:
        """The device runs compute on: `target` for a bundle whose weights wait on the host for a
        VRAM budget (`load_bundle(..., vram_budget=...)`), else where the transformer is."""
        if self.target is not None:
            return self.target
        return next(self.transformer.parameters()).device

    def to(self, device: torch.device | str) -> Bundle:
        """Move every component to `device`, keeping each one's dtype; returns self."""
        for module in self.modules().values():
            module.to(device)
        self.target = None
        return self

    def dtypes(self) -> dict[str, torch.dtype]:
        return {n: next(m.parameters()).dtype for n, m in self.modules().items()}


def component_dtypes(device: torch.device | str, dtype: torch.dtype | None = None) -> dict[str, torch.dtype]:
    """Weight dtypes per component: `dtype` everywhere if given, fp32 on a CPU, else the release's.

    The release runs the transformer in bf16 and the encoders and the VAE in fp16.
    """
    names = ("text_encoder", "text_encoder_2", "image_encoder", "vae", "transformer")
    if dtype is not None:
        return dict.fromkeys(names, dtype)
    if torch.device(device).type == "cpu":
        return dict.fromkeys(names, torch.float32)
    return {**dict.fromkeys(names, torch.float16), "transformer": torch.bfloat16}


@contextmanager
def _loading(component: str, directory: Path):
    """Turn any failure while loading `component` into one BundleError naming it."""
    try:
        yield
    except BundleError:
        raise
    except Exception as e:  # noqa: BLE001 - a library may raise anything on a corrupt file
        reason = str(e).strip().splitlines()[0].rstrip(".") if str(e).strip() else type(e).__name__
        if len(reason) > 200:  # some libraries append long lists: keep the first sentence
            cut = reason.find(". ")
            reason = reason[:cut] if 0 < cut < 200 else reason[:200] + "..."
        raise BundleError(f"the {component} component in {directory} could not be loaded ({reason}).") from e


def _check_weights(component: str, directory: Path) -> None:
    files = [p for p in directory.rglob("*") if p.is_file()]
    if any(p.suffix == ".safetensors" for p in files):
        return
    pickles = [p for p in files if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise BundleError(
            f"the {component} component holds only pickle weights ({pickles[0].name}), which can run "
            "code when loaded and are refused; convert them to safetensors."
        )
    raise BundleError(f"the {component} component in {directory} has no safetensors weights.")


def _read_config(component: str, directory: Path) -> dict:
    path = directory / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"the {component} component in {directory} has no config.json.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"the {component} component's config.json is not valid JSON ({e}).") from None
    if not isinstance(data, dict):
        raise BundleError(f"the {component} component's config.json does not hold a JSON object.")
    return data


def _expect(component: str, found: Any, wanted: tuple[str, ...], what: str) -> None:
    if found not in wanted:
        raise BundleError(f"the {component} component is a {found!r} {what}, expected {' or '.join(wanted)}.")


# Weights no FramePack code path reads, which a checkpoint may leave out (SigLIP's pooling head).
_UNUSED_WEIGHTS = ("head.",)


def _load_transformers_model(component: str, directory: Path, model_types: tuple[str, ...], dtype):
    import transformers

    classes = {
        "text_encoder": transformers.LlamaModel,
        "text_encoder_2": transformers.CLIPTextModel,
        "image_encoder": transformers.SiglipVisionModel,
    }
    _check_weights(component, directory)
    _expect(component, _read_config(component, directory).get("model_type"), model_types, "model")
    with _loading(component, directory):
        model, info = classes[component].from_pretrained(
            directory,
            dtype=dtype,
            use_safetensors=True,
            trust_remote_code=False,
            local_files_only=True,
            output_loading_info=True,
        )
    _check_complete(component, info)
    return model


def _check_complete(component: str, info: dict) -> None:
    """transformers and diffusers load a checkpoint that lacks weights with only a log line."""
    missing = sorted(k for k in info.get("missing_keys", ()) if not k.startswith(_UNUSED_WEIGHTS))
    if missing:
        what = f"{len(missing)} weights, the first" if len(missing) > 1 else "the weight"
        raise BundleError(
            f"the {component} component's checkpoint lacks {what} {missing[0]!r}; is it the right model?"
        )


def _load_component(component: str, directory: Path, dtype: torch.dtype | None, device: torch.device | str):
    if not directory.is_dir():
        raise BundleError(f"the bundle lacks its {component} component (no folder {directory}).")
    if component in ("tokenizer", "tokenizer_2"):
        from transformers import AutoTokenizer

        with _loading(component, directory):
            return AutoTokenizer.from_pretrained(directory, trust_remote_code=False, local_files_only=True)
    if component == "feature_extractor":
        from transformers import AutoImageProcessor

        with _loading(component, directory):
            processor = AutoImageProcessor.from_pretrained(
                directory, trust_remote_code=False, local_files_only=True
            )
        _expect(
            component, type(processor).__name__.removesuffix("Pil"), ("SiglipImageProcessor",), "processor"
        )
        return processor
    if component == "text_encoder":
        return _load_transformers_model(component, directory, ("llama",), dtype)
    if component == "text_encoder_2":
        return _load_transformers_model(component, directory, ("clip_text_model",), dtype)
    if component == "image_encoder":
        return _load_transformers_model(component, directory, ("siglip_vision_model",), dtype)
    if component == "vae":
        from diffusers import AutoencoderKLHunyuanVideo

        _check_weights(component, directory)
        found = _read_config(component, directory).get("_class_name")
        _expect(component, found, ("AutoencoderKLHunyuanVideo",), "model")
        with _loading(component, directory):
            vae, info = AutoencoderKLHunyuanVideo.from_pretrained(
                directory,
                torch_dtype=dtype,
                use_safetensors=True,
                local_files_only=True,
                output_loading_info=True,
            )
        _check_complete(component, info)
        return vae
    if component == "transformer":
        from ..model import load_transformer

        _check_weights(component, directory)
        with _loading(component, directory):
            return load_transformer(directory, dtype=dtype, device=device)
    raise AssertionError(component)


def weights_home(device: torch.device | str, vram_budget: str | float | None) -> torch.device:
    """Where `load_bundle` puts the weights for runs on `device`: the host (CPU) when a VRAM budget
    is set (GiB or "auto"; the planner of `framepack.memory` then moves them), else `device`."""
    from ..memory.streaming import parse_budget

    device = torch.device(device)
    return torch.device("cpu") if parse_budget(vram_budget) is not None else device


def _locate(name_or_path: str | os.PathLike, cache_dir) -> tuple[Manifest, dict[str, Path]]:
    """The manifest and component directories of a bundle directory or a cached named bundle."""
    path = Path(name_or_path)
    if not path.is_dir():
        return _cached_named(str(name_or_path), cache_dir)
    if not (path / MANIFEST_NAME).is_file():
        raise BundleError(f"{path} has no {MANIFEST_NAME}, so it is not a FramePack bundle directory.")
    try:
        manifest = Manifest.load(path / MANIFEST_NAME)
    except ValueError as e:
        raise BundleError(f"the bundle manifest {MANIFEST_NAME} in {path} is invalid: {e}") from None
    return manifest, {c: path / c for c in COMPONENTS}


def read_manifest(name_or_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Manifest:
    """The manifest of the bundle `load_bundle` would load, without loading any weights (to check a
    run's settings before a long load); raises `BundleError` as `load_bundle` does."""
    return _locate(name_or_path, cache_dir)[0]


def read_component_config(
    name_or_path: str | os.PathLike, component: str, cache_dir: str | os.PathLike | None = None
) -> dict:
    """The config.json of one component of the bundle `load_bundle` would load, without loading
    any weights; raises `BundleError` (one sentence) when it is missing or invalid."""
    return _read_config(component, _locate(name_or_path, cache_dir)[1][component])


def load_bundle(
    name_or_path: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    cache_dir: str | os.PathLike | None = None,
    vram_budget: str | float | None = None,
    dtypes: Mapping[str, torch.dtype] | None = None,
) -> Bundle:
    """Load a bundle directory or a named bundle (`NAMED_BUNDLES`, from the local hub cache).

    Dtypes follow `component_dtypes(device, dtype)`: fp32 on a CPU, the release's on a GPU.
    `dtypes` sets them per component instead (the names of `Bundle.modules()`; a component left
    out keeps its default): `dtypes=component_dtypes("cuda")` loads the release's GPU dtypes for
    a run on a CPU, as the tests' GPU-dtype tier does.
    With a `vram_budget` (GiB or "auto") the weights load onto the host (`weights_home`; pinned
    for CUDA), shard by shard, and only a run's memory planner moves them onto `device`
    (`Bundle.device` stays `device`); a run without a budget moves them all there.
    Raises `BundleError` (a ValueError) with one sentence naming the failing component.
    """
    try:
        home = weights_home(device, vram_budget)
    except ValueError as e:
        raise BundleError(str(e)) from None
    defaults = component_dtypes(device, dtype)  # the target's dtypes, wherever the weights wait
    unknown = sorted(set(dtypes or ()) - set(defaults))
    if unknown:
        raise BundleError(
            f"dtypes names {unknown[0]!r}, not a component with weights ({', '.join(defaults)})."
        )
    if dtype is not None and dtypes is not None:
        raise BundleError("give one dtype for every component or per-component dtypes, not both.")
    dtypes = {**defaults, **(dtypes or {})}
    manifest, dirs = _locate(name_or_path, cache_dir)
    root = Path(name_or_path) if Path(name_or_path).is_dir() else None
    from ..memory.offload import belongs_on, pin_host

    pin = home != torch.device(device) and torch.device(device).type == "cuda"
    loaded = {}
    for c in COMPONENTS:
        loaded[c] = _load_component(c, dirs[c], dtypes.get(c), home)
        if c in dtypes:
            loaded[c] = loaded[c].to(home).eval().requires_grad_(False)
            if pin:
                pin_host(loaded[c])
    loaded["vae"].use_framewise_encoding = manifest.vae_temporal_tiles  # see Manifest
    loaded["vae"].use_framewise_decoding = manifest.vae_temporal_tiles
    loaded["transformer"].fp32_head = True  # as the release: proj_out runs in fp32 (norm_out does not)
    target = torch.device(device) if home != torch.device(device) else None
    if target is not None:
        for c in ("text_encoder", "text_encoder_2", "image_encoder", "vae"):
            belongs_on(loaded[c], target)  # a run without a budget takes them there
    return Bundle(manifest=manifest, root=root, target=target, **loaded)
