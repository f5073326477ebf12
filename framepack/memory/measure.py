"""The peak bytes of live tensors during a block of code, on any device (a CPU included).

`torch.cuda.max_memory_allocated` has no CPU counterpart; `LiveBytes` counts the storages that
ops create inside it (activations, not the weights or inputs made before) and drops each when
the tensor that made it is freed. Views and in-place results add nothing. It checks estimates
such as `offload.vae_decode_bytes` on the CPU.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["LiveBytes"]


class LiveBytes(TorchDispatchMode):
    """`with LiveBytes() as live: ...`, then `live.peak` (bytes)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.sizes: dict[int, int] = {}  # storage address -> bytes

    def _free(self, key: int) -> None:
        self.live -= self.sizes.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {  # storages of the inputs: an output on one of them is a view or an in-place result
            t.untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor)
        }
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t._base is None:
                storage = t.untyped_storage()
                key, n = storage.data_ptr(), storage.nbytes()
                if n and key not in self.sizes and key not in given:  # a new storage
                    self.sizes[key] = n
                    self.live += n
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(t, self._free, key)
        return out
