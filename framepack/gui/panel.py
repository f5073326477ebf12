"""The live panel of the Generate tab: the watched job's progress, latent preview, video so far and
downloads, and its Cancel button.

Each browser tab polls (a `gr.Timer`, wired by `app`) the job it watches and sends a component only
when it changed: the tab's `seen` state remembers what it was sent (`panel_updates`).
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from .view import job_label, live_preview, progress_html

__all__ = [
    "JobPanel",
    "add_job_panel",
    "job_choices",
    "panel_updates",
    "preview_image",
    "watch_new_jobs",
    "wire_job_panel",
]


@dataclass
class JobPanel:
    """The components that show the watched job."""

    progress: gr.HTML
    preview: gr.Image
    watch: gr.Dropdown
    cancel: gr.Button
    video: gr.Video
    files: gr.File


def preview_image(label: str, height: int, elem_id: str, **kwargs) -> gr.Image:
    """An image that shows a latent preview (sent as PNG, not editable)."""
    return gr.Image(label=label, format="png", height=height, interactive=False, elem_id=elem_id, **kwargs)


def add_job_panel() -> JobPanel:
    """The watched job's panel inside the current column."""
    progress = gr.HTML(progress_html(None), elem_id="fp-progress")
    preview = preview_image("Latent preview (current step), or the one-frame result", 240, "fp-preview")
    # Below the preview: error toasts (top right) never cover the Cancel button.
    with gr.Row():
        # Custom values pass: a watched job that "Clear finished" took off is simply not shown.
        watch = gr.Dropdown(
            choices=[], value=None, label="Watched job", elem_id="fp-watch", scale=3, allow_custom_value=True
        )
        cancel = gr.Button("Cancel job", variant="stop", elem_id="fp-cancel", scale=1)
    video = gr.Video(label="Video so far", interactive=False, elem_id="fp-video")
    files = gr.File(
        label="Downloads", file_count="multiple", interactive=False, elem_id="fp-files", height=140
    )
    return JobPanel(progress, preview, watch, cancel, video, files)


def job_choices(jobs) -> list[tuple[str, int]]:
    """The watched-job dropdown's choices: the jobs, newest first."""
    return [(job_label(j), j.id) for j in reversed(jobs)]


def watch_new_jobs(queue, panel: JobPanel, job_id: gr.Number) -> None:
    """A new job of this tab (its id arrives in `job_id`) becomes the watched one."""
    job_id.change(
        lambda job_id: (
            gr.update(choices=job_choices(queue.jobs()), value=int(job_id)) if job_id else gr.update()
        ),
        inputs=[job_id],
        outputs=[panel.watch],
        show_progress="hidden",
        api_visibility="private",
    )


def wire_job_panel(panel: JobPanel, seen: gr.State, cancel) -> None:
    """The Cancel button (`cancel(job_id)`); a newly watched job is sent in full on the next tick."""
    panel.cancel.click(
        cancel,
        inputs=[panel.watch],
        outputs=None,
        api_name="cancel_watched",
        api_visibility="private",
        show_progress="hidden",
    )
    panel.watch.change(
        lambda s: {**(s or {}), "job": None, "preview": None, "video": None, "files": None},
        inputs=[seen],
        outputs=[seen],
        show_progress="hidden",
        api_visibility="private",
    )


def panel_updates(queue, panel: JobPanel, jobs: list, job_id, memo: dict) -> dict:
    """The panel's components that changed since this tab's last tick (`memo`, updated in place:
    what it was sent), for the watched job `job_id` among `jobs` (the queue's copies)."""
    out = {}
    ids = [j.id for j in jobs]
    if memo.get("ids") != ids:
        memo["ids"] = ids
        out[panel.watch] = gr.update(choices=job_choices(jobs))
    job = queue.get(int(job_id)) if job_id is not None else None
    if job is None:
        return out
    key = (job.id, job.version)
    if memo.get("job") != key:
        memo["job"] = key
        out[panel.progress] = progress_html(job, queue.position(job.id))
    key = (job.id, job.steps_done, job.image is not None)
    if memo.get("preview") != key:
        memo["preview"] = key
        if job.image is not None and job.image.is_file():  # a one-frame job's result
            out[panel.preview] = str(job.image)
        else:
            out[panel.preview] = live_preview(job)
    key = (job.id, job.video_version)
    if memo.get("video") != key:
        memo["video"] = key
        out[panel.video] = str(job.video) if job.video is not None and job.video.is_file() else None
    key = (job.id, job.state)
    if memo.get("files") != key:
        memo["files"] = key
        files = [job.video, job.image, job.gif, job.sidecar]
        files = [p for p in files if p is not None and p.is_file()]
        out[panel.files] = [str(p) for p in files] if job.ended_state else None
    return out
