"""The Gradio page of `framepack serve`: four tabs and the events between them.

- Generate: the form (with the prompt's timeline of sections) beside the action row (Generate and
  its message) and the live panel of the watched job;
- Queue: the running job's progress and preview, the run order, the queue table, the buttons for a
  picked job (Cancel, Remove, Move up, Move down), Clear finished, and the unfinished jobs to resume;
- Finished: the gallery, and loading a finished video's settings into the form;
- Settings: presets of the form, and what the server runs with.

Each part is built by its own module (`inputs`, `panel`, `endpoints`, `queue_tab`, `resume`,
`gallery`, `load_settings`, `settings_tab`); this one lays them out and wires them. The timers sit
outside the tabs (a tab's contents are only mounted once it is shown). Handlers only translate
between Gradio and `JobQueue` / `form` / `view`; the queue's one worker thread does the generating.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from .endpoints import (
    add_generate,
    add_results,
    cancel_handler,
    follower,
    generate_handler,
    page_generate_handler,
)
from .form import demo_examples
from .gallery import add_gallery, wire_gallery
from .inputs import add_action_row, add_form_inputs
from .jobs import JobQueue
from .load_settings import form_filler, wire_load_settings
from .panel import add_job_panel, panel_updates, watch_new_jobs, wire_job_panel
from .queue_tab import add_queue_tab, queue_tab_updates, wire_queue_tab
from .resume import add_resume_picker, wire_resume
from .settings_tab import add_settings_tab, server_html, wire_presets
from .timeline import timeline_html

__all__ = ["build_app", "launch", "CSS", "TABS"]

TABS = ("generate", "queue", "finished", "settings")  # the tabs' ids, in order

CSS = """
.fp-progress progress { width: 100%; height: 14px; }
.fp-progress span { display: block; margin-top: 4px; }
.fp-queue { width: 100%; border-collapse: collapse; font-size: 0.9em; }
.fp-queue td, .fp-queue th { border-bottom: 1px solid #8884; padding: 3px 6px; text-align: left; }
tr[data-state="failed"] .fp-state { color: #c62828; }
tr[data-state="done"] .fp-state { color: #2e7d32; }
/* The side column (Generate, the live panel) stays in view while the form scrolls; Gradio's
   container hides overflow, which would turn sticky off, and clip does not. */
.gradio-container { overflow: clip !important; }
#fp-side { position: sticky; top: 8px; align-self: flex-start; }
.fp-note { padding: 6px 10px; border-radius: 6px; font-size: 0.95em; }
.fp-note[data-kind="error"] { background: #c628281a; color: #c62828; border: 1px solid #c6282866; }
.fp-note[data-kind="ok"] { background: #2e7d321a; color: #2e7d32; border: 1px solid #2e7d3266; }
.fp-timeline { font-size: 0.85em; }
.fp-timeline-bar { display: flex; gap: 3px; }
.fp-section { min-width: 0; border-top: 5px solid; padding: 2px 4px; background: #8881; overflow: hidden; }
.fp-section b { display: block; font-weight: 600; white-space: nowrap; }
.fp-section span { display: block; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.fp-timeline-summary { opacity: 0.75; margin-top: 2px; }
.fp-timeline-error { color: #c62828; }
.fp-order ol { margin: 4px 0 0 0; padding-left: 1.6em; }
.fp-order li[data-state="running"] { font-weight: 600; }
.fp-server th { text-align: left; padding-right: 16px; font-weight: 600; }
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
        results = add_results()
        with gr.Tabs(elem_id="fp-tabs") as tabs:
            with gr.Tab("Generate", id="generate", elem_id="fp-tab-generate"):
                with gr.Row():
                    with gr.Column(scale=1):
                        form = add_form_inputs(m, loras_dir, examples)
                    with gr.Column(scale=1, elem_id="fp-side"):
                        actions = add_action_row()
                        panel = add_job_panel()
            with gr.Tab("Queue", id="queue", elem_id="fp-tab-queue"):
                queue_tab = add_queue_tab()
                # Unfinished jobs (cancelled, crashed, CLI): /resume answers as /generate does.
                resume_picker = add_resume_picker()
            with gr.Tab("Finished", id="finished", elem_id="fp-tab-finished"):
                gallery = add_gallery()
            with gr.Tab("Settings", id="settings", elem_id="fp-tab-settings"):
                settings_tab = add_settings_tab(outputs, server_html(queue, outputs, loras_dir))

        follow = follower(queue, results)
        fields = {**form.fields, "random_seed": form.random_seed}
        add_generate(
            actions.generate,
            form.inputs,
            generate_handler(queue, outputs, m, loras_dir, follow),
            results,
            page_generate_handler(queue, outputs, m, loras_dir, follow, actions.message, form.fields["seed"]),
            form.random_seed,
            actions.message,
            form.fields["seed"],
        )
        _wire_timeline(app, form, m)
        wire_resume(app, resume_picker, queue, outputs, follow, results.outputs)
        watch_new_jobs(queue, panel, results.job)
        cancel = cancel_handler(queue)
        gr.api(cancel, api_name="cancel")
        wire_job_panel(panel, seen, cancel)
        wire_queue_tab(queue, queue_tab)
        _wire_live(queue, panel, queue_tab, seen, tick_seconds)
        wire_gallery(app, gallery, gallery_items, outputs)
        fill_form = form_filler(fields, outputs, m, loras_dir, gallery.message, tabs, "generate")
        load_outputs = [*fields.values(), gallery.message, tabs]
        wire_load_settings(fill_form, load_outputs, gallery.upload, gallery.reuse, gallery.selected)
        wire_presets(app, settings_tab, fields, outputs, tabs, "generate")
    return app


def _wire_timeline(app: gr.Blocks, form, manifest) -> None:
    """The prompt's timeline follows the prompt, the length and the window as they change."""
    f = form.fields
    gr.on(
        [app.load, f["prompt"].change, f["seconds"].change, f["window"].change],
        lambda prompt, seconds, window: timeline_html(prompt, seconds, window, manifest.fps),
        inputs=[f["prompt"], f["seconds"], f["window"]],
        outputs=[form.timeline],
        show_progress="hidden",
        trigger_mode="always_last",
        api_visibility="private",
        concurrency_limit=None,
    )


def _wire_live(queue: JobQueue, panel, queue_tab, seen: gr.State, tick_seconds: float) -> None:
    """One timer per browser tab updates the watched job's panel and the Queue tab, sending only
    what changed (`seen`: what this browser tab was sent)."""

    def tick(job_id, memo):
        memo = dict(memo or {})
        jobs = queue.jobs()
        out = panel_updates(queue, panel, jobs, job_id, memo)
        out |= queue_tab_updates(queue_tab, jobs, memo)
        return {**out, seen: memo}

    q = queue_tab
    timer = gr.Timer(tick_seconds)
    timer.tick(
        tick,
        inputs=[panel.watch, seen],
        outputs=[seen, panel.watch, panel.progress, panel.preview, panel.video, panel.files]
        + [q.pick, q.table, q.order, q.running, q.preview],
        show_progress="hidden",
        api_visibility="private",
        concurrency_limit=None,
    )


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
