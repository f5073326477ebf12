"""Section plans: which section is generated when, where it lands and what context it sees.

A pure function of (length, window, order, end image, keyframes, timed prompts); no tensors. The
orders follow FRAMEPACK.md section 4 and the FramePack paper (arXiv 2504.12626, section 3.3).

Video latents are numbered on one axis: 0 is the start latent (the user's image), 1 ... `window*S`
are generated, `S` sections of `window` latents each. Conditions that are not part of the video get
the next *reference* numbers, so one list of latents ("the bank") serves every lookup:

- the end image latent (if any) is `window*S + 1`, i.e. right after the last video latent, which is
  where it sits in time;
- keyframe `i` is `window*S + 1 + int(end_image) + i`.

`Section.anchors_from` and `Section.history_from` are bank numbers: the pipeline gathers
`bank[anchors_from]` for the layout's start slots and `bank[history_from]` as the history it hands
to `gather_history(..., plan.packing_order)`.

Orders (`position` = slot * window, slot 0 = right after the start latent):

- `"inverted"` (the released I2V model): slots `S-1, ..., 0`; section k uses
  `inverted_layout(schedule, inverted_paddings(S)[k] * window)`. Anchor: the start latent. History:
  every latent after the window, nearest first, then the end latent if there is an end image (as
  the release's end-frame support starts the history with the end latent).
- `"forward"` (F1): slots `0, ..., S-1` with `forward_layout`. Anchor: the start latent. History:
  latents `0 ... position` in time order (start latent first, the most recent packed finest).
  It has no slot for an end frame, so `end_image=True` is rejected.
- `"anti-drifting"` (the paper's bidirectional order, early-established endpoints; needs an end
  image): slot `S-1` first (next to the end image), then slot 0 (next to the start image), then
  the gap between them from its end side: `S-2, S-3, ..., 1`. All layouts are inverted ones, whose
  clean context is one anchor on the left (across `blank` latents) and history adjacent on the right,
  so a gap has to be filled from the right. Slot `S-1` is the inverted order's first section (anchor:
  start latent across `inverted_paddings(S)[0] * window`; history: the end latent). Slot 0 is
  anchored to the start latent with no blank; its history is empty (zero-filled) unless S = 2,
  since the latent after its window is not known yet. Gap section `j` (generation number `j + 1`)
  is anchored to the nearest clean latent on its left, the last latent of slot 0 (video latent
  `window`), across `inverted_paddings(S - 1)[j] * window` blank latents: the gap is planned as an
  inverted video of `S - 1` sections whose start frame is that latent. Its history is every latent
  after its window, nearest first, then the end latent. So every gap section sees clean frames on
  both sides, the last one (slot 1) adjacent on both, and for S <= 2 the plan is the inverted one.

Keyframes `(seconds, ...)` pin images to times. A keyframe at `t` falls on the video latent holding
pixel frame `round(t * fps)` (latent `ceil(frame / 4)`, at least 1) and conditions only the section
whose window contains that latent. These models cannot pin a latent inside a window, so the
keyframe takes the slot the model reads as a target: in the inverted and anti-drifting orders it
replaces `history[0]` (the k1 "post" frame right after the window, where an end image goes); in
the forward order, which has no frame after the window, it replaces the start latent as the
section's anchor. A schedule with `anchors=0` gets empty `anchors_from` everywhere.

Timed prompts: a section uses the prompt whose `[start, end)` contains its window's start time,
`position * 4 / fps` seconds (the time of the last pixel frame before the window).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from numbers import Real

from framepack.packing import (
    PRESETS,
    PackingSchedule,
    SectionLayout,
    forward_layout,
    get_schedule,
    inverted_layout,
)

from .prompts import TimedPrompt, check_timed_prompts, prompt_index_at

__all__ = [
    "ORDERS",
    "MAX_SECONDS",
    "Section",
    "SectionPlan",
    "sections_for",
    "frames_for",
    "inverted_paddings",
    "plan_sections",
]

ORDERS = ("inverted", "forward", "anti-drifting")
MAX_SECONDS = 3600.0
_EPS = 1e-9


def _check_int(name: str, value: object, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")
    return value


def sections_for(seconds: float, window: int = 9, fps: int = 30) -> int:
    """Sections `S = max(round(seconds * fps / (window * 4)), 1)` as in the release (5 s -> 4)."""
    _check_int("window", window)
    _check_int("fps", fps)
    if isinstance(seconds, bool) or not isinstance(seconds, Real) or not math.isfinite(seconds):
        raise ValueError(f"The video length must be a finite number of seconds, got {seconds!r}.")
    if not 0 < seconds <= MAX_SECONDS:
        raise ValueError(
            f"The video length must be more than 0 and at most {MAX_SECONDS:g} seconds, got {seconds}."
        )
    return max(round(seconds * fps / (window * 4)), 1)


def frames_for(sections: int, window: int = 9) -> int:
    """Pixel frames of the final video: `4 * (window * S + 1) - 3` (4 sections of 9 -> 145)."""
    _check_int("sections", sections)
    _check_int("window", window)
    return 4 * (window * sections + 1) - 3


def inverted_paddings(sections: int) -> list[int]:
    """Blank padding (in windows) of each inverted-order section, in generation order.

    `S-1, ..., 1, 0`; for S > 4 the release's `[3] + [2] * (S - 3) + [1, 0]`, since a long blank
    looked worse than a capped one.
    """
    _check_int("sections", sections)
    if sections > 4:
        return [3] + [2] * (sections - 3) + [1, 0]
    return list(range(sections - 1, -1, -1))


@dataclass(frozen=True)
class Section:
    """One section: `window` noisy latents sampled against its anchors and packed history.

    `number` is the 0-based generation order; the noisy latents become video latents
    `1 + position ... position + window` (`self.window`). `blank` repeats `layout.blank`.
    `anchors_from` and `history_from` are bank numbers (see the module docstring) for the
    layout's start slots and for the history in `gather_history` order: nearest first for the
    inverted layouts, time order (most recent last) for the forward one. `history_from` is kept
    as ranges so long videos stay cheap; `history()` flattens it.
    """

    number: int
    position: int
    layout: SectionLayout
    is_last: bool
    blank: int
    prompt_index: int = 0
    keyframe: int | None = None
    anchors_from: tuple[int, ...] = (0,)
    history_from: tuple[range, ...] = ()

    @property
    def window(self) -> range:
        """Video latents this section generates."""
        return range(1 + self.position, 1 + self.position + len(self.layout.noisy))

    def history(self) -> tuple[int, ...]:
        """`history_from` as a flat tuple of bank numbers."""
        return tuple(i for r in self.history_from for i in r)


@dataclass(frozen=True)
class SectionPlan:
    """Every section of one video, in generation order; `total_latents` counts the start latent."""

    order: str
    window: int
    sections: tuple[Section, ...]
    total_latents: int
    schedule: PackingSchedule
    fps: int = 30
    end_image: bool = False
    keyframe_latents: tuple[int, ...] = ()

    def frames(self) -> int:
        """Pixel frames of the final video: `4 * total_latents - 3`."""
        return 4 * self.total_latents - 3

    @property
    def duration(self) -> float:
        """Seconds from the first to the last frame: `(frames - 1) / fps`."""
        return (self.frames() - 1) / self.fps

    @property
    def packing_order(self) -> str:
        """The `gather_history` order of this plan's layouts: "forward" or "inverted"."""
        return "forward" if self.order == "forward" else "inverted"

    @property
    def end_ref(self) -> int | None:
        """Bank number of the end image latent, or None without an end image."""
        return self.total_latents if self.end_image else None

    @property
    def keyframe_refs(self) -> tuple[int, ...]:
        """Bank number of each keyframe latent, in the order the keyframes were given."""
        first = self.total_latents + int(self.end_image)
        return tuple(range(first, first + len(self.keyframe_latents)))

    def by_position(self) -> tuple[Section, ...]:
        """The sections in time order."""
        return tuple(sorted(self.sections, key=lambda s: s.position))


def _schedule_for(schedule: str | PackingSchedule, window: int) -> PackingSchedule:
    sched = get_schedule(schedule)
    if isinstance(schedule, str) and schedule.strip() in PRESETS:
        sched = replace(sched, generate=window)  # a preset names the groups; the window is ours
    elif sched.generate != window:
        raise ValueError(
            f"The packing schedule {sched.name!r} generates {sched.generate} latents but the window is {window}."
        )
    if sched.anchors > 1:
        raise ValueError(
            f"Section plans support schedules with at most one anchor frame, got {sched.anchors}."
        )
    return sched


def _keyframe_latents(keyframes: Sequence[float], n: int, window: int, fps: int) -> tuple[int, ...]:
    keyframes, duration, out = tuple(keyframes), 4 * window * n / fps, []
    for t in keyframes:
        if isinstance(t, bool) or not isinstance(t, Real) or not math.isfinite(t):
            raise ValueError(f"A keyframe time must be a finite number of seconds, got {t!r}.")
        if not 0 < t <= duration + _EPS:
            where = "at the start, where the start image is" if t == 0 else "outside the video"
            raise ValueError(
                f"The keyframe at {t:g} s is {where}; a keyframe goes after 0 s and at most at "
                f"{duration:g} s ({n} sections of {window} latents at {fps} fps)."
            )
        frame = round(t * fps)
        out.append(min(max(1, -(-frame // 4)), window * n))
    slots = [(lat - 1) // window for lat in out]
    for i, s in enumerate(slots):
        if s in slots[:i]:
            j = slots.index(s)
            raise ValueError(
                f"The keyframes at {keyframes[j]:g} s and {keyframes[i]:g} s fall in the same section; "
                "each section can follow one keyframe."
            )
    return tuple(out)


def _drop_first(history: tuple[range, ...]) -> tuple[range, ...]:
    if not history:
        return ()
    head = history[0][1:]
    return ((head,) if len(head) else ()) + history[1:]


def _generation_slots(order: str, n: int) -> list[int]:
    """Time slot of each section, in generation order."""
    if order == "forward":
        return list(range(n))
    if order == "inverted":
        return list(range(n - 1, -1, -1))
    return [n - 1, *range(min(n - 1, 1)), *range(n - 2, 0, -1)]  # anti-drifting: end, start, gap


def _count_sections(sections: int | None, seconds: float | None, window: int, fps: int) -> int:
    if (sections is None) == (seconds is None):
        raise ValueError("Give the video length either as a number of sections or in seconds, not both.")
    if sections is None:
        return sections_for(seconds, window, fps)
    limit = sections_for(MAX_SECONDS, window, fps)
    if isinstance(sections, bool) or not isinstance(sections, int) or not 1 <= sections <= limit:
        raise ValueError(f"sections must be an integer from 1 to {limit} (one hour), got {sections!r}.")
    return sections


def plan_sections(
    sections: int | None = None,
    *,
    seconds: float | None = None,
    window: int = 9,
    order: str = "inverted",
    schedule: str | PackingSchedule = "inverted",
    end_image: bool = False,
    keyframes: Sequence[float] = (),
    fps: int = 30,
    prompts: Sequence[TimedPrompt] = (),
) -> SectionPlan:
    """Plan a video of `sections` sections (or `seconds`, via `sections_for`); see the module docstring.

    `schedule` is a packing schedule or its name; a preset is resized to `window`, an explicit
    schedule must generate `window` latents. `keyframes` are times in seconds, `0 < t <= duration`,
    at most one per section. `prompts` must cover the start time of every section.
    """
    _check_int("window", window)
    _check_int("fps", fps)
    if order not in ORDERS:
        raise ValueError(f"Unknown section order {order!r}: use one of {', '.join(ORDERS)}.")
    n = _count_sections(sections, seconds, window, fps)
    sched = _schedule_for(schedule, window)
    kf_latents = _keyframe_latents(keyframes, n, window, fps)
    kf_at_slot = {(lat - 1) // window: i for i, lat in enumerate(kf_latents)}
    _check_conditions(order, sched, end_image, keyframes, kf_at_slot, n)
    check_timed_prompts(prompts)

    total = window * n + 1
    end_ref = total if end_image else None
    paddings = inverted_paddings(n)
    gap_paddings = inverted_paddings(n - 1) if n > 1 else []
    unknown = list(range(n))  # slots not generated yet, sorted
    out = []
    for number, slot in enumerate(_generation_slots(order, n)):
        position = slot * window
        anchors: tuple[int, ...] = (0,)
        if order == "forward":
            blank, layout = 0, forward_layout(sched)
            history: tuple[range, ...] = (range(0, 1 + position),)
        else:
            if order == "inverted" or number == 0:
                blank = paddings[number] * window
            elif slot == 0:
                blank = 0
            else:  # anti-drifting gap: anchored to the last latent of slot 0
                blank, anchors = gap_paddings[number - 1] * window, (window,)
            layout = inverted_layout(sched, blank)
            k = bisect.bisect_right(unknown, slot)
            run_end = unknown[k] if k < len(unknown) else n  # first slot after this one not generated
            history = (range(1 + position + window, 1 + run_end * window),) if run_end > slot + 1 else ()
            if run_end == n and end_ref is not None:
                history += (range(end_ref, end_ref + 1),)
        keyframe = kf_at_slot.get(slot)
        if keyframe is not None:
            ref = total + int(end_image) + keyframe
            if order == "forward":
                anchors = (ref,)
            else:
                history = (range(ref, ref + 1),) + _drop_first(history)
        if sched.anchors == 0:
            anchors = ()  # a schedule without anchor slots sees only its history
        prompt = _prompt_for(prompts, position * 4 / fps, number)
        out.append(
            Section(number, position, layout, number == n - 1, blank, prompt, keyframe, anchors, history)
        )
        del unknown[bisect.bisect_left(unknown, slot)]
    return SectionPlan(order, window, tuple(out), total, sched, fps, end_image, kf_latents)


def _check_conditions(order: str, sched, end_image: bool, keyframes, kf_at_slot: dict, n: int) -> None:
    """ValueError for an order that cannot take the end image or keyframes as given."""
    if order == "forward" and end_image:
        raise ValueError(
            "The forward order has no end-frame condition (an end image or a loop); use the inverted "
            "or anti-drifting order."
        )
    if order == "anti-drifting" and not end_image:
        raise ValueError(
            "The anti-drifting order fills the video between the start and end images; give an end image."
        )
    if end_image and n - 1 in kf_at_slot:
        t = keyframes[kf_at_slot[n - 1]]
        raise ValueError(
            f"The keyframe at {t:g} s falls in the last section, which the end image already conditions."
        )
    if order == "forward" and keyframes and sched.anchors == 0:
        raise ValueError(
            "Keyframes in the forward order take the anchor slot; use a schedule with one anchor."
        )


def _prompt_for(prompts: Sequence[TimedPrompt], seconds: float, number: int) -> int:
    if not prompts:
        return 0
    found = prompt_index_at(prompts, seconds)
    if found is None:
        raise ValueError(
            f"No prompt covers {seconds:g} s, where section {number} starts; "
            "let the timed prompts cover the whole video."
        )
    return found
