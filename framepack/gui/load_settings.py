"""Loading the settings of a finished video into the form: from an uploaded sidecar (or the mp4
itself), or from the video selected in the gallery (`form.load_sidecar`, `form.form_from_settings`).
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from .form import form_from_settings, load_sidecar
from .jobs import describe_error

__all__ = ["add_sidecar_upload", "form_filler", "wire_load_settings"]


def add_sidecar_upload() -> gr.File:
    """The accordion to upload a finished video's sidecar or mp4 into."""
    with gr.Accordion("Load settings of a finished video", open=False):
        return gr.File(
            label="Its sidecar (.json) or the mp4 itself",
            file_types=[".json", ".mp4"],
            elem_id="fp-sidecar",
        )


def form_filler(fields: dict, outputs: Path, manifest, loras_dir: Path | None):
    """`fill_form(path)`: the updates of the form's `fields` (by name) from the settings at `path`."""

    def fill_form(path):
        if path is None:
            raise gr.Error("Select a video (or upload a sidecar) first.", print_exception=False)
        try:
            values = form_from_settings(load_sidecar(path), outputs, manifest, loras_dir)
        except ValueError as e:
            raise gr.Error(describe_error(e), print_exception=False) from None
        # No video in the sidecar clears the video to extend.
        keep_none = ("video",)
        return {fields[k]: v for k, v in values.items() if v is not None or k in keep_none}

    return fill_form


def wire_load_settings(
    fill_form, inputs: list, sidecar_upload: gr.File, reuse: gr.Button, selected: gr.State
) -> None:
    """An uploaded sidecar, or the Load button with the gallery's `selected` row, fills `inputs`."""
    sidecar_upload.upload(fill_form, inputs=[sidecar_upload], outputs=inputs, api_visibility="private")
    reuse.click(
        lambda row: fill_form(row[2] if row else None),
        inputs=[selected],
        outputs=inputs,
        api_visibility="private",
    )
