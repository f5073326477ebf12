"""The training config: one frozen dataclass, read from a TOML or YAML file (see docs/training.md).

Every key is validated here, at the edge; a bad value or an unknown key is one `ValueError`
sentence. Paths in a config file are relative to the file's folder.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "TrainConfig",
    "load_config",
    "DEFAULT_LORA_TARGETS",
    "RESUMABLE_CHANGES",
]

ORDERS = ("inverted", "forward")
MODES = ("full", "lora")
SIGMA_SAMPLING = ("shifted-uniform", "logit-normal")
AUTOCAST = ("auto", "bf16", "none")
POSITIONS = ("slots", "any")
LR_SCHEDULES = ("constant", "cosine")

# Linear layers the blocks call as modules (an adapter on them takes effect). The MLP layers
# (`proj_mlp`, `proj_out`, `ff.net.*`) are read as raw weights by the fused MLP, so they are not here.
DEFAULT_LORA_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
)

# Keys a resumed run may change: they do not alter the trajectory of the weights.
RESUMABLE_CHANGES = frozenset(
    {
        "data",
        "output",
        "steps",
        "checkpoint_every",
        "keep_checkpoints",
        "log_every",
        "progress",
        "device",
        "fsdp",
        "gradient_checkpointing",
        "merge_lora",
    }
)


def _fail(key: str, what: str, value: Any) -> ValueError:
    return ValueError(f"config key {key!r} must be {what}, got {value!r}.")


def _int(key: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _fail(key, f"an integer of at least {low}", value)
    return value


def _float(key: str, value: Any, low: float, high: float = math.inf, low_open: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value > high or value < low or (low_open and value == low):
        side = ">" if low_open else ">="
        bound = f"{side} {low:g}" + ("" if high == math.inf else f" and <= {high:g}")
        raise _fail(key, f"a number {bound}", value)
    return float(value)


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise _fail(key, f"one of {', '.join(choices)}", value)
    return value


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(key, "true or false", value)
    return value


def _str(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _fail(key, "a non-empty string", value)
    return value.strip()


def _strings(key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise _fail(key, "a list of strings", value)
    return tuple(_str(key, v) for v in value)


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of one training run; docs/training.md explains each key."""

    data: str  # latent cache folder written by `framepack prepare`
    output: str  # run folder: checkpoints, loss log, codebook
    model: str = "tiny"  # a bundle or transformer folder / file, or a spec name to train from scratch
    config_overrides: Mapping[str, Any] = field(default_factory=dict)  # spec changes (from scratch)
    order: str | None = None  # inverted | forward; None: the bundle's, else inverted
    schedule: str | None = None  # packing schedule; None: the bundle's, else the order's preset
    window: int | None = None  # latents per section; None: see docs
    positions: str = "slots"  # section positions: multiples of the window, or any offset
    max_blank: int = 3  # most blank padding, in windows (inverted order)
    blank_probability: float = 0.5  # chance of a random (shorter) blank instead of the capped gap
    end_probability: float = 0.0  # chance the clip is cut after a random window (inverted order)
    steps: int = 1000
    batch_size: int = 1  # global, over every process
    lr: float = 1e-4
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float | None = 1.0  # None or 0: no clipping
    seed: int = 0
    shift: float | None = None  # None: the dynamic shift of inference (FRAMEPACK.md section 5)
    sigma_sampling: str = "shifted-uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    distilled_guidance: float | None = None  # None: the bundle's, else 10
    caption_dropout: float = 0.0
    motion_weight: float = 0.0  # extra loss weight where the window differs from the start latent
    mode: str = "full"
    lora_rank: int = 16
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    merge_lora: bool = True
    new_kernels: tuple[str, ...] = ()
    discretize: int | None = None  # K codes of the +D history codebook; None: off
    discretize_samples: int = 100_000
    discretize_iters: int = 20
    ema_decay: float | None = None
    gradient_checkpointing: bool = False
    autocast: str = "auto"
    device: str = "auto"
    fsdp: bool = False
    checkpoint_every: int = 500
    keep_checkpoints: int = 3  # 0 keeps every checkpoint
    log_every: int = 10
    progress: bool = True

    def __post_init__(self) -> None:
        def put(key: str, value: Any) -> None:
            object.__setattr__(self, key, value)

        put("data", _str("data", self.data))
        put("output", _str("output", self.output))
        put("model", _str("model", self.model))
        if not isinstance(self.config_overrides, Mapping):
            raise _fail("config_overrides", "a table of transformer config keys", self.config_overrides)
        put("config_overrides", dict(self.config_overrides))
        if self.order is not None:
            _choice("order", self.order, ORDERS)
        if self.schedule is not None:
            put("schedule", _str("schedule", self.schedule))
        if self.window is not None:
            _int("window", self.window, 1)
        _choice("positions", self.positions, POSITIONS)
        _int("max_blank", self.max_blank, 0)
        put("blank_probability", _float("blank_probability", self.blank_probability, 0.0, 1.0))
        put("end_probability", _float("end_probability", self.end_probability, 0.0, 1.0))
        _int("steps", self.steps, 1)
        _int("batch_size", self.batch_size, 1)
        put("lr", _float("lr", self.lr, 0.0, low_open=True))
        _choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _int("warmup_steps", self.warmup_steps, 0)
        put("weight_decay", _float("weight_decay", self.weight_decay, 0.0))
        betas = self.betas
        if isinstance(betas, str) or not isinstance(betas, (list, tuple)) or len(betas) != 2:
            raise _fail("betas", "a list of two numbers in [0, 1)", betas)
        put("betas", tuple(_float("betas", b, 0.0, 0.999999) for b in betas))
        put("eps", _float("eps", self.eps, 0.0, low_open=True))
        if self.grad_clip is not None:  # 0 turns clipping off (TOML has no null)
            clip = _float("grad_clip", self.grad_clip, 0.0)
            put("grad_clip", clip if clip > 0 else None)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise _fail("seed", "an integer from 0 to 2**32 - 1", self.seed)
        if self.shift is not None:
            put("shift", _float("shift", self.shift, 0.0, low_open=True))
        _choice("sigma_sampling", self.sigma_sampling, SIGMA_SAMPLING)
        put("logit_mean", _float("logit_mean", self.logit_mean, -math.inf))
        put("logit_std", _float("logit_std", self.logit_std, 0.0, low_open=True))
        if self.distilled_guidance is not None:
            put("distilled_guidance", _float("distilled_guidance", self.distilled_guidance, 0.0))
        put("caption_dropout", _float("caption_dropout", self.caption_dropout, 0.0, 1.0))
        put("motion_weight", _float("motion_weight", self.motion_weight, 0.0))
        _choice("mode", self.mode, MODES)
        _int("lora_rank", self.lora_rank, 1)
        put("lora_alpha", _float("lora_alpha", self.lora_alpha, 0.0, low_open=True))
        put("lora_dropout", _float("lora_dropout", self.lora_dropout, 0.0, 0.999))
        put("lora_targets", _strings("lora_targets", self.lora_targets))
        if not self.lora_targets:
            raise _fail("lora_targets", "a non-empty list of layer names", self.lora_targets)
        _bool("merge_lora", self.merge_lora)
        put("new_kernels", _strings("new_kernels", self.new_kernels))
        if self.discretize is not None:
            _int("discretize", self.discretize, 2)
        _int("discretize_samples", self.discretize_samples, 2)
        _int("discretize_iters", self.discretize_iters, 0)
        if self.ema_decay is not None:
            put("ema_decay", _float("ema_decay", self.ema_decay, 0.0, 0.999999))
        for key in ("gradient_checkpointing", "fsdp", "progress"):
            _bool(key, getattr(self, key))
        _choice("autocast", self.autocast, AUTOCAST)
        put("device", _str("device", self.device))
        _int("checkpoint_every", self.checkpoint_every, 1)
        _int("keep_checkpoints", self.keep_checkpoints, 0)
        _int("log_every", self.log_every, 1)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (tuples become lists)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base: str | os.PathLike[str] | None = None) -> TrainConfig:
        """Build from a mapping; relative `data`, `output` and `model` paths are taken from `base`."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a training config is a table of keys, got {type(data).__name__}.")
        known = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"config key {key!r} is unknown{hint}; docs/training.md lists the keys.")
        for key in ("data", "output"):
            if key not in data:
                raise ValueError(f"the config needs the key {key!r}; docs/training.md explains it.")
        values = _rebase(data, base) if base is not None else dict(data)
        return cls(**values)


def _rebase(data: Mapping[str, Any], base: str | os.PathLike[str]) -> dict[str, Any]:
    """`data` with relative `data`, `output` and `model` paths taken from the folder `base`."""
    values = dict(data)
    for key in ("data", "output", "model"):
        value = values.get(key)
        if isinstance(value, str) and value.strip():
            path = Path(value.strip()).expanduser()
            candidate = path if path.is_absolute() else Path(base) / path
            # `model` may also be a spec name or a hub id: rebase it only if that path exists.
            if key != "model" or candidate.exists():
                values[key] = str(candidate)
    return values


def _read(path: Path) -> Any:
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"the config {path} cannot be read ({type(e).__name__}).") from None
    if suffix == ".toml":
        import tomllib

        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"the config {path} is not valid TOML ({e}).") from None
    if suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            where = getattr(e, "problem_mark", None)
            line = f" at line {where.line + 1}" if where is not None else ""
            raise ValueError(f"the config {path} is not valid YAML{line}.") from None
        return {} if data is None else data
    raise ValueError(f"the config {path} must be a .toml, .yaml or .yml file.")


def load_config(path: str | os.PathLike[str], overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """Read a TOML or YAML training config; `overrides` replace keys of the file before validation.

    Relative `data`, `output` and `model` paths in the file are taken from the file's folder.
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"the config file {p} does not exist.")
    data = _read(p)
    if not isinstance(data, dict):
        raise ValueError(f"the config {p} must hold a table of keys, not a {type(data).__name__}.")
    data = _rebase(data, p.resolve().parent)
    data.update(overrides or {})  # paths given on the command line stay relative to the working folder
    return TrainConfig.from_dict(data)
