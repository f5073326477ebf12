"""The form's input components: start and end image, prompt (with its timeline of sections), the
settings, the modes; and the action row with the Generate button.

Only the layout: `form` turns the values these send into settings. `FormInputs.fields` holds the
components by their `form.FIELDS` name, so `FormInputs.inputs` is in the order of `/generate`'s
parameters. The random-seed checkbox is not one of them: the page draws the seed before it calls
`/generate` (an API caller sends the seed "random" instead).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from ..caching import CACHES
from .form import DEFAULT_COLOUR, FIELDS, ONE_FRAME_GROUPS, list_loras, orders_for

__all__ = ["ActionRow", "FormInputs", "add_action_row", "add_form_inputs"]


@dataclass
class FormInputs:
    """The form's components by field name, the random-seed checkbox and the prompt's timeline."""

    fields: dict[str, gr.components.Component]
    random_seed: gr.Checkbox
    timeline: gr.HTML

    @property
    def inputs(self) -> list[gr.components.Component]:
        """The components in the order of `/generate`'s parameters (`form.FIELDS`)."""
        return [self.fields[name] for name in FIELDS]


def _readable_image(component: gr.Image) -> gr.Image:
    """Make an unreadable upload fail with one sentence instead of Gradio's generic error.

    (Wrapped on the instance: a `gr.Image` subclass would make Gradio write a .pyi file here.)
    """
    preprocess = component.preprocess

    def checked(payload):
        try:
            return preprocess(payload)
        except Exception:
            name = getattr(payload, "orig_name", None) or "the uploaded file"
            what = (component.label or "image").lower()
            raise gr.Error(
                f"The {what}: {name} is not an image file that can be read.", print_exception=False
            ) from None

    component.preprocess = checked
    return component


def _uploads(label: str, types: list[str], elem_id: str) -> gr.File:
    return gr.File(label=label, file_count="multiple", file_types=types, elem_id=elem_id, scale=2)


@dataclass
class ActionRow:
    """The Generate button and the line beside it where a form that cannot be queued says why."""

    generate: gr.Button
    message: gr.HTML


def add_action_row() -> ActionRow:
    """The Generate button and its message line, in a row of their own (above the live panel, so
    opening the form's accordions never moves the button)."""
    with gr.Row(elem_id="fp-actions", equal_height=True):
        generate = gr.Button("Generate", variant="primary", elem_id="fp-generate", scale=1, min_width=160)
        message = gr.HTML("", elem_id="fp-form-message", padding=False)
    return ActionRow(generate, message)


def add_form_inputs(manifest, loras_dir: Path | None, examples: list[tuple[str | None, str]]) -> FormInputs:
    """The form inside the current column: `manifest` gives the defaults, `loras_dir` the LoRAs to
    pick from, `examples` the (start image or None, prompt) pairs to fill in."""
    fields, random_seed, timeline = _main_inputs(examples)
    with gr.Accordion("More settings", open=False):
        fields |= _more_settings(manifest)
    with gr.Accordion(
        "Modes: text-to-video, loop, one frame, extend a video, keyframes, LoRAs",
        open=False,
        elem_id="fp-modes",
    ):
        fields |= _mode_inputs(manifest)
        fields |= _lora_inputs(loras_dir)
    return FormInputs(fields, random_seed, timeline)


def _main_inputs(examples: list[tuple[str | None, str]]) -> tuple[dict, gr.Checkbox, gr.HTML]:
    """The images, the prompt (its timeline, its examples), the negative prompt, the length and the
    seed; returns the fields, the random-seed checkbox and the timeline."""
    fields = {}
    with gr.Row():
        fields["image"] = _readable_image(
            gr.Image(type="numpy", label="Start image", height=260, elem_id="fp-image")
        )
        fields["end_image"] = _readable_image(
            gr.Image(type="numpy", label="End image (optional)", height=260)
        )
    fields["prompt"] = gr.Textbox(
        label="Prompt",
        lines=3,
        elem_id="fp-prompt",
        info="One prompt, or timed ones: [0s-2s: the cat sits] [2s: the cat walks away]",
    )
    timeline = gr.HTML("", elem_id="fp-timeline", padding=False)
    if examples and all(img is not None for img, _ in examples):
        gr.Examples(
            [[img, p] for img, p in examples], inputs=[fields["image"], fields["prompt"]], label="Examples"
        )
    elif examples:
        gr.Examples([[p] for _, p in examples], inputs=[fields["prompt"]], label="Quick prompts")
    fields["negative_prompt"] = gr.Textbox("", label="Negative prompt (used when CFG > 1)")
    with gr.Row():
        fields["seconds"] = gr.Slider(1, 120, value=5, step=0.1, label="Seconds", elem_id="fp-seconds")
        fields["seed"] = gr.Textbox(value="31337", label="Seed (a number, or 'random')", elem_id="fp-seed")
        random_seed = gr.Checkbox(
            False,
            label="Random seed for each job",
            info="The seed used is shown here and kept in the video's sidecar.",
            elem_id="fp-random-seed",
        )
    return fields, random_seed, timeline


def _more_settings(m) -> dict:
    """Sampling, size, output and memory settings (the model's defaults from its manifest `m`)."""
    fields = {}
    with gr.Row():
        fields["steps"] = gr.Slider(1, 100, value=m.steps, step=1, label="Steps", elem_id="fp-steps")
        fields["distilled_cfg"] = gr.Slider(
            1, 32, value=m.distilled_guidance, step=0.1, label="Distilled guidance"
        )
        fields["cfg"] = gr.Slider(1, 32, value=m.cfg, step=0.1, label="CFG (real; 1 = off)")
    with gr.Row():
        fields["window"] = gr.Slider(
            1, 33, value=m.window, step=1, label="Window (latent frames per section)"
        )
        fields["order"] = gr.Dropdown(orders_for(m.order), value=m.order, label="Section order")
    with gr.Row():
        fields["resolution"] = gr.Slider(
            64, 1024, value=m.resolution, step=16, label="Resolution (bucket base, px)"
        )
        fields["crf"] = gr.Slider(0, 51, value=16, step=1, label="mp4 quality (crf; lower is better)")
        fields["gif"] = gr.Checkbox(False, label="Also write a GIF")
    with gr.Row():
        fields["cache"] = gr.Dropdown(["off", *CACHES], value="off", label="Step cache (faster, lossy)")
        fields["cache_threshold"] = gr.Slider(
            0, 0.5, value=0.15, step=0.01, label="Cache threshold (0.15: ~2x, 0.1: ~1.6x)"
        )
        fields["vram_budget"] = gr.Textbox(
            "",
            label="Memory budget for all weights (GB, 'auto' or 'none'; empty: the server's, if any)",
        )
    with gr.Row():
        fields["sampler"] = gr.Dropdown(["unipc", "euler"], value="unipc", label="Sampler")
        fields["png"] = gr.Checkbox(False, label="Also write every frame as a PNG")
    return fields


def _mode_inputs(m) -> dict:
    """Text-to-video, loop, one frame, a video to extend and keyframes."""
    fields = {}
    with gr.Row():
        fields["t2v_colour"] = gr.ColorPicker(
            DEFAULT_COLOUR,
            label="Text-to-video colour (used when no start image is given)",
            info="Without a start image the video starts from a plain frame of this colour "
            "(lower quality than from an image).",
        )
        fields["loop"] = gr.Checkbox(
            False, label="Seamless loop (ends on the start image)", elem_id="fp-loop"
        )
    with gr.Row():
        fields["one_frame"] = gr.Checkbox(
            False, label="One frame: an edit of the start image (a PNG, not a video)", elem_id="fp-one-frame"
        )
        fields["one_frame_index"] = gr.Number(
            m.window, precision=0, label="Time index of the frame", elem_id="fp-one-frame-index"
        )
        fields["one_frame_groups"] = gr.CheckboxGroup(
            list(ONE_FRAME_GROUPS),
            value=list(ONE_FRAME_GROUPS),
            label="History groups (the end image is the post reference)",
        )
    fields["video"] = gr.Video(
        label="Video to extend (forward order: continue it; inverted: lead into it)",
        sources=["upload"],
        height=200,
        elem_id="fp-source-video",
    )
    with gr.Row():
        fields["keyframe_images"] = _uploads("Keyframe images", ["image"], "fp-keyframes")
        fields["keyframe_times"] = gr.Textbox(
            "", label="Keyframe times (seconds, one per image: 1.5, 3)", elem_id="fp-keyframe-times"
        )
    return fields


def _lora_inputs(loras_dir: Path | None) -> dict:
    """LoRAs picked from the `--loras` folder (shown only when there is one) or uploaded, and their scales."""
    fields = {}
    with gr.Row():
        fields["loras"] = gr.Dropdown(
            list_loras(loras_dir),
            value=[],
            multiselect=True,
            label=f"LoRAs from {loras_dir.name}/" if loras_dir else "LoRAs (serve --loras DIR)",
            visible=loras_dir is not None,
        )
        fields["lora_files"] = _uploads("LoRA files (.safetensors)", [".safetensors"], "fp-lora-files")
        fields["lora_scales"] = gr.Textbox(
            "", label="LoRA scales (one for all, or one per LoRA; empty: 1)", elem_id="fp-lora-scales"
        )
    return fields
