"""Timed prompts: a different text prompt for each stretch of the video.

A prompt is either plain text (the whole video) or a sequence of bracketed segments::

    [0s-3s: a cat walks] [3s: the cat sits]
    [0-1.5: a ball rolls]
    [1.5s: it stops]

`[START-END: text]` covers `START <= t < END` seconds; `[START: text]` runs until the next
segment's start (or the end of the video). Segments may sit on separate lines or one line, in any
order; they are returned sorted by start time. Once a `[` or `]` appears anywhere, the whole text
must be made of segments (so a plain prompt cannot contain square brackets).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["TimedPrompt", "parse_timed_prompt", "check_timed_prompts", "prompt_index_at"]

_EPS = 1e-9
_NUM = r"(\d+(?:\.\d*)?|\.\d+)"
_SEGMENT_RE = re.compile(rf"\s*{_NUM}\s*s?\s*(?:-\s*{_NUM}\s*s?\s*)?:(.*)", re.DOTALL)


@dataclass(frozen=True)
class TimedPrompt:
    """`text` applies to the video times `start <= t < end`, in seconds."""

    start: float
    end: float
    text: str

    def __post_init__(self) -> None:
        if not (math.isfinite(self.start) and math.isfinite(self.end)):
            raise ValueError(f"Prompt {self.text!r} has a non-finite time range ({self.start}, {self.end}).")
        if self.start < 0:
            raise ValueError(f"Prompt {self.text!r} starts at {self.start:g} s, before the video starts.")
        if self.end <= self.start:
            raise ValueError(
                f"Prompt {self.text!r} ends at {self.end:g} s, not after its start at {self.start:g} s."
            )
        if not self.text.strip():
            raise ValueError(f"The prompt for {self.start:g} s to {self.end:g} s is empty.")

    def contains(self, seconds: float) -> bool:
        """Whether `seconds` falls in `[start, end)`."""
        return self.start - _EPS <= seconds < self.end - _EPS


def _segments(text: str) -> list[tuple[float, float | None, str]]:
    """`(start, end or None, text)` for each bracketed segment, in the order written."""
    out, pos = [], 0
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos == len(text):
            return out
        if text[pos] != "[":
            stray = text[pos:].split("[")[0].strip()[:40]
            raise ValueError(
                f"Cannot read the timed prompt: {stray!r} is outside brackets; write every part as "
                "'[START-END: text]' or '[START: text]', or give one plain prompt without brackets."
            )
        close = text.find("]", pos + 1)
        inner = text[pos + 1 : close] if close >= 0 else text[pos + 1 :]
        if close < 0 or "[" in inner:
            raise ValueError(
                f"Cannot read the timed prompt: the bracket opened at {text[pos:][:40]!r} is not closed."
            )
        m = _SEGMENT_RE.fullmatch(inner)
        if m is None:
            raise ValueError(
                f"Cannot read the timed prompt segment '[{inner.strip()[:40]}]': "
                "expected '[START-END: text]' or '[START: text]' with times in seconds, e.g. '[0s-3s: a cat walks]'."
            )
        start, end, body = m.groups()
        out.append((float(start), None if end is None else float(end), body.strip()))
        pos = close + 1


def parse_timed_prompt(text: str, duration: float) -> list[TimedPrompt]:
    """Read a plain or timed prompt for a video of `duration` seconds; sorted by start time.

    Plain text (no square brackets) is one prompt for `[0, duration)`. An open segment
    `[START: text]` ends where the next segment starts, the last one at `duration`. Empty text,
    malformed brackets, ranges outside `[0, duration]` and overlapping ranges raise ValueError.
    """
    if not (math.isfinite(duration) and duration > 0):
        raise ValueError(f"The video duration must be a positive number of seconds, got {duration}.")
    if "[" not in text and "]" not in text:
        return [TimedPrompt(0.0, float(duration), text.strip())]
    segments = sorted(_segments(text), key=lambda s: s[0])
    prompts = []
    for i, (start, end, body) in enumerate(segments):
        if start >= duration - _EPS:
            raise ValueError(f"The prompt {body!r} starts at {start:g} s, outside the {duration:g} s video.")
        if end is None:
            end = segments[i + 1][0] if i + 1 < len(segments) else float(duration)
            if end <= start:
                raise ValueError(f"Two prompts start at {start:g} s; give each stretch of time one prompt.")
        elif end > duration + _EPS:
            raise ValueError(f"The prompt {body!r} ends at {end:g} s, outside the {duration:g} s video.")
        prompts.append(TimedPrompt(start, end, body))
    check_timed_prompts(prompts)
    return prompts


def check_timed_prompts(prompts: Sequence[TimedPrompt]) -> None:
    """Raise ValueError when two prompts' time ranges overlap (each one is checked on creation)."""
    ordered = sorted(prompts, key=lambda p: p.start)
    for a, b in zip(ordered, ordered[1:], strict=False):
        if b.start < a.end - _EPS:
            raise ValueError(
                f"The prompts {a.text!r} ({a.start:g}-{a.end:g} s) and {b.text!r} "
                f"({b.start:g}-{b.end:g} s) overlap; give each stretch of time one prompt."
            )


def prompt_index_at(prompts: Sequence[TimedPrompt], seconds: float) -> int | None:
    """Index in `prompts` of the prompt whose `[start, end)` contains `seconds`, or None."""
    for i, p in enumerate(prompts):
        if p.contains(seconds):
            return i
    return None
