"""The checkpoint folders of a training run, `output/checkpoint-<step>`, written and read back.

A checkpoint holds no pickle: the weights in the `load_transformer` layout (`transformer/`, and
`transformer_ema/`) or as PEFT adapters (`lora/`, `lora_ema/`, and the merged `transformer/` at the
end), the optimiser state as safetensors plus JSON, the +D codebook, and `trainer_state.json`
(step, config, order, schedule, world size, rank digests), written last: a folder without it is
incomplete and never resumed from.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import torch

from ..model import load_transformer, save_transformer
from . import lora as lora_lib
from .config import RESUMABLE_CHANGES, TrainConfig

__all__ = [
    "STATE_NAME",
    "OPTIMIZER_NAME",
    "CODEBOOK_NAME",
    "STATE_FORMAT",
    "CheckpointContents",
    "latest_checkpoint",
    "read_state",
    "check_resume",
    "write_checkpoint",
    "prune_checkpoints",
    "read_optimizer",
    "read_ema",
]

STATE_NAME = "trainer_state.json"
OPTIMIZER_NAME = "optimizer.safetensors"
CODEBOOK_NAME = "codebook.safetensors"
STATE_FORMAT = "framepack-train-state/1"
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")


def latest_checkpoint(output: str | os.PathLike) -> Path | None:
    """The complete `checkpoint-<step>` folder with the highest step in `output`, or None."""
    found = []
    root = Path(output)
    if root.is_dir():
        for p in root.iterdir():
            m = _CHECKPOINT.fullmatch(p.name)
            if m and (p / STATE_NAME).is_file():
                found.append((int(m.group(1)), p))
    return max(found)[1] if found else None


def read_state(checkpoint: Path) -> dict:
    """The `trainer_state.json` of `checkpoint`; ValueError (one sentence) when it cannot be read."""
    try:
        return json.loads((checkpoint / STATE_NAME).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{checkpoint / STATE_NAME} cannot be read ({type(e).__name__}).") from None


def check_resume(checkpoint: Path, config: TrainConfig, output: Path) -> None:
    """ValueError (one sentence) when `config` changes a setting of the run in `output` that a
    resumed run must keep (all but `RESUMABLE_CHANGES`)."""
    saved = read_state(checkpoint).get("config", {})
    for key, value in config.to_dict().items():
        if key not in RESUMABLE_CHANGES and key in saved and saved[key] != value:
            raise ValueError(
                f"{output} holds a run with {key} = {saved[key]!r} but this config has {value!r}; "
                "resume with the same setting or use another output folder."
            )


class _Weights:
    """What `save_transformer` reads from a model (`config`, `state_dict()`), for a gathered state."""

    def __init__(self, config, state: dict[str, torch.Tensor]) -> None:
        self.config, self._state = config, state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state


@dataclass
class CheckpointContents:
    """Everything one checkpoint folder holds, as CPU tensors and JSON values."""

    model_config: object  # the transformer's config
    weights: dict[str, torch.Tensor]  # the full state, or in LoRA mode only the trained parameters
    trainable: Collection[str]  # the trained parameters' names
    lora_settings: dict | None  # the adapters' settings in LoRA mode, else None
    merge: bool  # LoRA mode: also write the merged `transformer/` (`weights` is the full state then)
    ema: dict[str, torch.Tensor] | None
    optimizer_tensors: dict[str, torch.Tensor]
    info: dict  # `trainer_state.json` but its format: step, config, order, schedule, ...
    codebook: torch.Tensor | None = None


def write_checkpoint(folder: Path, contents: CheckpointContents) -> None:
    """Write `folder` atomically: into a hidden temporary folder beside it, then renamed."""
    from safetensors.torch import save_file

    tmp = folder.parent / f".{folder.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _write_weights(tmp, contents)
    save_file(contents.optimizer_tensors, str(tmp / OPTIMIZER_NAME), metadata={"format": "pt"})
    if contents.codebook is not None:
        save_file({"codebook": contents.codebook.contiguous()}, str(tmp / CODEBOOK_NAME))
    info = {"format": STATE_FORMAT, **contents.info}
    (tmp / STATE_NAME).write_text(json.dumps(info, indent=2, default=str) + "\n")  # written last
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def _write_weights(tmp: Path, c: CheckpointContents) -> None:
    settings, state = c.lora_settings, c.weights
    if settings is not None:
        lora_lib.save_adapter(tmp / "lora", {n: state[n] for n in c.trainable}, settings)
        if c.ema is not None:
            lora_lib.save_adapter(tmp / "lora_ema", c.ema, settings)
        if c.merge:
            merged = lora_lib.merge_state(state, settings)
            save_transformer(_Weights(c.model_config, merged), tmp / "transformer")
    else:
        save_transformer(_Weights(c.model_config, state), tmp / "transformer")
        if c.ema is not None:
            save_transformer(_Weights(c.model_config, {**state, **c.ema}), tmp / "transformer_ema")


def prune_checkpoints(output: Path, keep: int) -> None:
    """Delete all but the `keep` newest checkpoint folders of `output` (0 keeps every one)."""
    if not keep:
        return
    found = sorted((int(m.group(1)), p) for p in output.iterdir() if (m := _CHECKPOINT.fullmatch(p.name)))
    for _, path in found[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def read_optimizer(checkpoint: Path, meta: dict) -> tuple[dict[str, dict], list[dict]]:
    """(state by parameter name, param groups) of the optimiser saved in `checkpoint`, whose JSON
    part `meta` is the `optimizer` entry of its `trainer_state.json`."""
    from safetensors.torch import load_file

    tensors = load_file(str(checkpoint / OPTIMIZER_NAME))
    state: dict = {}
    for key, value in tensors.items():
        name, _, stat = key.rpartition("/")
        state.setdefault(name, {})[stat] = value
    for name, entries in meta["scalars"].items():
        state.setdefault(name, {}).update(entries)
    groups = [{**g, "betas": tuple(g["betas"])} for g in meta["param_groups"]]
    return state, groups


def read_ema(checkpoint: Path, lora: bool) -> dict[str, torch.Tensor]:
    """The EMA weights saved in `checkpoint`: the adapters' in LoRA mode, else the full model's."""
    if lora:
        return lora_lib.read_adapter(checkpoint / "lora_ema")[1]
    return load_transformer(checkpoint / "transformer_ema", dtype=torch.float32).state_dict()
