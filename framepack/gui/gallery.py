"""The gallery of finished videos in the outputs folder: refreshed by a timer, a click selects a
video and shows its files (and lets `load_settings` load its settings)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from .load_settings import add_sidecar_upload
from .view import finished_videos

__all__ = ["Gallery", "add_gallery", "gallery_refresher", "select_video", "wire_gallery"]


@dataclass
class Gallery:
    """The gallery's components; `selected` holds the selected row (video, gif or None, sidecar)."""

    gallery: gr.Gallery
    files: gr.File
    reuse: gr.Button
    selected: gr.State
    upload: gr.File  # a sidecar (or mp4) to load the settings of
    message: gr.HTML  # what loading said


def add_gallery() -> Gallery:
    """The gallery, the selected video's files, its Load button, the upload of a sidecar to load
    and the line that says what loading did."""
    gallery = gr.Gallery(
        label="Finished videos (newest first; click one to select it)",
        columns=5,
        height=460,
        preview=False,
        object_fit="contain",
        fit_columns=False,
        elem_id="fp-gallery",
        interactive=False,
    )
    with gr.Row():
        files = gr.File(label="Selected video's files", file_count="multiple", interactive=False, height=200)
        with gr.Column():
            reuse = gr.Button("Load the selected video's settings", elem_id="fp-reuse", variant="primary")
            upload = add_sidecar_upload()
            message = gr.HTML("", elem_id="fp-load-message", padding=False)
    return Gallery(gallery, files, reuse, gr.State(None), upload, message)


def gallery_refresher(outputs: Path):
    """`refresh_gallery(gallery_seen)`: (captions, rows, key) of the finished videos, or skips when
    their list is still `gallery_seen`."""

    def refresh_gallery(gallery_seen):
        found = finished_videos(outputs)
        key = [str(v) for v, _, _ in found]
        if key == gallery_seen:
            return gr.skip(), gr.skip(), gr.skip()
        captions = []
        for v, _, sidecar in found:
            try:
                text = json.loads(sidecar.read_text(encoding="utf-8"))["settings"]["prompt"]
            except (OSError, ValueError, KeyError, TypeError):
                text = v.stem
            captions.append((str(v), text[:80]))
        rows = [[str(v), str(g) if g else None, str(s)] for v, g, s in found]
        return captions, rows, key

    return refresh_gallery


def select_video(items, evt: gr.SelectData):
    row = items[evt.index] if items and 0 <= evt.index < len(items) else None
    if row is None:
        return None, None
    return row, [p for p in row if p]


def wire_gallery(app: gr.Blocks, gallery: Gallery, items: gr.State, outputs: Path) -> None:
    """Refresh the gallery on load and every 2 s (`items`: its rows); a click selects a video."""
    gallery_key = gr.State(None)
    gallery_timer = gr.Timer(2.0)
    gr.on(
        [app.load, gallery_timer.tick],
        gallery_refresher(outputs),
        inputs=[gallery_key],
        outputs=[gallery.gallery, items, gallery_key],
        show_progress="hidden",
        api_visibility="private",
    )
    gallery.gallery.select(
        select_video, inputs=[items], outputs=[gallery.selected, gallery.files], api_visibility="private"
    )
