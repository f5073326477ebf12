"""Time-index layouts of one section and the history frames each packing group receives.

All latents of one sampling step share one time axis (FRAMEPACK.md section 4). The inverted
anti-drifting order (the I2V release) lays it out as `[start | blank | noisy | k1 | k2 | k4]`: the
window is generated before the history it continues into. The forward order (F1) lays it out as
`[start | k4 | k2 | k1 | noisy]`. The indices feed RoPE; a skipped index is simply never used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .schedule import PackingSchedule

__all__ = ["SectionLayout", "ORDERS", "inverted_layout", "forward_layout", "gather_history", "gather_tail"]

ORDERS = ("inverted", "forward")


@dataclass(frozen=True)
class SectionLayout:
    """Time indices of one section: anchors, the noisy window and each schedule group.

    `groups` follows `schedule.groups` (group 0 is the k1 history frame in every preset) and lists
    each group's indices in increasing time. `blank` counts padding latents (inverted order only).
    `tail` is the index of the pooled tail token of a `"ta"`/`"tc"` schedule, else empty.
    """

    start: tuple[int, ...]
    noisy: tuple[int, ...]
    groups: tuple[tuple[int, ...], ...]
    blank: int
    tail: tuple[int, ...] = ()

    def clean_k1(self) -> tuple[int, ...]:
        """Indices of the clean k1 latents passed to the model: the anchors, then history group 0."""
        return self.start + self.groups[0]

    @property
    def length(self) -> int:
        """Length of the index axis, blank latents included."""
        return len(self.start) + self.blank + len(self.noisy) + sum(map(len, self.groups)) + len(self.tail)


def _span(pos: int, n: int) -> tuple[tuple[int, ...], int]:
    return tuple(range(pos, pos + n)), pos + n


def _has_tail(schedule: PackingSchedule) -> bool:
    return schedule.tail in ("ta", "tc")


def inverted_layout(schedule: PackingSchedule, blank: int) -> SectionLayout:
    """`[anchors | blank | ws noisy | group 0 | group 1 | ... | tail]`, contiguous from 0.

    For the released schedule and `blank = p * ws`: start = [0], noisy = [1 + p*ws, +9), then one
    k1, two k2 and sixteen k4 indices.
    """
    if blank < 0:
        raise ValueError(f"The number of blank latents cannot be negative, got {blank}.")
    start, pos = _span(0, schedule.anchors)
    noisy, pos = _span(pos + blank, schedule.generate)
    groups = []
    for g in schedule.groups:
        idx, pos = _span(pos, g.frames)
        groups.append(idx)
    tail, pos = _span(pos, 1 if _has_tail(schedule) else 0)
    return SectionLayout(start, noisy, tuple(groups), blank, tail)


def forward_layout(schedule: PackingSchedule) -> SectionLayout:
    """`[anchors | tail | last group | ... | group 1 | group 0 | ws noisy]`, contiguous from 0.

    For F1: `[1 start | 16 k4 | 2 k2 | 1 k1 | 9 noisy]`.
    """
    start, pos = _span(0, schedule.anchors)
    tail, pos = _span(pos, 1 if _has_tail(schedule) else 0)
    groups: list[tuple[int, ...]] = []
    for g in reversed(schedule.groups):
        idx, pos = _span(pos, g.frames)
        groups.insert(0, idx)
    noisy, pos = _span(pos, schedule.generate)
    return SectionLayout(start, noisy, tuple(groups), 0, tail)


def _check(history: torch.Tensor, order: str) -> None:
    if history.ndim != 5:
        raise ValueError(f"History latents must be (B, C, T, H, W), got shape {tuple(history.shape)}.")
    if order not in ORDERS:
        raise ValueError(f"Unknown section order {order!r}: use 'inverted' or 'forward'.")


def _pad_time(x: torch.Tensor, frames: int, before: bool) -> torch.Tensor:
    """Zero-pad `(B, C, T, H, W)` to `frames` along T, before or after the frames present."""
    missing = frames - x.shape[2]
    if missing == 0:
        return x
    zeros = x.new_zeros(x.shape[0], x.shape[1], missing, *x.shape[3:])
    return torch.cat([zeros, x] if before else [x, zeros], dim=2)


def gather_history(history: torch.Tensor, schedule: PackingSchedule, order: str) -> list[torch.Tensor]:
    """One `(B, C, frames_g, H, W)` tensor per schedule group, zero-filled where history is short.

    `"inverted"`: `history[:, :, 0]` is the most important frame and groups take consecutive slices
    from the front (released: k1 = [0:1], k2 = [1:3], k4 = [3:19]); padding goes after. `"forward"`:
    the last frame is the most important and groups take slices from the end, each in time order
    (F1: the last 19 frames split [16 k4 | 2 k2 | 1 k1]); padding goes before.
    """
    _check(history, order)
    t = history.shape[2]
    out, used = [], 0
    for g in schedule.groups:
        if order == "inverted":
            part = history[:, :, min(used, t) : min(used + g.frames, t)]  # (B, C, <=f, H, W)
        else:
            part = history[:, :, max(t - used - g.frames, 0) : max(t - used, 0)]  # (B, C, <=f, H, W)
        out.append(_pad_time(part, g.frames, before=order == "forward"))  # (B, C, f, H, W)
        used += g.frames
    return out


def gather_tail(history: torch.Tensor, schedule: PackingSchedule, order: str) -> torch.Tensor | None:
    """The pooled tail of a `"ta"`/`"tc"` schedule, or None when there is none.

    The tail is every history frame past the groups (the oldest ones). `"ta"` averages them over
    time into `(B, C, 1, H, W)`, to be patchified with the last group's kernel; `"tc"` averages
    over time and space into `(B, C, 1, 1, 1)`, one token once replicate-padded to that kernel.
    """
    _check(history, order)
    n = history.shape[2] - schedule.history_frames
    if not _has_tail(schedule) or n <= 0:
        return None
    tail = history[:, :, -n:] if order == "inverted" else history[:, :, :n]  # (B, C, n, H, W)
    dims = (2,) if schedule.tail == "ta" else (2, 3, 4)
    return tail.mean(dim=dims, keepdim=True)
