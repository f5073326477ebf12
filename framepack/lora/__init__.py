"""LoRAs at inference: read PEFT/diffusers, kohya/musubi-tuner and HunyuanVideo-named files, then
merge them into the transformer or apply them on the fly (removable)."""

from .apply import (
    AttachedLoras,
    LoraDelta,
    applied_loras,
    attach_loras,
    check_lora_spec,
    load_loras,
    lora_specs,
    merge_loras,
    parse_lora_arg,
)
from .formats import Lora, LowRank, lora_targets, read_lora

__all__ = [
    "AttachedLoras",
    "Lora",
    "LoraDelta",
    "LowRank",
    "applied_loras",
    "attach_loras",
    "check_lora_spec",
    "load_loras",
    "lora_specs",
    "lora_targets",
    "merge_loras",
    "parse_lora_arg",
    "read_lora",
]
