"""Hooks around a module's `forward`, attached from outside the model (no class swapping).

A hook is a callable `hook(module, forward, *args, **kwargs)` that may run code before and after
calling `forward(*args, **kwargs)`, change its inputs or output, or skip it altogether (a step
cache returns a cached result; weight streaming then never loads the skipped block). Hooks are
kept in a list on the instance and the instance's `forward` attribute chains them; removing the
last hook deletes that attribute, so the module is exactly as before. Hooks with a higher
`priority` run outside those with a lower one, whatever the order they were attached in.

What one run attached to a model (its weight streaming and step cache, `framepack.pipeline.speed`)
is recorded on the model with `record_attached`, so that `release` detaches it before the next run
plans the model's memory, whichever layer plans it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch.nn as nn

__all__ = ["Hook", "HookHandle", "add_hook", "forget_attached", "hooks_of", "record_attached", "release"]

_HOOKS = "_framepack_hooks"
_ATTACHED = "_framepack_accelerated"

Hook = Callable[..., object]


class HookHandle:
    """Removes one hook from one module (idempotent)."""

    def __init__(self, module: nn.Module, hook: Hook) -> None:
        self.module, self.hook = module, hook

    def remove(self) -> None:
        hooks = self.module.__dict__.get(_HOOKS)
        if hooks is None or self.hook not in hooks:
            return
        hooks.remove(self.hook)
        if not hooks:
            del self.module.__dict__[_HOOKS]
            del self.module.__dict__["forward"]


def hooks_of(module: nn.Module) -> list[Hook]:
    """The hooks attached to `module`, innermost first."""
    return list(module.__dict__.get(_HOOKS, ()))


def add_hook(module: nn.Module, hook: Hook) -> HookHandle:
    """Run `hook` around every call of `module` (see the module docstring); returns its handle."""
    hooks = module.__dict__.get(_HOOKS)
    if hooks is None:
        if "forward" in module.__dict__:
            raise ValueError(f"{type(module).__name__} already has an instance-level forward.")
        hooks = module.__dict__[_HOOKS] = []
        original = type(module).forward.__get__(module)

        def forward(*args, **kwargs):
            call = original
            for h in module.__dict__[_HOOKS]:  # innermost first
                call = functools.partial(h, module, call)
            return call(*args, **kwargs)

        module.__dict__["forward"] = forward
    hooks.append(hook)
    hooks.sort(key=lambda h: getattr(h, "priority", 0))  # stable: equal priorities keep their order
    return HookHandle(module, hook)


def record_attached(model: nn.Module, run) -> None:
    """Record `run` (anything with a `detach()` that ends with `forget_attached(model)`) as what
    is attached to `model`, for `release`."""
    model.__dict__[_ATTACHED] = run


def forget_attached(model: nn.Module) -> None:
    """Drop the record of `record_attached` (what it recorded has been detached)."""
    model.__dict__.pop(_ATTACHED, None)


def release(model: nn.Module) -> None:
    """Detach whatever a run attached to `model` (`record_attached`): it gets back the very weights
    it had before, where it had them (`WeightStreamer.detach`)."""
    previous = model.__dict__.get(_ATTACHED)
    if previous is not None:
        previous.detach()
