"""`torch.compile` of the transformer's blocks for a run (`--compile`, issue 20).

Each block class's `forward` is compiled once (`dynamic=True`: token counts may change between
sections and prompts without a recompile) and shared by every block of that class; the block's
weights are inputs of the graph, so weight streaming may swap them between calls. The compiled
call is the innermost hook on each block (`memory.hooks`): streaming and the step caches run
around it as they do around the plain forward, and a skipped block is never called. The first
call of each graph (a class, with or without the last block's readout) compiles it; the time of
the calls that compiled is reported as `compile_seconds`, with the number of graphs. With one
video on several processes (`framepack.parallel`) each block's graph breaks around its attention,
whose all-to-alls run eagerly (`framepack.model.attention.around_attention`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..memory.hooks import HookHandle, add_hook
from ..memory.streaming import blocks_of
from ..model.ops import cpu_has_bf16_units

__all__ = ["CompiledBlocks"]

_FUNCTIONS: dict[type, object] = {}  # block class -> its compiled forward (one per process)


def _compiled(cls: type):
    if cls not in _FUNCTIONS:
        _FUNCTIONS[cls] = torch.compile(cls.forward, dynamic=True)
    return _FUNCTIONS[cls]


@dataclass
class CompiledBlocks:
    """The compiled forwards attached to a model's blocks (`attach` / `detach`)."""

    model: nn.Module
    compile_seconds: float = 0.0  # wall time of the calls that compiled a graph
    graphs: int = 0  # graphs compiled during this run (0 when an earlier run compiled them)
    handles: list[HookHandle] = field(default_factory=list)

    priority = -1000  # innermost, below every other hook (a step cache puts its block-0 hook at -p)

    def attach(self) -> CompiledBlocks:
        cpu_has_bf16_units()  # read before tracing: the compiled graphs see a constant
        for block in blocks_of(self.model):
            self.handles.append(add_hook(block, self))
        return self

    def __call__(self, module: nn.Module, forward, *args, **kwargs):
        before = _graphs()
        start = time.perf_counter()
        out = _compiled(type(module))(module, *args, **kwargs)
        if _graphs() > before:  # this call compiled a graph: its time is the compile's
            self.compile_seconds += time.perf_counter() - start
            self.graphs += _graphs() - before
        return out

    def info(self) -> dict:
        return {"compile_seconds": round(self.compile_seconds, 2), "graphs_compiled": self.graphs}

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def _graphs() -> int:
    """Graphs dynamo has compiled in this process (its own counter)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]
