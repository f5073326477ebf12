"""The Queue tab: the running job's progress and preview, the run order, the queue table, and for
a picked job Cancel, Remove, Move up and Move down; Clear finished.

`queue_action` is the one place the buttons act on the `JobQueue` (and says what it did in one
sentence); `queue_tab_updates` is this tab's share of the page's timer tick.
"""

from __future__ import annotations

import html
import time
from dataclasses import dataclass

import gradio as gr

from .endpoints import note_html
from .jobs import QUEUED, RUNNING
from .panel import job_choices, preview_image
from .view import job_label, live_preview, progress_html, queue_html

__all__ = [
    "ACTIONS",
    "QueueTab",
    "add_queue_tab",
    "queue_action",
    "queue_tab_updates",
    "run_order_html",
    "wire_queue_tab",
]

ACTIONS = ("cancel", "remove", "up", "down", "clear")
NOTHING_RUNS = '<div class="fp-progress" data-state="none">Nothing is running.</div>'


@dataclass
class QueueTab:
    """The Queue tab's components."""

    running: gr.HTML  # the running job's progress
    preview: gr.Image  # the running job's latent preview
    order: gr.HTML  # the run order: the running job, then the queued ones
    table: gr.HTML
    pick: gr.Dropdown
    buttons: dict[str, gr.Button]  # by action (`ACTIONS`)
    message: gr.HTML


def add_queue_tab() -> QueueTab:
    """The Queue tab's contents, inside the current tab."""
    with gr.Row():
        with gr.Column(scale=3):
            running = gr.HTML(NOTHING_RUNS, elem_id="fp-queue-running", label="Running")
            order = gr.HTML(run_order_html([]), elem_id="fp-queue-order")
        preview = preview_image("Running job: latent preview", 180, "fp-queue-preview", scale=2)
    with gr.Row(equal_height=True):
        # Custom values pass: a picked job another tab removed is answered by `queue_action`.
        pick = gr.Dropdown(
            choices=[], value=None, label="Job", elem_id="fp-queue-pick", scale=3, allow_custom_value=True
        )
        labels = {
            "cancel": ("Cancel", "stop"),
            "remove": ("Remove", "secondary"),
            "up": ("Move up", "secondary"),
            "down": ("Move down", "secondary"),
            "clear": ("Clear finished", "secondary"),
        }
        buttons = {
            action: gr.Button(text, variant=variant, elem_id=f"fp-queue-{action}", scale=1, min_width=90)
            for action, (text, variant) in labels.items()
        }
    message = gr.HTML("", elem_id="fp-queue-message", padding=False)
    table = gr.HTML(queue_html([]), elem_id="fp-queue")
    return QueueTab(running, preview, order, table, pick, buttons, message)


def run_order_html(jobs: list) -> str:
    """The running job, then the queued ones in the order they will run (`jobs`: a
    `JobQueue.jobs` snapshot, whose queued jobs come in that order)."""
    running = [j for j in jobs if j.state == RUNNING]
    queued = [j for j in jobs if j.state == QUEUED]
    if not running and not queued:
        return '<div class="fp-order" data-empty="1">Run order: nothing is queued.</div>'
    items = [
        f'<li data-job="{j.id}" data-state="{j.state}">{html.escape(job_label(j))}</li>'
        for j in running + queued
    ]
    return f'<div class="fp-order">Run order:<ol>{"".join(items)}</ol></div>'


def queue_action(queue, action: str, job_id) -> tuple[str, str]:
    """Do `action` (`ACTIONS`) to job `job_id`; returns (kind: ok or error, one sentence)."""
    if action == "clear":
        n = queue.clear_finished()
        return (
            ("ok", f"Cleared {n} finished job{'s' if n != 1 else ''}.")
            if n
            else ("error", "No job has ended.")
        )
    if job_id is None:
        return "error", "Pick a job first."
    job_id = int(job_id)
    job = queue.get(job_id)
    if job is None:
        return "error", f"Job #{job_id} is no longer listed."
    if action == "cancel":
        if queue.cancel(job_id):
            return "ok", f"Cancelling job #{job_id}."
        return "error", f"Job #{job_id} is {job.state}; there is nothing to cancel."
    if action == "remove":
        if queue.remove(job_id):
            return "ok", f"Removed job #{job_id}."
        return "error", f"Job #{job_id} is running; cancel it first."
    up = action == "up"
    before = queue.position(job_id)
    if not queue.move(job_id, -1 if up else 1):
        return "error", f"Job #{job_id} is {job.state}; only queued jobs can be moved."
    if queue.position(job_id) == before:
        return "error", f"Job #{job_id} is already {'next' if up else 'last'} in line."
    return "ok", f"Moved job #{job_id} {'up' if up else 'down'}."


def queue_tab_updates(tab: QueueTab, jobs: list, memo: dict) -> dict:
    """The tab's components that changed since this browser tab's last tick (`memo`, updated in
    place), from `jobs` (one `JobQueue.jobs` snapshot).

    The tick is the only writer of the table, the run order and the running job, and every key
    comes from the snapshot itself, so what a tab was sent always matches its memo. The job picker
    gets new choices only: its value is the user's.
    """
    out = {}
    ids = [j.id for j in jobs]
    if memo.get("queue_ids") != ids:
        memo["queue_ids"] = ids
        out[tab.pick] = gr.update(choices=job_choices(jobs))
    running = next((j for j in jobs if j.state == RUNNING), None)
    # A running job's row shows its ETA: refresh the table once a second while one runs.
    table_key = (tuple((j.id, j.version) for j in jobs), int(time.time()) if running else 0)
    if memo.get("table") != table_key:
        memo["table"] = table_key
        out[tab.table] = queue_html(jobs)
        out[tab.order] = run_order_html(jobs)
    key = (running.id, running.version) if running else None
    if memo.get("running") != key:
        memo["running"] = key
        out[tab.running] = progress_html(running) if running else NOTHING_RUNS
    key = (running.id, running.steps_done) if running and running.preview is not None else None
    if memo.get("running_preview") != key:
        memo["running_preview"] = key
        out[tab.preview] = live_preview(running) if key else None
    return out


def wire_queue_tab(queue, tab: QueueTab) -> None:
    """Each button acts on the picked job (`queue_action`) and says what it did; the table and
    the run order follow on the next tick (`queue_tab_updates`)."""

    def handler(action):
        def act(job_id):
            kind, text = queue_action(queue, action, job_id)
            return note_html(text, kind)

        return act

    for action, button in tab.buttons.items():
        button.click(
            handler(action),
            inputs=[tab.pick],
            outputs=[tab.message],
            show_progress="hidden",
            api_visibility="private",
            concurrency_limit=None,
        )
