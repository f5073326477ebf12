"""Device memory: plans of what stays on the device, weight streaming, hooks from outside the model.

`framepack.memory.runtime.place_weights` streams the transformer's weights under a budget;
`framepack.memory.offload` brings the encoders and the VAE under the same budget. Composing them
with a step cache for one run is `framepack.pipeline.speed`'s (this package imports nothing above it).
"""

from .budgets import GIB, budget_bytes, parse_budget
from .hooks import HookHandle, add_hook, hooks_of
from .offload import Offloader, on_device, plan_offload
from .streaming import ByteLedger, MemoryPlan, WeightStreamer, blocks_of, plan_memory

__all__ = [
    "GIB",
    "ByteLedger",
    "HookHandle",
    "MemoryPlan",
    "Offloader",
    "WeightStreamer",
    "add_hook",
    "blocks_of",
    "budget_bytes",
    "hooks_of",
    "on_device",
    "parse_budget",
    "plan_memory",
    "plan_offload",
]
