"""The Gradio page of `framepack serve`: the form, the watched job, the queue, the unfinished jobs to
resume, the gallery, and the events between them.

Each part is built by its own module (`inputs`, `panel`, `endpoints`, `resume`, `gallery`,
`load_settings`); this one lays them out and wires them. Handlers only translate between Gradio and
`JobQueue` / `form` / `view`; the queue's one worker thread does the generating.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from .endpoints import add_generate, add_results, cancel_handler, follower, generate_handler
from .form import demo_examples
from .gallery import add_gallery, wire_gallery
from .inputs import add_form_inputs
from .jobs import JobQueue
from .load_settings import add_sidecar_upload, form_filler, wire_load_settings
from .panel import add_job_panel, add_queue_table, watch_new_jobs, wire_job_panel
from .resume import add_resume_section

__all__ = ["build_app", "launch", "CSS"]

CSS = """
.fp-progress progress { width: 100%; height: 14px; }
.fp-progress span { display: block; margin-top: 4px; }
.fp-queue { width: 100%; border-collapse: collapse; font-size: 0.9em; }
.fp-queue td, .fp-queue th { border-bottom: 1px solid #8884; padding: 3px 6px; text-align: left; }
tr[data-state="failed"] .fp-state { color: #c62828; }
tr[data-state="done"] .fp-state { color: #2e7d32; }
"""


def _theme():
    # System fonts only: the page loads nothing from outside this server.
    return gr.themes.Default(
        font=["system-ui", "Segoe UI", "Roboto", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )


def build_app(
    queue: JobQueue,
    outputs: str | Path,
    tick_seconds: float = 0.5,
    loras_dir: str | Path | None = None,
    examples: list[tuple[str | None, str]] | None = None,
) -> gr.Blocks:
    """The GUI around `queue`; finished videos are read from (and inputs stored in) `outputs`.

    `loras_dir`: a folder of LoRAs to pick from; `examples`: (start image or None, prompt) pairs
    (default: the demo model's examples when the bundle is the shipped demo model).
    """
    outputs = Path(outputs).resolve()
    m = queue.bundle.manifest
    loras_dir = Path(loras_dir).resolve() if loras_dir else None
    if examples is None:
        examples = demo_examples(getattr(queue.bundle, "root", None))

    # Gradio copies every shown file (previews, videos) into its cache; files older than a day go.
    with gr.Blocks(title="FramePack", analytics_enabled=False, delete_cache=(3600, 86400)) as app:
        gr.Markdown("## FramePack: image to video, one section at a time")
        seen = gr.State({})  # what this tab's panel was sent (see `panel`)
        gallery_items = gr.State([])  # the gallery's rows: (video, gif or None, sidecar)
        with gr.Row():
            with gr.Column(scale=1):
                form = add_form_inputs(m, loras_dir, examples)
                sidecar_upload = add_sidecar_upload()
            with gr.Column(scale=1):
                panel = add_job_panel()
        results = add_results()
        follow = follower(queue, results)
        queue_table = add_queue_table()
        # Unfinished jobs (cancelled, crashed, CLI): /resume answers as /generate does.
        add_resume_section(app, queue, outputs, follow, results.outputs)
        gallery = add_gallery()

        add_generate(
            form.generate, form.inputs, generate_handler(queue, outputs, m, loras_dir, follow), results
        )
        watch_new_jobs(queue, panel, results.job)
        cancel = cancel_handler(queue)
        gr.api(cancel, api_name="cancel")
        wire_job_panel(queue, panel, queue_table, seen, cancel, tick_seconds)
        wire_gallery(app, gallery, gallery_items, outputs)
        fill_form = form_filler(form.fields, outputs, m, loras_dir)
        wire_load_settings(fill_form, form.inputs, sidecar_upload, gallery.reuse, gallery.selected)
    return app


def launch(
    app: gr.Blocks,
    outputs: str | Path,
    host: str = "127.0.0.1",
    port: int = 7860,
    auth: list[tuple[str, str]] | None = None,
    block: bool = True,
):
    """Serve `app`; only the outputs folder (and Gradio's own cache) can be fetched through it."""
    return app.queue(default_concurrency_limit=1).launch(
        server_name=host,
        server_port=port,
        auth=auth or None,
        allowed_paths=[str(Path(outputs).resolve())],
        max_file_size="64mb",
        prevent_thread_lock=not block,
        show_error=False,
        theme=_theme(),
        css=CSS,
        footer_links=["api"],
        quiet=False,
    )
