"""Model bundles: every component a generation needs, loaded from one place.

A bundle is a directory in the Hugging Face layout (FRAMEPACK.md section 8; see
`framepack.pipeline.manifest`) or a named bundle whose components live in the released repos,
read from the local Hugging Face cache (`framepack.pipeline.named`). Loading never downloads:
`download_bundle` does, once, explicitly.
Every weight file is safetensors; pickle files are refused and no remote code runs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..io.weights import empty_parameters, file_sources, set_disk_source
from ..memory.budgets import ram_budget_bytes
from .manifest import COMPONENTS, BundleError, Manifest, read_config
from .named import locate

__all__ = [
    "Bundle",
    "component_dtypes",
    "load_bundle",
    "weights_home",
]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
VISITORS = ("text_encoder", "text_encoder_2", "image_encoder", "vae")  # all but the transformer


@dataclass
class Bundle:
    """Every loaded component of a FramePack model (see the module docstring for the layout).

    A bundle loaded with `transformer_only` (a rank that only serves the transformer's calls,
    `framepack.pipeline.ranks`) holds None for the encoders and the VAE.
    """

    manifest: Manifest
    tokenizer: Any  # LLaMA fast tokenizer
    text_encoder: nn.Module | None  # transformers LlamaModel
    tokenizer_2: Any  # CLIP tokenizer
    text_encoder_2: nn.Module | None  # transformers CLIPTextModel
    feature_extractor: Any  # SiglipImageProcessor
    image_encoder: nn.Module | None  # transformers SiglipVisionModel
    vae: nn.Module | None  # diffusers AutoencoderKLHunyuanVideo
    transformer: nn.Module  # framepack.model.PackedTransformer
    root: Path | None = None  # the bundle directory (None for a named bundle)
    target: torch.device | None = None  # where runs compute, when the weights were loaded elsewhere
    from_files: bool = False  # its RAM budget keeps weights in their files (`load_bundle`)

    def visitors(self) -> list[nn.Module]:
        """The modules that visit the device under a budget (`memory.offload`): encoders and VAE."""
        return [m for n, m in self.modules().items() if n in VISITORS]

    def modules(self) -> dict[str, nn.Module]:
        """The loaded components with weights, by name."""
        names = (*VISITORS, "transformer")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

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


def _expect(component: str, found: Any, wanted: tuple[str, ...], what: str) -> None:
    if found not in wanted:
        raise BundleError(f"the {component} component is a {found!r} {what}, expected {' or '.join(wanted)}.")


# Weights no FramePack code path reads, which a checkpoint may leave out (SigLIP's pooling head).
_UNUSED_WEIGHTS = ("head.",)


def _transformers_class(component: str):
    import transformers

    return {
        "text_encoder": transformers.LlamaModel,
        "text_encoder_2": transformers.CLIPTextModel,
        "image_encoder": transformers.SiglipVisionModel,
    }[component]


def _load_transformers_model(
    component: str, directory: Path, model_types: tuple[str, ...], dtype, lazy: bool = False
):
    _check_weights(component, directory)
    _expect(component, read_config(component, directory).get("model_type"), model_types, "model")
    cls = _transformers_class(component)
    if lazy:
        with _loading(component, directory):
            config = cls.config_class.from_pretrained(directory)
            config._attn_implementation = "sdpa"  # what from_pretrained picks on torch >= 2.1.1
            with empty_parameters():
                model = cls(config)
        return _disk_backed(component, model, directory, dtype)
    with _loading(component, directory):
        model, info = cls.from_pretrained(
            directory,
            dtype=dtype,
            use_safetensors=True,
            trust_remote_code=False,
            local_files_only=True,
            output_loading_info=True,
        )
    _check_complete(component, info)
    return model


def _disk_backed(component: str, model: nn.Module, directory: Path, dtype: torch.dtype) -> nn.Module:
    """`model` (built by `empty_parameters`) with every parameter a placeholder read from the
    component's safetensors files (`framepack.io.weights`); checked as `_check_complete` checks."""
    sources = {}
    with _loading(component, directory):
        for path in sorted(directory.glob("*.safetensors")):
            sources |= file_sources(path)
    prefix = getattr(model, "base_model_prefix", "") + "."
    for name, param in list(model.named_parameters()):
        source = sources.get(name, sources.get(prefix + name))
        if source is None:
            if name.startswith(_UNUSED_WEIGHTS):
                continue
            raise BundleError(
                f"the {component} component's checkpoint lacks the weight {name!r}; is it the right model?"
            )
        if source.shape != tuple(param.shape):
            raise BundleError(
                f"the {component} component's {name} has shape {source.shape}, the model expects {tuple(param.shape)}."
            )
        module_name, _, attr = name.rpartition(".")
        set_disk_source(model.get_submodule(module_name), attr, source, dtype or source.stored)
    return model.eval().requires_grad_(False)


def _check_complete(component: str, info: dict) -> None:
    """transformers and diffusers load a checkpoint that lacks weights with only a log line."""
    missing = sorted(k for k in info.get("missing_keys", ()) if not k.startswith(_UNUSED_WEIGHTS))
    if missing:
        what = f"{len(missing)} weights, the first" if len(missing) > 1 else "the weight"
        raise BundleError(
            f"the {component} component's checkpoint lacks {what} {missing[0]!r}; is it the right model?"
        )


def _load_component(
    component: str, directory: Path, dtype: torch.dtype | None, device: torch.device | str, lazy: bool = False
):
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
        return _load_transformers_model(component, directory, ("llama",), dtype, lazy)
    if component == "text_encoder_2":
        return _load_transformers_model(component, directory, ("clip_text_model",), dtype, lazy)
    if component == "image_encoder":
        return _load_transformers_model(component, directory, ("siglip_vision_model",), dtype, lazy)
    if component == "vae":
        from diffusers import AutoencoderKLHunyuanVideo

        _check_weights(component, directory)
        found = read_config(component, directory).get("_class_name")
        _expect(component, found, ("AutoencoderKLHunyuanVideo",), "model")
        if lazy:
            with _loading(component, directory), empty_parameters():
                vae = AutoencoderKLHunyuanVideo.from_config(AutoencoderKLHunyuanVideo.load_config(directory))
            return _disk_backed(component, vae, directory, dtype)
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
            return load_transformer(directory, dtype=dtype, device=device, lazy=lazy)
    raise AssertionError(component)


def weight_bytes(dirs: Mapping[str, Path], dtypes: Mapping[str, torch.dtype | None]) -> int:
    """Bytes the components' weights take in `dtypes` (None: as stored), from the files' headers."""
    total = 0
    for c, dtype in dtypes.items():
        for path in sorted(Path(dirs[c]).glob("*.safetensors")):
            with _loading(c, Path(dirs[c])):
                sources = file_sources(path).values()
            total += sum(s.numel * (dtype.itemsize if dtype else s.stored.itemsize) for s in sources)
    return total


def weights_home(device: torch.device | str, vram_budget: str | float | None) -> torch.device:
    """Where `load_bundle` puts the weights for runs on `device`: the host (CPU) when a VRAM budget
    is set (GiB or "auto"; the planner of `framepack.memory` then moves them), else `device`."""
    from ..memory.budgets import parse_budget

    device = torch.device(device)
    return torch.device("cpu") if parse_budget(vram_budget) is not None else device


def load_bundle(
    name_or_path: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    cache_dir: str | os.PathLike | None = None,
    vram_budget: str | float | None = None,
    dtypes: Mapping[str, torch.dtype] | None = None,
    ram_budget: str | float | None = None,
    lazy: bool = False,
    transformer_only: bool = False,
) -> Bundle:
    """Load a bundle directory or a named bundle (`NAMED_BUNDLES`, from the local hub cache).

    Dtypes follow `component_dtypes(device, dtype)`: fp32 on a CPU, the release's on a GPU.
    `dtypes` sets them per component instead (the names of `Bundle.modules()`; a component left
    out keeps its default): `dtypes=component_dtypes("cuda")` loads the release's GPU dtypes for
    a run on a CPU, as the tests' GPU-dtype tier does.
    With a `vram_budget` (GiB or "auto") the weights load onto the host (`weights_home`; pinned
    for CUDA), shard by shard, and only a run's memory planner moves them onto `device`
    (`Bundle.device` stays `device`); a run without a budget moves them all there.
    With a `ram_budget` (GiB or "auto") smaller than the weights, or any on a CPU, nothing is read: every weight
    stays in its file (`framepack.io.weights`), and each run reads what its plan keeps, block by
    block (`framepack.memory.disk`); `lazy=True` does so whatever the budget (`framepack info`).
    Raises `BundleError` (a ValueError) with one sentence naming the failing component.
    """
    try:
        home = weights_home(device, vram_budget)
        ram = ram_budget_bytes(ram_budget)
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
    manifest, dirs = locate(name_or_path, cache_dir)
    root = Path(name_or_path) if Path(name_or_path).is_dir() else None
    # On a CPU the run's plan under the RAM budget reads in what stays (all of it when it fits).
    on_cpu = torch.device(device).type == "cpu"
    kept = {c: d for c, d in dtypes.items() if not (transformer_only and c in VISITORS)}
    from_files = ram is not None and (on_cpu or weight_bytes(dirs, kept) > ram)
    lazy = lazy or from_files
    if lazy:  # the weights wait in their files; placeholders live on the host
        home = torch.device("cpu")
    from ..memory.offload import belongs_on, pin_host

    pin = home != torch.device(device) and torch.device(device).type == "cuda"
    loaded = dict.fromkeys(VISITORS) if transformer_only else {}
    for c in COMPONENTS:
        if c in loaded:
            continue
        loaded[c] = _load_component(c, dirs[c], dtypes.get(c), home, lazy)
        if c in dtypes:
            loaded[c] = loaded[c].to(home).eval().requires_grad_(False)
            if pin:
                pin_host(loaded[c])
    if loaded["vae"] is not None:
        loaded["vae"].use_framewise_encoding = manifest.vae_temporal_tiles  # see Manifest
        loaded["vae"].use_framewise_decoding = manifest.vae_temporal_tiles
    loaded["transformer"].fp32_head = True  # as the release: proj_out runs in fp32 (norm_out does not)
    target = torch.device(device) if home != torch.device(device) else None
    if target is not None:
        for c in VISITORS:
            if loaded[c] is not None:
                belongs_on(loaded[c], target)  # a run without a budget takes them there
    return Bundle(manifest=manifest, root=root, target=target, from_files=from_files, **loaded)
