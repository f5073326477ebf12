"""Weights in safetensors files: the header reader, and tensors that stay in their files until read.

A `DiskSource` is where one tensor lies in a safetensors file (path, byte offset, stored dtype,
shape). A parameter given one with `set_disk_source` holds a placeholder of its shape and run
dtype that takes no memory (one NaN broadcast, so a use by mistake shows as NaN); `DiskSource.read` fills any tensor from the file, straight into
its bytes when the dtypes match, through a reused scratch buffer when they do not (the same
rounding as `Tensor.to`). `empty_parameters` builds a module whose parameters are placeholders
from the start (buffers, computed at construction, stay real), so a model larger than the host's
memory can be described without ever being held. The memory planner (`framepack.memory.disk`)
decides what is read when.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

__all__ = [
    "FLOAT_DTYPES",
    "CheckpointError",
    "DiskSource",
    "disk_source",
    "empty_parameters",
    "file_sources",
    "header_sources",
    "on_disk",
    "placeholder",
    "read_header",
    "set_disk_source",
]

FLOAT_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_SOURCE = "framepack_disk_source"  # the attribute a disk-backed parameter carries its source in


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message is one sentence for the user."""


def read_header(path: Path) -> tuple[dict, dict, int]:
    """Tensor entries, metadata and data offset of a safetensors file, read from its header alone."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path.name} is empty or truncated (no safetensors header).")
            n = int.from_bytes(head, "little")
            if n <= 0 or n > min(size - 8, 100_000_000):
                if head.startswith(b"version "):
                    raise CheckpointError(
                        f"{path.name} is not a safetensors file but a git-lfs pointer; run `git lfs pull` to fetch the weights."
                    )
                raise CheckpointError(f"{path.name} is not a safetensors file (bad header length).")
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path.name} is not a readable safetensors file ({e}).") from None
    malformed = CheckpointError(f"{path.name} is not a safetensors file (malformed header).")
    if not isinstance(header, dict):
        raise malformed
    meta = header.pop("__metadata__", None) or {}
    end = 0
    for entry in header.values():
        ok = isinstance(entry, dict) and isinstance(entry.get("shape"), list)
        offsets = entry.get("data_offsets") if ok else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise malformed
        if not 0 <= offsets[0] <= offsets[1]:
            raise malformed
        end = max(end, offsets[1])
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path.name} is truncated: its header promises {8 + n + end} bytes, it has {size}."
        )
    return header, meta, 8 + n


@dataclass(frozen=True)
class DiskSource:
    """Where one tensor's bytes lie: `path` from byte `offset`, stored as `stored` in `shape`."""

    path: Path
    offset: int
    stored: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.stored.itemsize

    def read(self, out: torch.Tensor, scratch: torch.Tensor | None = None, file=None) -> torch.Tensor:
        """Fill `out` (a contiguous CPU tensor of `shape`) from the file and return it; a dtype
        other than the stored one goes through `scratch` (uint8, at least `nbytes`; made if None).
        `file`: the file already open (unbuffered), when many tensors are read from it in turn."""
        if tuple(out.shape) != self.shape:
            raise ValueError(f"cannot read a tensor of shape {self.shape} into one of {tuple(out.shape)}.")
        if out.dtype == self.stored:
            _read_bytes(self.path, self.offset, out.view(-1).view(torch.uint8), file)
            return out
        if scratch is None or scratch.numel() < self.nbytes:
            scratch = torch.empty(self.nbytes, dtype=torch.uint8)
        raw = scratch[: self.nbytes]
        _read_bytes(self.path, self.offset, raw, file)
        out.copy_(raw.view(self.stored).view(self.shape))
        return out


def _read_bytes(path: Path, offset: int, out: torch.Tensor, file=None) -> None:
    """Read `out.numel()` bytes at `offset` of `path` (or of `file`, that path already open) into
    the uint8 tensor `out`."""
    if not out.numel():
        return
    view = memoryview(out.numpy()).cast("B")
    with open(path, "rb", buffering=0) if file is None else nullcontext(file) as f:
        f.seek(offset)
        done = 0
        while done < len(view):
            n = f.readinto(view[done:])
            if not n:
                raise CheckpointError(f"{path.name} ended before byte {offset + len(view)}; it is truncated.")
            done += n


def file_sources(path: Path) -> dict[str, DiskSource]:
    """Every tensor of a safetensors file, by its key, read from the header alone."""
    header, _, start = read_header(path)
    return header_sources(path, header, start)


def header_sources(path: Path, header: dict, data_start: int) -> dict[str, DiskSource]:
    """`file_sources` from a header `read_header` has already read."""
    out = {}
    for key, entry in header.items():
        dtype = FLOAT_DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise CheckpointError(f"{key} in {path.name} has dtype {entry.get('dtype')}, not a float type.")
        source = DiskSource(path, data_start + entry["data_offsets"][0], dtype, tuple(entry["shape"]))
        start, stop = entry["data_offsets"]
        if stop - start != source.nbytes:
            raise CheckpointError(f"{key} in {path.name} has {stop - start} bytes for shape {source.shape}.")
        out[key] = source
    return out


def set_disk_source(module: torch.nn.Module, name: str, source: DiskSource, dtype: torch.dtype) -> None:
    """Make parameter `name` of `module` disk-backed: a new parameter in `dtype` (the run's) whose
    data is a placeholder of the source's shape that takes no memory (one NaN, broadcast: any
    computation with it gives NaN), carrying `source`. A one-element tensor is simply read."""
    if source.numel <= 1:
        data = source.read(torch.empty(source.shape, dtype=dtype))
    else:
        data = placeholder(source, dtype)
    param = torch.nn.Parameter(data, requires_grad=False)
    setattr(param, _SOURCE, source)
    module._parameters[name] = param


def disk_source(t: torch.Tensor) -> DiskSource | None:
    """The file `t` (a parameter) can be read back from, or None."""
    return getattr(t, _SOURCE, None)


def on_disk(t: torch.Tensor) -> bool:
    """Whether `t` is disk-backed and not read in right now (its data is the placeholder)."""
    return disk_source(t) is not None and t.numel() > 1 and not any(t.stride())


def placeholder(source: DiskSource, dtype: torch.dtype) -> torch.Tensor:
    """The memory-free stand-in a tensor read from `source` as `dtype` holds while it is not read in."""
    return torch.full((), float("nan"), dtype=dtype).expand(source.shape)


class _EmptyOnMeta(TorchFunctionMode):
    """`torch.empty` (how layers allocate their parameters) makes `meta` tensors; every other
    factory (`arange`, `ones`: how buffers are computed) runs as usual."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.empty and kwargs.get("device") in (None, "cpu", torch.device("cpu")):
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


@contextmanager
def empty_parameters() -> Iterator[None]:
    """Modules built inside get `meta` parameters (no memory, initialisers do nothing) and real
    buffers; fill them with `set_disk_source` or `load_state_dict(..., assign=True)`."""
    with _EmptyOnMeta():
        yield
