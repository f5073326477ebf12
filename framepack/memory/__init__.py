"""Device memory: plans of what stays on the device, weight streaming, hooks from outside the model.

`framepack.memory.runtime.accelerate` is what the pipeline calls (streaming + a step cache).
"""

from .hooks import HookHandle, add_hook, hooks_of
from .streaming import (
    GIB,
    ByteLedger,
    MemoryPlan,
    WeightStreamer,
    blocks_of,
    budget_bytes,
    parse_budget,
    plan_memory,
)

__all__ = [
    "GIB",
    "ByteLedger",
    "HookHandle",
    "MemoryPlan",
    "WeightStreamer",
    "add_hook",
    "blocks_of",
    "budget_bytes",
    "hooks_of",
    "parse_budget",
    "plan_memory",
]
