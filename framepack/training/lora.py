"""LoRA adapters (Hu et al. 2021, arXiv 2106.09685) on the packed transformer, through PEFT.

Adapters go on the Linear layers of the dual- and single-stream blocks whose names end in one of
the targets. They are saved in PEFT's on-disk format (`adapter_model.safetensors` with keys
`base_model.model.<module>.lora_A.weight`, and `adapter_config.json`). Trained parameters that are
not adapters (the projection of a history kernel added for training) are stored in the same file
under `base_model.model.<name>`, so one folder restores everything. `merge_state` folds the
adapters into plain weights, `W + (alpha / r) B A`, giving a state dict in the transformer layout.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
import torch.nn as nn

from ..packing.schedule import Kernel

__all__ = [
    "ADAPTER_WEIGHTS",
    "ADAPTER_CONFIG",
    "add_lora",
    "lora_layers",
    "probe_calls",
    "adapter_state",
    "save_adapter",
    "load_lora",
    "load_adapter_weights",
    "read_adapter",
    "merge_state",
]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_PREFIX = "base_model.model."
_ADAPTER = "default"
_BLOCKS = r"(?:transformer_blocks|single_transformer_blocks)\.\d+\."


def _target_pattern(targets: Iterable[str]) -> str:
    """A PEFT `target_modules` regex: block Linear layers whose name ends in one of `targets`."""
    names = "|".join(re.escape(t) for t in targets)
    return rf"{_BLOCKS}(?:.*\.)?(?:{names})"


def add_lora(
    model: nn.Module,
    rank: int,
    alpha: float,
    targets: Iterable[str],
    dropout: float = 0.0,
    seed: int = 0,
) -> nn.Module:
    """Inject LoRA adapters into `model` in place (B = 0, so the model's output is unchanged).

    Only the adapters require grad afterwards. Raises ValueError when no layer matches `targets`.
    """
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=_target_pattern(targets)
    )
    model.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):  # A's random init, reproducibly
        torch.manual_seed(seed)
        try:
            inject_adapter_in_model(config, model, adapter_name=_ADAPTER)
        except ValueError:
            raise ValueError(
                f"no Linear layer of the transformer blocks matches lora_targets {list(targets)}."
            ) from None
    return model


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The adapted layers of `model`, by module name."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def probe_calls(model: nn.Module) -> Callable[[], None]:
    """Hooks counting calls of each adapted layer of `model`; the returned check removes them and
    raises a ValueError (one sentence) if a layer was never called: its adapter would not train."""
    counts = {}
    handles = []
    for name, module in lora_layers(model).items():
        counts[name] = 0
        handles.append(module.register_forward_hook(lambda *_, n=name: counts.__setitem__(n, counts[n] + 1)))

    def check() -> None:
        for h in handles:
            h.remove()
        silent = [n for n, k in counts.items() if k == 0]
        if silent:
            raise ValueError(
                f"the layer {silent[0]} is read as a raw weight, not called, so an adapter on it would "
                "not train; remove it from lora_targets."
            )

    return check


def adapter_state(trained: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Trained parameters (model names) in PEFT's file naming (adapter name dropped, prefix added)."""
    return {_PREFIX + name.replace(f".{_ADAPTER}.", "."): t for name, t in trained.items()}


def _model_names(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT file keys back to this model's parameter names."""
    out = {}
    for key, tensor in state.items():
        name = key[len(_PREFIX) :] if key.startswith(_PREFIX) else key
        name = re.sub(r"\.(lora_[AB])\.", rf".\1.{_ADAPTER}.", name)
        out[name] = tensor
    return out


def save_adapter(directory: str | os.PathLike, trained: Mapping[str, torch.Tensor], settings: dict) -> Path:
    """Write `trained` parameters and the LoRA settings (`r`, `lora_alpha`, `lora_dropout`, `targets`)."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in adapter_state(trained).items()}
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = LoraConfig(
        r=settings["r"],
        lora_alpha=settings["lora_alpha"],
        lora_dropout=settings["lora_dropout"],
        target_modules=_target_pattern(settings["targets"]),
    ).to_dict()
    config["framepack_targets"] = list(settings["targets"])
    text = json.dumps(config, indent=2, default=lambda v: sorted(v) if isinstance(v, set) else str(v))
    (out / ADAPTER_CONFIG).write_text(text + "\n")
    return out


def read_adapter(directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The adapter config and the stored tensors under this model's parameter names."""
    from safetensors.torch import load_file

    try:
        config = json.loads((directory / ADAPTER_CONFIG).read_text())
        state = load_file(str(directory / ADAPTER_WEIGHTS))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{directory} is not a readable LoRA adapter folder ({type(e).__name__}).") from None
    return config, _model_names(state)


def _targets_of(config: dict) -> list[str]:
    targets = config.get("framepack_targets")
    if not targets:
        raise ValueError("the adapter_config.json was not written by framepack (no framepack_targets).")
    return list(targets)


def load_lora(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Add the adapters saved in `directory` to a loaded base `model` (in place) and fill them.

    History-kernel projections stored with the adapters are added to the model first, their kernel
    read from the weight's shape. Every stored tensor must find its parameter.
    """
    directory = Path(directory)
    config, state = read_adapter(directory)
    for name, tensor in state.items():
        m = re.fullmatch(r"clean_x_embedder\.(proj\w*)\.weight", name)
        if m and not hasattr(model.clean_x_embedder, m.group(1)):
            model.add_history_kernel(Kernel(*tensor.shape[2:]).name)
    add_lora(model, config["r"], config["lora_alpha"], _targets_of(config), config.get("lora_dropout", 0.0))
    _fill(model, state, directory)
    return model


def load_adapter_weights(model: nn.Module, directory: str | os.PathLike) -> None:
    """Copy the tensors saved in `directory` into a model that already has the same adapters."""
    _, state = read_adapter(Path(directory))
    _fill(model, state, Path(directory))


def _fill(model: nn.Module, state: Mapping[str, torch.Tensor], directory: Path) -> None:
    params = dict(model.named_parameters())
    unknown = [n for n in state if n not in params]
    if unknown:
        raise ValueError(f"the adapter in {directory} has {unknown[0]!r}, which this model lacks.")
    with torch.no_grad():
        for name, tensor in state.items():
            if params[name].shape != tensor.shape:
                raise ValueError(
                    f"the adapter tensor {name} has shape {tuple(tensor.shape)}, "
                    f"the model expects {tuple(params[name].shape)}."
                )
            params[name].copy_(tensor)


def merge_state(state: Mapping[str, torch.Tensor], settings: dict) -> dict[str, torch.Tensor]:
    """A LoRA model's full state dict folded into the plain transformer layout.

    `state` has PEFT's in-model names (`X.base_layer.weight`, `X.lora_A.default.weight`, ...);
    the result has `X.weight = base + (alpha / r) * B @ A` and no adapter keys.
    """
    scale = settings["lora_alpha"] / (
        math.sqrt(settings["r"]) if settings.get("use_rslora") else settings["r"]
    )
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if f".lora_A.{_ADAPTER}." in key or f".lora_B.{_ADAPTER}." in key:
            continue
        out[key.replace(".base_layer.", ".")] = tensor
    for key, a in state.items():
        if not key.endswith(f".lora_A.{_ADAPTER}.weight"):
            continue
        module = key[: -len(f".lora_A.{_ADAPTER}.weight")]
        b = state[f"{module}.lora_B.{_ADAPTER}.weight"]
        weight = out[f"{module}.weight"]
        delta = (b.float() @ a.float()) * scale  # (out, r) @ (r, in)
        out[f"{module}.weight"] = (weight.float() + delta).to(weight.dtype)
    return out
