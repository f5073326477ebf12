"""Reading LoRA files in the formats people have on disk, keyed by this model's layer names.

A LoRA (Hu et al. 2021, arXiv 2106.09685) updates a Linear weight `W (out, in)` by
`scale * up @ down` with `down (r, in)` and `up (out, r)`; `scale = alpha / r`. Recognised:

- PEFT / diffusers: `<prefix>.<module>.lora_A[.<adapter>].weight` (down) and `lora_B` (up), the
  prefix `base_model.model.` (PEFT, and our own training's `lora/` folder), `transformer.` (diffusers)
  or `diffusion_model.` (musubi-tuner's "other" format). The scale comes from a sibling
  `adapter_config.json` (`lora_alpha / r`, or `/ sqrt(r)` with rsLoRA), else from `.alpha` keys,
  else 1 (diffusers stores no alpha).
- kohya / musubi-tuner: `lora_unet_<module with dots as underscores>.lora_down.weight`,
  `.lora_up.weight` and `.alpha` (scale `alpha / r`; 1 when absent). FramePack LoRAs trained by
  musubi-tuner name the diffusers modules (`lora_unet_transformer_blocks_0_attn_to_q`,
  `lora_unet_single_transformer_blocks_0_proj_mlp`, ...).
- The original HunyuanVideo names (`double_blocks_N_img_attn_qkv`, `single_blocks_N_linear1`, ...),
  in either of the above spellings: fused projections are split by rows of `up` onto the
  diffusers layers (`to_q`/`to_k`/`to_v`, and `proj_mlp` for `linear1`).

Only the Linear layers of the dual- and single-stream blocks take LoRAs.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

__all__ = ["LowRank", "Lora", "read_lora", "lora_targets"]

_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.", "lora_unet_")
_BLOCKS = re.compile(r"(?:transformer_blocks|single_transformer_blocks)\.\d+\.")
_KEY = re.compile(r"(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_down|lora_up)(?:\.[^.]+)?\.weight")
_ALPHA = re.compile(r"(?P<module>.+)\.alpha")

# Original HunyuanVideo layer (underscore spelling, after the block) -> diffusers layers, in the
# order their outputs are stacked in the fused weight.
_HUNYUAN_DOUBLE = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn_proj": ("attn.to_out.0",),
    "img_mlp_fc1": ("ff.net.0.proj",),
    "img_mlp_fc2": ("ff.net.2",),
    "img_mod_linear": ("norm1.linear",),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn_proj": ("attn.to_add_out",),
    "txt_mlp_fc1": ("ff_context.net.0.proj",),
    "txt_mlp_fc2": ("ff_context.net.2",),
    "txt_mod_linear": ("norm1_context.linear",),
}
_HUNYUAN_SINGLE = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation_linear": ("norm.linear",),
}
_HUNYUAN = re.compile(r"(?P<kind>double|single)_blocks_(?P<n>\d+)_(?P<layer>\w+)")


@dataclass(frozen=True)
class LowRank:
    """One layer's update `scale * up @ down`: `down (r, in)`, `up (out, r)`, `scale = alpha / r`."""

    down: torch.Tensor
    up: torch.Tensor
    scale: float

    def delta(self) -> torch.Tensor:
        """The dense update `(out, in)` in fp32."""
        return (self.up.float() @ self.down.float()) * self.scale


@dataclass(frozen=True)
class Lora:
    """A LoRA file read for one model: its updates by the model's layer names."""

    path: str
    layers: dict[str, LowRank]

    @property
    def name(self) -> str:
        return Path(self.path).name


def lora_targets(model: nn.Module) -> dict[str, nn.Linear]:
    """The Linear layers of `model` that take LoRAs (those of the transformer blocks), by name."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and _BLOCKS.match(name) and ".lora" not in name
    }


def _files(path: Path) -> tuple[Path, dict | None]:
    """The weights file and the PEFT adapter config next to it (if any)."""
    if path.is_dir():
        if (path / "lora" / "adapter_model.safetensors").is_file():  # a checkpoint of our training
            path = path / "lora"
        found = sorted(path.glob("*.safetensors"))
        if len(found) != 1:
            raise ValueError(
                f"the LoRA folder {path} must hold exactly one .safetensors file, found {len(found)}."
            )
        path = found[0]
    config_path = path.parent / "adapter_config.json"
    config = None
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text())
        except (OSError, json.JSONDecodeError):
            raise ValueError(f"the LoRA config {config_path} is not readable JSON.") from None
    return path, config


def _load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if path.suffix != ".safetensors":
        raise ValueError(f"the LoRA {path} is not a .safetensors file (pickle files are never opened).")
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise ValueError(f"the LoRA {path} is not a readable safetensors file ({e}).") from None


def _strip(module: str) -> str:
    for prefix in _PREFIXES:
        if module.startswith(prefix):
            return module[len(prefix) :]
    return module


def _resolve(module: str, names: dict[str, str]) -> list[str] | None:
    """Model layer names for a file's module name (several for fused HunyuanVideo layers)."""
    key = _strip(module).replace(".", "_")
    if key in names:
        return [names[key]]
    m = _HUNYUAN.fullmatch(key)
    if m:
        table = _HUNYUAN_DOUBLE if m["kind"] == "double" else _HUNYUAN_SINGLE
        block = "transformer_blocks" if m["kind"] == "double" else "single_transformer_blocks"
        if m["layer"] in table:
            return [f"{block}.{m['n']}.{layer}" for layer in table[m["layer"]]]
    return None


def _config_scale(config: dict | None, rank: int) -> float | None:
    if not config or "lora_alpha" not in config:
        return None
    root = math.sqrt(rank) if config.get("use_rslora") else rank
    return float(config["lora_alpha"]) / root


def read_lora(path: str | os.PathLike, model: nn.Module) -> Lora:
    """Read the LoRA at `path` (a .safetensors file or a PEFT folder) for `model`.

    Every update must find a block Linear layer of `model` with matching shapes; otherwise a
    ValueError says, in one sentence, which key and why.
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"the LoRA {path} does not exist.")
    weights, config = _files(path)
    state = _load(weights)
    if not state:
        raise ValueError(f"the LoRA {path} holds no tensors.")
    targets = lora_targets(model)
    names = {name.replace(".", "_"): name for name in targets}

    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        m = _KEY.fullmatch(key) or _ALPHA.fullmatch(key)
        if m is None:
            raise ValueError(
                f"the LoRA {path} has the key {key!r}, which is not a LoRA weight "
                "(lora_A/lora_B, lora_down/lora_up or alpha)."
            )
        kind = m.groupdict().get("kind") or "alpha"
        kind = {"lora_A": "down", "lora_down": "down", "lora_B": "up", "lora_up": "up"}.get(kind, kind)
        parts.setdefault(m["module"], {})[kind] = tensor

    layers: dict[str, LowRank] = {}
    for module, found in parts.items():
        if "down" not in found or "up" not in found:
            missing = "down (lora_A)" if "down" not in found else "up (lora_B)"
            raise ValueError(f"the LoRA {path} has no {missing} weight for {module!r}.")
        down, up = found["down"], found["up"]
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            raise ValueError(
                f"the LoRA {path} has mismatched shapes for {module!r}: up {tuple(up.shape)}, "
                f"down {tuple(down.shape)} (expected (out, r) and (r, in))."
            )
        rank = down.shape[0]
        if "alpha" in found:
            scale = float(found["alpha"]) / rank
        else:
            scale = _config_scale(config, rank) or 1.0
        resolved = _resolve(module, names)
        if resolved is None or any(n not in targets for n in resolved):
            raise ValueError(
                f"the LoRA {path} has weights for {module!r}, which matches no layer of the "
                "transformer blocks of this model."
            )
        outs = [targets[n].out_features for n in resolved]
        if sum(outs) != up.shape[0] or any(targets[n].in_features != down.shape[1] for n in resolved):
            raise ValueError(
                f"the LoRA {path} updates {module!r} as ({up.shape[0]}, {down.shape[1]}), but the model's "
                f"layer is ({sum(outs)}, {targets[resolved[0]].in_features}); is it for another model?"
            )
        for name, rows in zip(resolved, up.split(outs), strict=True):
            if name in layers:
                raise ValueError(f"the LoRA {path} updates the layer {name} twice.")
            layers[name] = LowRank(down, rows, scale)
    return Lora(str(path), layers)
