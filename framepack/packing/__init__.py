"""Context packing (FramePack paper, section 3): schedules, token arithmetic, layouts and RoPE tables."""

from .layout import ORDERS, SectionLayout, forward_layout, gather_history, gather_tail, inverted_layout
from .rope import pad_replicate, pooled_rope_tables, rope_tables
from .schedule import (
    K1,
    K2,
    K4,
    K8,
    PRESETS,
    TAILS,
    Group,
    Kernel,
    PackingSchedule,
    frame_tokens,
    get_schedule,
)

__all__ = [
    "K1",
    "K2",
    "K4",
    "K8",
    "ORDERS",
    "PRESETS",
    "TAILS",
    "Group",
    "Kernel",
    "PackingSchedule",
    "SectionLayout",
    "forward_layout",
    "frame_tokens",
    "gather_history",
    "gather_tail",
    "get_schedule",
    "inverted_layout",
    "pad_replicate",
    "pooled_rope_tables",
    "rope_tables",
]
