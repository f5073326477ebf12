"""The optimiser of a training run: AdamW over the trained parameters, its learning-rate schedule,
and its state keyed by parameter name (what a checkpoint stores, so that it holds no pickle and
loads into a run whose parameters are ordered or sharded otherwise)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn

from .config import TrainConfig

__all__ = ["build_optimizer", "lr_at", "optimizer_state", "load_optimizer_state"]


def build_optimizer(
    trainable: dict[str, torch.nn.Parameter], cfg: TrainConfig
) -> tuple[torch.optim.AdamW, list[str]]:
    """AdamW over `trainable` (no weight decay on biases and norms), and the name of each of its
    parameters in the optimiser's order."""
    decay = [p for p in trainable.values() if p.ndim >= 2]  # no decay on biases and norms
    rest = [p for p in trainable.values() if p.ndim < 2]
    groups = [{"params": decay}, {"params": rest, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=cfg.lr,
        betas=cfg.betas,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
    )
    names = {id(p): n for n, p in trainable.items()}
    return optimizer, [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate of step `step` (0-based): linear warm-up, then constant or cosine to 0."""
    factor = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    if cfg.lr_schedule == "cosine":
        span = max(1, cfg.steps - cfg.warmup_steps)
        progress = min(1.0, max(0.0, (step - cfg.warmup_steps) / span))
        factor *= 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr * factor


def optimizer_state(
    optimizer: torch.optim.Optimizer, names: list[str], fsdp: nn.Module | None = None
) -> tuple[dict[str, torch.Tensor], dict]:
    """The optimiser state split into tensors (`name/key`) and JSON (groups, scalars), by parameter
    name; `names` are the parameters' in the optimiser's order. With `fsdp` (the sharded module)
    the full state is gathered from every rank (a collective; rank 0 gets it, the others none)."""
    if fsdp is not None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        sd = get_optimizer_state_dict(fsdp, optimizer, options=opts)
        rename = lambda k: k.removeprefix("transformer.")  # noqa: E731
    else:
        sd = optimizer.state_dict()
        rename = names.__getitem__
    tensors, scalars = {}, {}
    for key, entry in sd.get("state", {}).items():  # empty off rank 0 under FSDP
        for stat, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{rename(key)}/{stat}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(rename(key), {})[stat] = value
    groups = [{**g, "params": [rename(p) for p in g["params"]]} for g in sd.get("param_groups", [])]
    return tensors, {"param_groups": groups, "scalars": scalars}


def load_optimizer_state(
    optimizer: torch.optim.Optimizer,
    names: list[str],
    state: dict[str, dict],
    groups: list[dict],
    source: Path,
    fsdp: nn.Module | None = None,
) -> None:
    """Load the per-name `state` and param `groups` (read from the checkpoint `source`) into
    `optimizer`, whose parameters are `names` (or, with `fsdp`, the sharded module's)."""
    if fsdp is not None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        prefixed = {
            "state": {f"transformer.{n}": s for n, s in state.items()},
            "param_groups": [{**g, "params": [f"transformer.{p}" for p in g["params"]]} for g in groups],
        }
        opts = StateDictOptions(full_state_dict=True)
        set_optimizer_state_dict(fsdp, optimizer, prefixed, options=opts)
        return
    index = {n: i for i, n in enumerate(names)}
    missing = [n for g in groups for n in g["params"] if n not in index]
    if missing:
        raise ValueError(f"the optimiser state in {source} names {missing[0]!r}, which is not trained now.")
    optimizer.load_state_dict(
        {
            "state": {index[n]: s for n, s in state.items()},
            "param_groups": [{**g, "params": [index[p] for p in g["params"]]} for g in groups],
        }
    )
