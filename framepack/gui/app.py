"""The Gradio layout of `framepack serve`: the form, the watched job, the queue, the gallery and
the unfinished jobs to resume (`resume`).

Handlers only translate between Gradio and `JobQueue` / `form` / `view`; the queue's one worker
thread does the generating. Each browser tab polls (a `gr.Timer`) the job it watches and sends a
component only when it changed. `/generate` (the Generate button) submits a job and returns when
it has ended, with the video as a file, so `gradio_client` scripts drive the same queue.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import gradio as gr

from ..caching import CACHES
from .form import (
    DEFAULT_COLOUR,
    FIELDS,
    ONE_FRAME_GROUPS,
    FormValues,
    demo_examples,
    form_from_settings,
    list_loras,
    load_sidecar,
    orders_for,
    request_from_form,
)
from .jobs import FAILED, JobQueue, describe_error
from .resume import add_resume_section
from .view import finished_videos, job_label, preview_grid, progress_html, progress_text, queue_html

__all__ = ["build_app", "launch", "CSS"]

CSS = """
.fp-progress progress { width: 100%; height: 14px; }
.fp-progress span { display: block; margin-top: 4px; }
.fp-queue { width: 100%; border-collapse: collapse; font-size: 0.9em; }
.fp-queue td, .fp-queue th { border-bottom: 1px solid #8884; padding: 3px 6px; text-align: left; }
tr[data-state="failed"] .fp-state { color: #c62828; }
tr[data-state="done"] .fp-state { color: #2e7d32; }
"""


def _readable_image(component: gr.Image) -> gr.Image:
    """Make an unreadable upload fail with one sentence instead of Gradio's generic error.

    (Wrapped on the instance: a `gr.Image` subclass would make Gradio write a .pyi file here.)
    """
    preprocess = component.preprocess

    def checked(payload):
        try:
            return preprocess(payload)
        except Exception:
            name = getattr(payload, "orig_name", None) or "the uploaded file"
            what = (component.label or "image").lower()
            raise gr.Error(
                f"The {what}: {name} is not an image file that can be read.", print_exception=False
            ) from None

    component.preprocess = checked
    return component


def _uploads(label: str, types: list[str], elem_id: str) -> gr.File:
    return gr.File(label=label, file_count="multiple", file_types=types, elem_id=elem_id, scale=2)


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
        seen = gr.State({})
        gallery_items = gr.State([])
        with gr.Row():
            with gr.Column(scale=1):
                with gr.Row():
                    image = _readable_image(
                        gr.Image(type="numpy", label="Start image", height=260, elem_id="fp-image")
                    )
                    end_image = _readable_image(
                        gr.Image(type="numpy", label="End image (optional)", height=260)
                    )
                prompt = gr.Textbox(
                    label="Prompt",
                    lines=3,
                    elem_id="fp-prompt",
                    info="One prompt, or timed ones: [0s-2s: the cat sits] [2s: the cat walks away]",
                )
                if examples and all(img is not None for img, _ in examples):
                    gr.Examples([[img, p] for img, p in examples], inputs=[image, prompt], label="Examples")
                elif examples:
                    gr.Examples([[p] for _, p in examples], inputs=[prompt], label="Quick prompts")
                negative_prompt = gr.Textbox("", label="Negative prompt (used when CFG > 1)")
                with gr.Row():
                    seconds = gr.Slider(1, 120, value=5, step=0.1, label="Seconds", elem_id="fp-seconds")
                    seed = gr.Textbox(value="31337", label="Seed (a number, or 'random')", elem_id="fp-seed")
                with gr.Accordion("More settings", open=False):
                    with gr.Row():
                        steps = gr.Slider(1, 100, value=m.steps, step=1, label="Steps", elem_id="fp-steps")
                        distilled_cfg = gr.Slider(
                            1, 32, value=m.distilled_guidance, step=0.1, label="Distilled guidance"
                        )
                        cfg = gr.Slider(1, 32, value=m.cfg, step=0.1, label="CFG (real; 1 = off)")
                    with gr.Row():
                        window = gr.Slider(
                            1, 33, value=m.window, step=1, label="Window (latent frames per section)"
                        )
                        order = gr.Dropdown(orders_for(m.order), value=m.order, label="Section order")
                    with gr.Row():
                        resolution = gr.Slider(
                            64, 1024, value=m.resolution, step=16, label="Resolution (bucket base, px)"
                        )
                        crf = gr.Slider(0, 51, value=16, step=1, label="mp4 quality (crf; lower is better)")
                        gif = gr.Checkbox(False, label="Also write a GIF")
                    with gr.Row():
                        cache = gr.Dropdown(["off", *CACHES], value="off", label="Step cache (faster, lossy)")
                        cache_threshold = gr.Slider(
                            0, 0.5, value=0.15, step=0.01, label="Cache threshold (0.15: ~2x, 0.1: ~1.6x)"
                        )
                        vram_budget = gr.Textbox(
                            "",
                            label="Memory budget for all weights (GB, 'auto' or 'none'; empty: the server's, if any)",
                        )
                    with gr.Row():
                        sampler = gr.Dropdown(["unipc", "euler"], value="unipc", label="Sampler")
                        png = gr.Checkbox(False, label="Also write every frame as a PNG")
                with gr.Accordion(
                    "Modes: text-to-video, loop, one frame, extend a video, keyframes, LoRAs",
                    open=False,
                    elem_id="fp-modes",
                ):
                    with gr.Row():
                        t2v_colour = gr.ColorPicker(
                            DEFAULT_COLOUR,
                            label="Text-to-video colour (used when no start image is given)",
                            info="Without a start image the video starts from a plain frame of this colour "
                            "(lower quality than from an image).",
                        )
                        loop = gr.Checkbox(
                            False,
                            label="Seamless loop (ends on the start image)",
                            elem_id="fp-loop",
                        )
                    with gr.Row():
                        one_frame = gr.Checkbox(
                            False,
                            label="One frame: an edit of the start image (a PNG, not a video)",
                            elem_id="fp-one-frame",
                        )
                        one_frame_index = gr.Number(
                            m.window,
                            precision=0,
                            label="Time index of the frame",
                            elem_id="fp-one-frame-index",
                        )
                        one_frame_groups = gr.CheckboxGroup(
                            list(ONE_FRAME_GROUPS),
                            value=list(ONE_FRAME_GROUPS),
                            label="History groups (the end image is the post reference)",
                        )
                    source_video = gr.Video(
                        label="Video to extend (forward order: continue it; inverted: lead into it)",
                        sources=["upload"],
                        height=200,
                        elem_id="fp-source-video",
                    )
                    with gr.Row():
                        keyframe_images = _uploads("Keyframe images", ["image"], "fp-keyframes")
                        keyframe_times = gr.Textbox(
                            "",
                            label="Keyframe times (seconds, one per image: 1.5, 3)",
                            elem_id="fp-keyframe-times",
                        )
                    with gr.Row():
                        loras = gr.Dropdown(
                            list_loras(loras_dir),
                            value=[],
                            multiselect=True,
                            label=f"LoRAs from {loras_dir.name}/"
                            if loras_dir
                            else "LoRAs (serve --loras DIR)",
                            visible=loras_dir is not None,
                        )
                        lora_files = _uploads("LoRA files (.safetensors)", [".safetensors"], "fp-lora-files")
                        lora_scales = gr.Textbox(
                            "",
                            label="LoRA scales (one for all, or one per LoRA; empty: 1)",
                            elem_id="fp-lora-scales",
                        )
                generate_button = gr.Button("Generate", variant="primary", elem_id="fp-generate")
                with gr.Accordion("Load settings of a finished video", open=False):
                    sidecar_upload = gr.File(
                        label="Its sidecar (.json) or the mp4 itself",
                        file_types=[".json", ".mp4"],
                        elem_id="fp-sidecar",
                    )
            with gr.Column(scale=1):
                progress = gr.HTML(progress_html(None), elem_id="fp-progress")
                preview = gr.Image(
                    label="Latent preview (current step), or the one-frame result",
                    format="png",
                    height=240,
                    interactive=False,
                    elem_id="fp-preview",
                )
                # Below the preview: error toasts (top right) never cover the Cancel button.
                with gr.Row():
                    watch = gr.Dropdown(
                        choices=[], value=None, label="Watched job", elem_id="fp-watch", scale=3
                    )
                    cancel_button = gr.Button("Cancel job", variant="stop", elem_id="fp-cancel", scale=1)
                video = gr.Video(label="Video so far", interactive=False, elem_id="fp-video")
                job_files = gr.File(
                    label="Downloads", file_count="multiple", interactive=False, elem_id="fp-files"
                )
        api_job = gr.Number(visible=False, precision=0, label="job")
        api_video = gr.File(visible=False, label="video")
        api_info = gr.JSON(visible=False, label="info")

        async def follow(job):
            """The job's id at once (the tab watches it), then, once it has ended, its result."""
            yield {api_job: job.id}
            while not job.ended_state:
                await asyncio.sleep(0.2)
                job = queue.get(job.id)
            if job.state == FAILED:
                raise gr.Error(progress_text(job), print_exception=False)
            info = {
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
            result = job.video or job.image
            yield {api_job: job.id, api_video: str(result) if result else None, api_info: info}

        gr.Markdown("### Queue")
        queue_table = gr.HTML(queue_html([]), elem_id="fp-queue")
        # Unfinished jobs (cancelled, crashed, CLI): /resume answers as /generate does.
        add_resume_section(app, queue, outputs, follow, [api_job, api_video, api_info])
        gr.Markdown("### Finished videos")
        gallery = gr.Gallery(
            label="Finished videos",
            columns=6,
            height=260,
            preview=False,
            object_fit="contain",
            fit_columns=False,
            elem_id="fp-gallery",
            interactive=False,
        )
        with gr.Row():
            gallery_files = gr.File(label="Selected video's files", file_count="multiple", interactive=False)
            reuse_button = gr.Button("Load the selected video's settings")
        selected = gr.State(None)

        form_inputs = [image, end_image, prompt, negative_prompt, seconds, seed, steps]
        form_inputs += [distilled_cfg, cfg, window, order, resolution, crf, gif, cache, cache_threshold]
        form_inputs += [vram_budget, sampler, png, t2v_colour, loop, source_video, one_frame, one_frame_index]
        form_inputs += [one_frame_groups, keyframe_images, keyframe_times, loras, lora_files, lora_scales]
        by_name = dict(zip(FIELDS, form_inputs, strict=True))

        def choices():
            return [(job_label(j), j.id) for j in reversed(queue.jobs())]

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
            one_frame_index=m.window,
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

        generate_button.click(
            generate,
            inputs=form_inputs,
            outputs=[api_job, api_video, api_info],
            api_name="generate",
            show_progress="hidden",
            trigger_mode="multiple",
            concurrency_limit=None,
        )

        # A new job of this tab becomes the watched one.
        api_job.change(
            lambda job_id: gr.update(choices=choices(), value=int(job_id)) if job_id else gr.update(),
            inputs=[api_job],
            outputs=[watch],
            show_progress="hidden",
            api_visibility="private",
        )

        def cancel(job_id: int | None) -> str:
            """Cancel a job: a queued one is dropped, a running one stops within a sampling step."""
            if job_id is None:
                raise gr.Error("No job is selected.", print_exception=False)
            job = queue.get(int(job_id))
            if not queue.cancel(int(job_id)):
                state = job.state if job else "unknown"
                raise gr.Error(
                    f"Job #{job_id} is {state}; there is nothing to cancel.", print_exception=False
                )
            return f"Cancelling job #{job_id}."

        gr.api(cancel, api_name="cancel")
        cancel_button.click(
            cancel,
            inputs=[watch],
            outputs=None,
            api_name="cancel_watched",
            api_visibility="private",
            show_progress="hidden",
        )

        def tick(job_id, memo):
            """Send what changed since this tab's last tick (`memo`: what it was sent)."""
            memo = dict(memo or {})
            out = {}
            jobs = queue.jobs()
            ids = [j.id for j in jobs]
            if memo.get("ids") != ids:
                memo["ids"] = ids
                out[watch] = gr.update(choices=[(job_label(j), j.id) for j in reversed(jobs)])
            running = any(j.state == "running" for j in jobs)
            table_key = (queue.version, int(time.time()) if running else 0)
            if memo.get("table") != table_key:
                memo["table"] = table_key
                out[queue_table] = queue_html(jobs)
            job = queue.get(int(job_id)) if job_id is not None else None
            if job is None:
                return {**out, seen: memo}
            key = (job.id, job.version)
            if memo.get("job") != key:
                memo["job"] = key
                out[progress] = progress_html(job, queue.position(job.id))
            key = (job.id, job.steps_done, job.image is not None)
            if memo.get("preview") != key:
                memo["preview"] = key
                if job.image is not None and job.image.is_file():  # a one-frame job's result
                    out[preview] = str(job.image)
                else:
                    out[preview] = preview_grid(job.preview) if job.preview is not None else None
            key = (job.id, job.video_version)
            if memo.get("video") != key:
                memo["video"] = key
                out[video] = str(job.video) if job.video is not None and job.video.is_file() else None
            key = (job.id, job.state)
            if memo.get("files") != key:
                memo["files"] = key
                files = [job.video, job.image, job.gif, job.sidecar]
                files = [p for p in files if p is not None and p.is_file()]
                out[job_files] = [str(p) for p in files] if job.ended_state else None
            return {**out, seen: memo}

        timer = gr.Timer(tick_seconds)
        tick_outputs = [seen, watch, queue_table, progress, preview, video, job_files]
        timer.tick(
            tick,
            inputs=[watch, seen],
            outputs=tick_outputs,
            show_progress="hidden",
            api_visibility="private",
            concurrency_limit=None,
        )
        watch.change(
            lambda s: {**(s or {}), "job": None, "preview": None, "video": None, "files": None},
            inputs=[seen],
            outputs=[seen],
            show_progress="hidden",
            api_visibility="private",
        )

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

        gallery_key = gr.State(None)
        gallery_timer = gr.Timer(2.0)
        gr.on(
            [app.load, gallery_timer.tick],
            refresh_gallery,
            inputs=[gallery_key],
            outputs=[gallery, gallery_items, gallery_key],
            show_progress="hidden",
            api_visibility="private",
        )

        def select_video(items, evt: gr.SelectData):
            row = items[evt.index] if items and 0 <= evt.index < len(items) else None
            if row is None:
                return None, None
            return row, [p for p in row if p]

        gallery.select(
            select_video, inputs=[gallery_items], outputs=[selected, gallery_files], api_visibility="private"
        )

        def fill_form(path):
            if path is None:
                raise gr.Error("Select a video (or upload a sidecar) first.", print_exception=False)
            try:
                values = form_from_settings(load_sidecar(path), outputs, m, loras_dir)
            except ValueError as e:
                raise gr.Error(describe_error(e), print_exception=False) from None
            # No video in the sidecar clears the video to extend.
            keep_none = ("video",)
            return {by_name[k]: v for k, v in values.items() if v is not None or k in keep_none}

        sidecar_upload.upload(
            fill_form, inputs=[sidecar_upload], outputs=form_inputs, api_visibility="private"
        )
        reuse_button.click(
            lambda row: fill_form(row[2] if row else None),
            inputs=[selected],
            outputs=form_inputs,
            api_visibility="private",
        )
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
