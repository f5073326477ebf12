"""Where a model's files are: a bundle directory, a named bundle (and its download), or the demo model.

A named bundle (`NAMED_BUNDLES`) has its components in the released hub repos and is read from
the local Hugging Face cache: finding one never downloads; `download_bundle` does, once,
explicitly. `read_manifest` and `read_component_config` read what a load would, without loading
any weights; `framepack.pipeline.bundle` loads the weights. With no model given, a run uses the
demo bundle shipped inside the package (`DEFAULT_MODEL`, through `model_or_default`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .manifest import COMPONENTS, MANIFEST_NAME, BundleError, Manifest, read_config

__all__ = [
    "DEFAULT_MODEL",
    "NAMED_BUNDLES",
    "BundleSpec",
    "default_model",
    "download_bundle",
    "download_plan",
    "locate",
    "model_or_default",
    "read_component_config",
    "read_manifest",
]

# The demo bundle shipped inside the package (trained by `framepack.training.demo`).
DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "demo_model"


def default_model() -> Path:
    """The shipped demo bundle; ValueError if this installation lacks it."""
    if not (DEFAULT_MODEL / "framepack.json").is_file():
        raise ValueError(f"no model given and the demo model is missing from {DEFAULT_MODEL}; pass a bundle.")
    return DEFAULT_MODEL


def model_or_default(model: str | os.PathLike | None) -> str:
    """`model` when one is given, else the shipped demo bundle's path (`default_model`; a
    ValueError in one sentence if this installation lacks it)."""
    return str(model) if model else str(default_model())


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
                f"framepack.pipeline.named.download_bundle({name!r}))."
            ) from None
        snapshots[repo] = Path(path)
    return spec.manifest, _component_dirs(spec, snapshots)


def locate(name_or_path: str | os.PathLike, cache_dir) -> tuple[Manifest, dict[str, Path]]:
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
    return locate(name_or_path, cache_dir)[0]


def read_component_config(
    name_or_path: str | os.PathLike, component: str, cache_dir: str | os.PathLike | None = None
) -> dict:
    """The config.json of one component of the bundle `load_bundle` would load, without loading
    any weights; raises `BundleError` (one sentence) when it is missing or invalid."""
    return read_config(component, locate(name_or_path, cache_dir)[1][component])
