"""The Settings tab: named presets of the form (save, load, delete; `presets`), and what this
server runs with (model, device, folders, memory budget), which no form field changes.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from .endpoints import error_sentence, note_html
from .presets import PRESET_FIELDS, delete_preset, list_presets, load_preset, save_preset

__all__ = ["SettingsTab", "add_settings_tab", "server_html", "wire_presets"]


@dataclass
class SettingsTab:
    """The preset controls."""

    name: gr.Textbox
    pick: gr.Dropdown
    save: gr.Button
    load: gr.Button
    delete: gr.Button
    message: gr.HTML


def add_settings_tab(outputs: Path, server: str) -> SettingsTab:
    """The Settings tab's contents inside the current tab; `server` is `server_html`'s."""
    gr.Markdown(
        "### Presets\nA preset keeps the form's settings (prompt, length, seed, sampling, modes, LoRAs "
        f"picked from the folder), not its uploads. They are saved in `{html.escape(str(outputs / 'presets'))}`."
    )
    with gr.Row(equal_height=True):
        name = gr.Textbox(
            label="Save the current form as", placeholder="a name", elem_id="fp-preset-name", scale=3
        )
        save = gr.Button("Save preset", variant="primary", elem_id="fp-preset-save", scale=1)
    with gr.Row(equal_height=True):
        pick = gr.Dropdown(
            choices=list_presets(outputs), value=None, label="Preset", elem_id="fp-preset-pick", scale=3
        )
        load = gr.Button("Load into the form", elem_id="fp-preset-load", scale=1)
        delete = gr.Button("Delete", variant="stop", elem_id="fp-preset-delete", scale=1)
    message = gr.HTML("", elem_id="fp-preset-message", padding=False)
    gr.Markdown("### This server")
    gr.HTML(server, elem_id="fp-server")
    return SettingsTab(name, pick, save, load, delete, message)


def server_html(queue, outputs: Path, loras_dir: Path | None) -> str:
    """What the server runs with: set on the command line of `framepack serve`, the same for every job."""
    bundle = queue.bundle
    root = getattr(bundle, "root", None)
    rows = [
        ("Model", Path(root).name if root else "(in memory)"),
        ("Device", str(getattr(bundle, "device", "?"))),
        (
            "Memory budget of jobs that give none",
            str(queue.vram_budget or "none (every weight on the device)"),
        ),
        ("Speed", _speed(queue)),
        ("Outputs folder", str(outputs)),
        ("LoRA folder", str(loras_dir) if loras_dir else "none (serve --loras DIR)"),
    ]
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f'<table class="fp-server">{body}</table>'


def _speed(queue) -> str:
    """The server's speed switches (`serve --compile`, `--fp8-compute`, `--attention`), the same
    for every job."""
    on = [
        name
        for name, flag in (("--compile", "compile"), ("--fp8-compute", "fp8_compute"))
        if getattr(queue, flag, False)
    ]
    attention = getattr(queue, "attention", "sdpa")
    if attention != "sdpa":
        on.append(f"--attention {attention}")
    return ", ".join(on) or "none (serve --compile, --fp8-compute, --attention sage)"


def _allowed(component, value):
    """`value` if the component can show it (a dropdown's choices), else None."""
    choices = getattr(component, "choices", None)
    if not choices:
        return value
    known = {c[1] if isinstance(c, (list, tuple)) else c for c in choices}
    if isinstance(value, list):
        return [v for v in value if v in known]
    return value if value in known else None


def wire_presets(app, tab: SettingsTab, fields: dict, outputs: Path, tabs: gr.Tabs, form_tab: str) -> None:
    """Save, load and delete presets; `fields` are the form's components by preset field name
    (`presets.PRESET_FIELDS`); a loaded preset switches `tabs` to `form_tab`."""
    names = [k for k in PRESET_FIELDS if k in fields]
    components = [fields[k] for k in names]

    def listed(value=None):
        return gr.update(choices=list_presets(outputs), value=value)

    def save(name, *values):
        try:
            path = save_preset(outputs, name, dict(zip(names, values, strict=True)))
        except (ValueError, OSError) as e:
            return note_html(error_sentence(e)), gr.update()
        return note_html(f"Saved the preset {path.stem!r}.", "ok"), listed(path.stem)

    def load(name):
        untouched = {c: gr.update() for c in components}
        if not name:
            return {**untouched, tab.message: note_html("Pick a preset first."), tabs: gr.update()}
        try:
            values = load_preset(outputs, name)
        except ValueError as e:
            return {**untouched, tab.message: note_html(error_sentence(e)), tabs: gr.update()}
        for k, v in values.items():
            v = _allowed(fields[k], v)
            if v is not None:
                untouched[fields[k]] = gr.update(value=v)
        note = note_html(f"Loaded the preset {name!r}.", "ok")
        return {**untouched, tab.message: note, tabs: gr.Tabs(selected=form_tab)}

    def delete(name):
        if not name:
            return note_html("Pick a preset first."), gr.update()
        try:
            gone = delete_preset(outputs, name)
        except (ValueError, OSError) as e:
            return note_html(error_sentence(e)), gr.update()
        text = f"Deleted the preset {name!r}." if gone else f"There is no preset named {name!r}."
        return note_html(text, "ok" if gone else "error"), listed()

    private = dict(api_visibility="private", show_progress="hidden")
    tab.save.click(save, inputs=[tab.name, *components], outputs=[tab.message, tab.pick], **private)
    tab.load.click(load, inputs=[tab.pick], outputs=[*components, tab.message, tabs], **private)
    tab.delete.click(delete, inputs=[tab.pick], outputs=[tab.message, tab.pick], **private)
    app.load(lambda: listed(), outputs=[tab.pick], **private)
