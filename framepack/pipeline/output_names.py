"""Default output names, unique even for runs started together into one folder.

A run given no name is called `framepack_<date>-<time>_<seed>` (`framepack_frame_...` for one
frame), and `-2`, `-3` ... are added until a name is free. A name is only taken by creating the
file or folder that holds it, exclusively (`claim_name`): the video's job directory, one frame's
PNG. So two runs that start in the same second with the same seed never share a name, and a
name that a finished output (any `<name>.*`) uses is never taken again.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["claim_name", "default_stem"]


def default_stem(seed: int, kind: str = "", when: float | None = None) -> str:
    """`framepack_<YYYYmmdd-HHMMSS>_<seed>`, with `kind` after `framepack_` (e.g. "frame")."""
    prefix = f"framepack_{kind}_" if kind else "framepack_"
    return time.strftime(f"{prefix}%Y%m%d-%H%M%S", time.localtime(when)) + f"_{seed}"


def claim_name(out: str | Path, base: str, claim: Callable[[str], object]) -> str:
    """The first of `base`, `base-2`, `base-3` ... that no file in `out` uses and that `claim`
    takes: `claim(stem)` creates what holds the name exclusively and raises FileExistsError when
    another process was first (any other error goes on)."""
    out = Path(out)
    for k in itertools.count(1):
        stem = base if k == 1 else f"{base}-{k}"
        if any(out.glob(f"{stem}.*")):
            continue
        try:
            claim(stem)
        except FileExistsError:
            continue
        return stem
    raise AssertionError("unreachable")
