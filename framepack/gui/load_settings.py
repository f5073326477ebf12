"""Loading the settings of a finished video into the form: from an uploaded sidecar (or the mp4
itself), or from the video selected in the gallery (`form.load_sidecar`, `form.form_from_settings`).

A file that is not a sidecar this form can read changes nothing: every field gets `gr.update()`
and one sentence says why (no Gradio error, which would mark every field of the form). Loaded
settings switch the page to its Generate tab.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from .endpoints import error_sentence, note_html
from .form import form_from_settings, load_sidecar

__all__ = ["add_sidecar_upload", "form_filler", "wire_load_settings"]


def add_sidecar_upload() -> gr.File:
    """The upload of a finished video's sidecar or mp4, inside the current column."""
    return gr.File(
        label="Load settings of a finished video: its sidecar (.json) or the mp4 itself",
        file_types=[".json", ".mp4"],
        elem_id="fp-sidecar",
        height=150,
    )


def form_filler(fields: dict, outputs: Path, manifest, loras_dir: Path | None, message, tabs, form_tab: str):
    """`fill_form(path)`: the updates of the form's `fields` (by name; with "random_seed", that
    checkbox is cleared so the loaded seed is used) from the settings at `path`, of the `message`
    line, and of `tabs` (to `form_tab` once loaded)."""

    def fill_form(path):
        untouched = {component: gr.update() for component in fields.values()}
        if path is None:
            return {
                **untouched,
                message: note_html("Select a video (or upload a sidecar) first."),
                tabs: gr.update(),
            }
        name = Path(path).name
        try:
            values = form_from_settings(load_sidecar(path), outputs, manifest, loras_dir)
        except ValueError as e:
            text = f"{error_sentence(e)} The form is unchanged."
            return {**untouched, message: note_html(text), tabs: gr.update()}
        if "random_seed" in fields:  # the loaded seed is the one to use
            values["random_seed"] = False
        # No video in the sidecar clears the video to extend.
        keep_none = ("video",)
        loaded = {fields[k]: v for k, v in values.items() if v is not None or k in keep_none}
        text = note_html(f"Loaded the settings of {name}.", "ok")
        return {**untouched, **loaded, message: text, tabs: gr.Tabs(selected=form_tab)}

    return fill_form


def wire_load_settings(
    fill_form, outputs: list, sidecar_upload: gr.File, reuse: gr.Button, selected: gr.State
) -> None:
    """An uploaded sidecar, or the Load button with the gallery's `selected` row, fills `outputs`
    (the form's fields, the message line and the tabs)."""
    sidecar_upload.upload(fill_form, inputs=[sidecar_upload], outputs=outputs, api_visibility="private")
    reuse.click(
        lambda row: fill_form(row[2] if row else None),
        inputs=[selected],
        outputs=outputs,
        api_visibility="private",
    )
