"""The GUI's Resume section: the unfinished job directories of the outputs folder and a button that
queues the chosen one (`JobQueue.resume`).

A job directory `OUT/NAME.job` stays behind whenever a run stops before its video is finished: a
cancelled GUI job, a crashed or stopped server, an interrupted `framepack generate`. Listing them
reads only their `job.json` and counts their committed sections; nothing is loaded. The jobs the
queue holds (queued or running) are left out, and so are those another process is running (their
lock is held, `framepack.pipeline.joblock`). `unfinished_jobs` imports no Gradio.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..pipeline.joblock import JobLock
from ..pipeline.jobs import JOB_SUFFIX
from ..pipeline.plan import sections_for

__all__ = ["ResumePicker", "Unfinished", "add_resume_picker", "unfinished_jobs", "wire_resume"]


@dataclass(frozen=True)
class Unfinished:
    """An unfinished job directory, as listed for resuming."""

    path: Path
    prompt: str
    sections_done: int
    sections: int | None  # None when the job's settings do not say
    modified: float  # the last commit's time (seconds since the epoch)

    @property
    def label(self) -> str:
        prompt = " ".join(self.prompt.split())
        prompt = prompt if len(prompt) <= 60 else prompt[:59] + "…"
        total = "?" if self.sections is None else self.sections
        return f"{prompt} · {self.sections_done}/{total} sections done · {self.path.stem}"


def _sections(settings: dict, manifest) -> int | None:
    """The job's number of sections, from its settings and the model's defaults."""
    try:
        if settings.get("sections"):
            return int(settings["sections"])
        window = int(settings.get("window") or manifest.window)
        return sections_for(float(settings["seconds"]), window, int(settings.get("fps") or manifest.fps))
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def unfinished_jobs(outputs: str | Path, manifest=None, exclude: set[Path] = frozenset()) -> list[Unfinished]:
    """The unfinished job directories right in `outputs`, last touched first, but those in `exclude`
    (resolved paths) and those another process runs. One whose `job.json` cannot be read is listed
    with its name as the prompt, so resuming it fails with its one sentence."""
    found = []
    for root in Path(outputs).glob(f"*{JOB_SUFFIX}"):
        if not (root / "job.json").is_file() or root.resolve() in exclude:
            continue
        if JobLock(root).holder() is not None:  # a CLI run or another server is working in it
            continue
        try:
            settings = json.loads((root / "job.json").read_text(encoding="utf-8"))["settings"]
            prompt = str(settings["prompt"])
        except (OSError, ValueError, KeyError, TypeError):
            settings, prompt = {}, root.stem
        commits = list((root / "sections").glob("[0-9]*.safetensors"))
        modified = max([p.stat().st_mtime for p in commits] + [(root / "job.json").stat().st_mtime])
        found.append(Unfinished(root, prompt, len(commits), _sections(settings, manifest), modified))
    return sorted(found, key=lambda u: u.modified, reverse=True)


@dataclass
class ResumePicker:
    """The unfinished job to resume and its Resume button."""

    pick: object  # gr.Dropdown
    button: object  # gr.Button


def add_resume_picker() -> ResumePicker:
    """The Unfinished jobs accordion, inside the current column."""
    import gradio as gr

    with gr.Accordion("Unfinished jobs: resume one", open=True, elem_id="fp-resume"):
        with gr.Row():
            pick = gr.Dropdown(
                choices=[],
                value=None,
                label="Unfinished job (prompt · sections done · name)",
                elem_id="fp-resume-pick",
                scale=3,
                allow_custom_value=True,  # /resume takes any path; JobQueue.resume checks it
            )
            button = gr.Button("Resume", elem_id="fp-resume-button", scale=1)
    return ResumePicker(pick, button)


def wire_resume(
    app, picker: ResumePicker, queue, outputs: Path, follow, results: list, refresh_seconds: float = 2.0
) -> None:
    """The list's refresh (on load and by a timer, which must sit outside the page's tabs), and the
    Resume button, which is also the `/resume` API (a job directory's path).

    `follow(job)` is the async generator of updates to `results` that `/generate` answers with:
    the job's id at once (so the tab watches it), then its video and info once it has ended.
    """
    import asyncio

    import gradio as gr

    listed = gr.State(None)

    def refresh(current, seen):
        found = unfinished_jobs(outputs, queue.bundle.manifest, queue.job_dirs())
        choices = [(u.label, str(u.path)) for u in found]
        if choices == seen:
            return gr.skip(), gr.skip()
        keep = current if current in {path for _, path in choices} else None
        return gr.update(choices=choices, value=keep), choices

    timer = gr.Timer(refresh_seconds)
    gr.on(
        [app.load, timer.tick],
        refresh,
        inputs=[picker.pick, listed],
        outputs=[picker.pick, listed],
        show_progress="hidden",
        api_visibility="private",
    )

    async def resume(job_dir: str | None):
        """Queue the rest of an unfinished job of the outputs folder and wait for it; returns (job id,
        the mp4, an info dict) as /generate does."""
        if not job_dir:
            raise gr.Error("Select an unfinished job first.", print_exception=False)
        job = await asyncio.to_thread(queue.resume, job_dir)
        async for update in follow(job):
            yield update

    picker.button.click(
        resume,
        inputs=[picker.pick],
        outputs=results,
        api_name="resume",
        show_progress="hidden",
        trigger_mode="multiple",
        concurrency_limit=None,
    )
