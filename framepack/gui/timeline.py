"""The timed prompts as a timeline of sections: which section of the video gets which prompt.

Pure functions (no Gradio). The sections are planned as a run plans them
(`framepack.pipeline.plan.plan_sections` with the model's window and fps), and the prompt is read
as a run reads it (`framepack.pipeline.prompts.parse_timed_prompt` over the planned duration), so
a prompt that would fail the job shows its one sentence here, while it is being typed.
"""

from __future__ import annotations

import html
from typing import NamedTuple

from ..pipeline.plan import plan_sections
from ..pipeline.prompts import parse_timed_prompt

__all__ = ["SectionPrompt", "section_prompts", "timeline_html"]

# One colour per prompt (cycled), readable on light and dark themes.
COLOURS = ("#1e88e5", "#43a047", "#fb8c00", "#8e24aa", "#e53935", "#00897b", "#6d4c41", "#3949ab")


class SectionPrompt(NamedTuple):
    """One section's time range (seconds) and the prompt it gets (its index among the prompts)."""

    start: float
    end: float
    index: int
    text: str


def section_prompts(prompt: str, seconds: float, window: int, fps: int) -> list[SectionPrompt]:
    """Each section's time range and prompt, in time order; raises ValueError with one sentence
    for an empty or malformed prompt or a length the plan refuses."""
    if not (prompt or "").strip():
        raise ValueError("The prompt is empty; describe the motion you want.")
    draft = plan_sections(seconds=float(seconds), window=int(window), fps=int(fps))
    timed = parse_timed_prompt(prompt, draft.duration)
    plan = plan_sections(seconds=float(seconds), window=int(window), fps=int(fps), prompts=timed)
    out = []
    for section in plan.by_position():
        start = section.position * 4 / fps
        end = min((section.position + len(section.window)) * 4 / fps, plan.duration)
        out.append(SectionPrompt(start, end, section.prompt_index, timed[section.prompt_index].text))
    return out


def timeline_html(prompt: str, seconds: float, window: int, fps: int) -> str:
    """The sections as a bar of blocks (one colour per prompt), or the prompt's error."""
    if not (prompt or "").strip():
        return '<div class="fp-timeline" data-state="empty">Write a prompt to see its sections.</div>'
    try:
        sections = section_prompts(prompt, seconds, window, fps)
    except (ValueError, TypeError) as e:
        text = html.escape(str(e))
        return (
            f'<div class="fp-timeline" data-state="error"><span class="fp-timeline-error">{text}</span></div>'
        )
    blocks = []
    for k, (start, end, index, text) in enumerate(sections):
        colour = COLOURS[index % len(COLOURS)]
        label = html.escape(" ".join(text.split()))
        blocks.append(
            f'<div class="fp-section" data-section="{k}" data-prompt="{index}" '
            f'style="flex: {max(end - start, 1e-3):.4f}; border-color: {colour}" '
            f'title="{start:.1f}-{end:.1f} s: {label}">'
            f"<b>{start:.1f}-{end:.1f} s</b><span>{label}</span></div>"
        )
    prompts = len({index for _, _, index, _ in sections})
    summary = (
        f"{len(sections)} section{'s' if len(sections) != 1 else ''}, "
        f"{prompts} prompt{'s' if prompts != 1 else ''}, {sections[-1][1]:.1f} s"
    )
    return (
        f'<div class="fp-timeline" data-state="ok" data-sections="{len(sections)}">'
        f'<div class="fp-timeline-bar">{"".join(blocks)}</div>'
        f'<div class="fp-timeline-summary">{summary}</div></div>'
    )
