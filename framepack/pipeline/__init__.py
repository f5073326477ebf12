"""The pipeline: bundles, settings, the run and its sections (`docs/ARCHITECTURE.md`); this package
re-exports the section plans (which section is generated when) and the timed prompts."""

from .plan import (
    MAX_SECONDS,
    ORDERS,
    Section,
    SectionPlan,
    frames_for,
    inverted_paddings,
    plan_sections,
    sections_for,
)
from .prompts import TimedPrompt, check_timed_prompts, parse_timed_prompt, prompt_index_at

__all__ = [
    "MAX_SECONDS",
    "ORDERS",
    "Section",
    "SectionPlan",
    "TimedPrompt",
    "check_timed_prompts",
    "frames_for",
    "inverted_paddings",
    "parse_timed_prompt",
    "plan_sections",
    "prompt_index_at",
    "sections_for",
]
