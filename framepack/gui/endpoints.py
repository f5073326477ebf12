"""The HTTP API of the GUI: `/generate` (the Generate button), `/cancel`, and the hidden results
they answer with, which `/resume` shares.

`/generate` submits a job and returns when it has ended, with the video as a file, so
`gradio_client` scripts drive the same queue as the page. The Generate button checks the form first
(`page_generate_handler`): a form that cannot be queued says why beside the button and makes no
job; `/generate` itself still turns bad input into a failed job with its one sentence.
"""

from __future__ import annotations

import asyncio
import html
import secrets
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from .form import DEFAULT_COLOUR, FIELDS, ONE_FRAME_GROUPS, FormValues, Request, request_from_form
from .jobs import FAILED, JobQueue, describe_error
from .timeline import section_prompts
from .view import progress_text

__all__ = [
    "Results",
    "add_results",
    "job_info",
    "follower",
    "generate_handler",
    "cancel_handler",
    "add_generate",
    "checked_request",
    "error_sentence",
    "form_problem",
    "page_generate_handler",
    "note_html",
]


@dataclass
class Results:
    """The hidden components an API call answers with: the job's id, its video, an info dict."""

    job: gr.Number
    video: gr.File
    info: gr.JSON

    @property
    def outputs(self) -> list:
        return [self.job, self.video, self.info]


def add_results() -> Results:
    return Results(
        gr.Number(visible=False, precision=0, label="job"),
        gr.File(visible=False, label="video"),
        gr.JSON(visible=False, label="info"),
    )


def job_info(job) -> dict:
    """What an API call tells of an ended job (file names relative to the outputs folder)."""
    return {
        "job": job.id,
        "state": job.state,
        "frames": job.frames,
        "seconds": round(job.video_seconds, 3),
        "seed": job.settings.seed,
        "video": job.video.name if job.video else None,
        "image": job.image.name if job.image else None,
        "gif": job.gif.name if job.gif else None,
        "sidecar": job.sidecar.name if job.sidecar else None,
    }


def follower(queue: JobQueue, results: Results):
    """`follow(job)`: the async generator of updates to `results` that the API calls answer with."""

    async def follow(job):
        """The job's id at once (the tab watches it), then, once it has ended, its result."""
        yield {results.job: job.id}
        while not job.ended_state:
            await asyncio.sleep(0.2)
            job = queue.get(job.id)
        if job.state == FAILED:
            raise gr.Error(progress_text(job), print_exception=False)
        result = job.video or job.image
        yield {
            results.job: job.id,
            results.video: str(result) if result else None,
            results.info: job_info(job),
        }

    return follow


def generate_handler(queue: JobQueue, outputs: Path, manifest, loras_dir: Path | None, follow):
    """The `/generate` function: its parameters are the form's fields (`form.FIELDS`), in order."""

    async def generate(
        image,
        end_image,
        prompt,
        negative_prompt,
        seconds,
        seed,
        steps,
        distilled_cfg,
        cfg,
        window,
        order,
        resolution,
        crf,
        gif,
        cache,
        cache_threshold,
        vram_budget,
        sampler="unipc",
        png=False,
        t2v_colour=DEFAULT_COLOUR,
        loop=False,
        video=None,
        one_frame=False,
        one_frame_index=manifest.window,
        one_frame_groups=ONE_FRAME_GROUPS,
        keyframe_images=None,
        keyframe_times="",
        loras=None,
        lora_files=None,
        lora_scales="",
    ):
        """Queue one generation and wait for it; returns (job id, the mp4 or one-frame PNG, an info dict)."""
        form = FormValues(**{k: v for k, v in locals().items() if k in FIELDS})
        try:
            request = await asyncio.to_thread(request_from_form, form, outputs, loras_dir)
        except ValueError as e:
            job = queue.reject(prompt or "", describe_error(e))
        else:
            job = await asyncio.to_thread(queue.submit, request.settings, **request.submit_kwargs())
        async for update in follow(job):
            yield update

    return generate


def cancel_handler(queue: JobQueue):
    """The `/cancel` function (also the Cancel button's)."""

    def cancel(job_id: int | None) -> str:
        """Cancel a job: a queued one is dropped, a running one stops within a sampling step."""
        if job_id is None:
            raise gr.Error("No job is selected.", print_exception=False)
        job = queue.get(int(job_id))
        if not queue.cancel(int(job_id)):
            state = job.state if job else "unknown"
            raise gr.Error(f"Job #{job_id} is {state}; there is nothing to cancel.", print_exception=False)
        return f"Cancelling job #{job_id}."

    return cancel


def note_html(text: str, kind: str = "error") -> str:
    """A one-line message on the page (`kind`: error, info or ok); empty text clears it."""
    if not text:
        return ""
    return f'<div class="fp-note" data-kind="{kind}">{html.escape(text)}</div>'


def checked_request(form: FormValues, outputs: Path, manifest, loras_dir: Path | None) -> Request:
    """The form's request, checked as far as it can be without the model: the form's own checks
    (`request_from_form`, which stores its uploads) and the timed prompt against the planned
    sections (`timeline.section_prompts`); raises ValueError."""
    request = request_from_form(form, outputs, loras_dir)
    if request.one_frame is None:
        s = request.settings
        section_prompts(s.prompt, s.seconds, s.window or manifest.window, manifest.fps)
    return request


def form_problem(form: FormValues, outputs: Path, manifest, loras_dir: Path | None) -> str | None:
    """Why the form cannot be queued (one sentence, capitalised; see `checked_request`), or None."""
    try:
        checked_request(form, outputs, manifest, loras_dir)
    except ValueError as e:
        return error_sentence(e)
    return None


def error_sentence(e: BaseException) -> str:
    """An error as one sentence for the page (`describe_error`), capitalised."""
    text = describe_error(e)
    return text[:1].upper() + text[1:]


def page_generate_handler(queue: JobQueue, outputs: Path, manifest, loras_dir, follow, message, seed):
    """The Generate button's function: `(random_seed, *fields)`, the values of the moment it was
    pressed. A form that cannot be queued says why in `message` and makes no job; else the job is
    queued (with a drawn seed, shown in `seed`, when `random_seed`) and followed as `/generate`
    does, but a failed job is told in `message` (and a toast), not raised: a raised error would mark
    the seed box as failed."""

    async def page_generate(random_seed, *values):
        form = FormValues(**dict(zip(FIELDS, values, strict=True)))
        if random_seed:
            form.seed = str(secrets.randbelow(2**31))
        try:
            request = await asyncio.to_thread(checked_request, form, outputs, manifest, loras_dir)
        except ValueError as e:
            yield {message: note_html(error_sentence(e))}
            return
        yield {message: "", seed: gr.update(value=form.seed) if random_seed else gr.update()}
        job = await asyncio.to_thread(queue.submit, request.settings, **request.submit_kwargs())
        try:
            async for update in follow(job):
                yield update
        except gr.Error as e:
            gr.Warning(e.message)
            yield {message: note_html(e.message)}

    return page_generate


def add_generate(
    button: gr.Button, inputs: list, generate, results: Results, page_generate, random_seed, message, seed
) -> None:
    """The Generate button (`page_generate`, which writes to `message` and `seed` too), and the
    `/generate` endpoint (`generate`, on a hidden button: its parameters are the form's fields).
    Both "multiple": a job still running must not swallow the next press."""
    common = dict(show_progress="hidden", trigger_mode="multiple", concurrency_limit=None)
    button.click(
        page_generate,
        inputs=[random_seed, *inputs],
        outputs=[message, seed, *results.outputs],
        api_visibility="private",
        **common,
    )
    api = gr.Button(visible=False, elem_id="fp-generate-api")
    api.click(generate, inputs=inputs, outputs=results.outputs, api_name="generate", **common)
