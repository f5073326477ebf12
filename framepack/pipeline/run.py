"""One entry for every run: a `Request` checked into a `Run`, whose events every front end reads.

`open_run(bundle, request)` validates a request against the loaded bundle (ValueError, one
sentence, before anything is written) and picks its kind: a generation, an extension of a video
(`request.video`), one frame (`request.one_frame`), or the rest of a stopped job
(`request.resume`, with the job's own settings). `Run.events(out_dir, cancel)` then runs it
through the one section loop (`framepack.pipeline.sections`): the LoRAs applied for the run, the
encoders and the VAE fitted to the VRAM budget, the video's job directory opened, and everything
taken back after. The CLI, the batch runner, the GUI's queue and the Python API each only turn
their arguments into a `Request` and show the events.

Before a long load, `check_request(model, request, device)` checks what needs no weights, and
`job_to_resume(path)` says which model and budget a stopped job needs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..io import load_image
from ..lora import applied_loras, merge_loras
from ..memory.disk import disk_backed
from ..parallel import ranks
from .budget import device_budget
from .events import Event, Finished, FrameDone
from .extend import ExtensionHistory, Source, check_extension, prepare_extension, resume_extension
from .jobs import JobDir, JobError, check_free, find_job, open_job
from .loop import record_loop_seam
from .named import read_manifest
from .one_frame import FrameOutput, OneFrameHistory, check_one_frame
from .ranks import check_ranks, check_ranks_before_loading, leading, serve_run
from .section import section_decoder
from .sections import GenerationHistory, run_sections
from .settings import (
    GenerationSettings,
    Prepared,
    check_settings,
    complete_prepared,
    prepare,
    settings_from_dict,
    used_settings,
)
from .speed import offloaded
from .video_output import SegmentedVideo, VideoOutput

__all__ = ["JobTarget", "Request", "Run", "check_request", "job_to_resume", "open_run", "resume_job"]

GROUPS = ("post", "k2", "k4")


@dataclass(frozen=True)
class Request:
    """What a front end asks for: the settings, plus what picks the kind of run.

    `image`: the start image's pixels instead of `settings.image`'s file. `video`: a video to
    extend. `one_frame`: a single PNG at this latent time index from the history `one_frame_groups`
    (`framepack.pipeline.one_frame`). `resume`: a stopped job (`OUT/NAME.job` or its mp4) to finish
    with its own settings (`settings` is then ignored). `lora_merge`: fold the LoRAs into the
    bundle's weights for good instead of applying them on the fly (no per-step cost; the CLI's
    `--lora-merge`, for a process that loads the bundle for this run only).
    """

    settings: GenerationSettings | None = None
    image: np.ndarray | None = None
    video: str | Path | None = None
    one_frame: int | None = None
    one_frame_groups: tuple[str, ...] = GROUPS
    resume: str | Path | None = None
    lora_merge: bool = False


@dataclass(frozen=True)
class JobTarget:
    """A stopped job to resume: its directory, and the model and budgets it was started with."""

    root: Path
    model: str | None  # None: a named bundle, which records no directory
    vram_budget: str | float | None
    ram_budget: str | float | None = None


def job_to_resume(path: str | Path) -> JobTarget:
    """The stopped job `path` names (a `.job` folder or its mp4), free to run: JobError (one
    sentence) when it is none, or when another process runs it, before anything is loaded."""
    root = find_job(path)
    check_free(root)
    data = JobDir(root).read()
    model = data.get("bundle") or None
    s = data["settings"]
    return JobTarget(root, None if model == "None" else model, s.get("vram_budget"), s.get("ram_budget"))


def check_request(model: str | Path, request: Request, device, dtypes: dict | None = None) -> Prepared | None:
    """What can be checked before the bundle `model` loads: the settings, images (and the video
    an extension extends) against its manifest, the one-frame index and groups, and the VRAM
    budget against its size (`framepack.pipeline.budget`); ValueError. Returns the checked
    inputs, to pass on to `open_run` (None for a resume, checked there, or an extension, whose
    video is only read there)."""
    from .budget import check_budget
    from .speed import check_device_settings

    if request.resume is not None:
        return None
    check_device_settings(request.settings, device)  # before anything is read
    _check_kind(request)
    manifest = read_manifest(model)
    if request.video is not None:
        checked = check_extension(manifest, request.settings, request.video, request.image)
    else:
        checked = check_settings(manifest, request.settings, request.image)
    _one_frame(checked, request)
    check_ranks_before_loading(model)
    check_budget(model, checked, device, dtypes)
    return None if request.video is not None else checked


def _check_reference(prepared: Prepared, groups: tuple[str, ...]) -> None:
    if prepared.end_image is not None and "post" not in groups:
        raise ValueError(
            "a reference image (the end image) goes into the post group; keep post in the groups."
        )


def _check_kind(request: Request) -> None:
    if request.video is not None and request.one_frame is not None:
        raise ValueError("one-frame mode makes one image from a start image; drop the video to extend.")


def _one_frame(prepared: Prepared, request: Request) -> tuple[int, tuple[str, ...]] | None:
    """The checked `(index, groups)` of a one-frame request (None for a video); ValueError."""
    if request.one_frame is None:
        return None
    plan = prepared.plan
    one_frame = check_one_frame(plan.schedule, plan.window, request.one_frame, request.one_frame_groups)
    _check_reference(prepared, one_frame[1])
    return one_frame


@dataclass
class Run:
    """A checked request on a loaded bundle; `events(...)` runs it (see the module)."""

    bundle: object
    prepared: Prepared
    source: Source | None = None  # the video an extension extends
    job_dir: Path | None = None  # the job a resume continues
    one_frame: tuple[int, tuple[str, ...]] | None = None  # (index, groups)

    def __post_init__(self) -> None:
        if self.one_frame is not None:
            _check_reference(self.prepared, self.one_frame[1])

    @property
    def sections(self) -> int:
        return 1 if self.one_frame else len(self.prepared.plan.sections)

    def events(
        self, out_dir: str | Path = "outputs", cancel: Callable[[], bool] | None = None
    ) -> Iterator[Event]:
        """Run it, yielding its events; the outputs land in `out_dir` (a resume: the job's folder).

        A video run works in the job directory `<out_dir>/<name>.job` (`framepack.pipeline.jobs`),
        removed when it finishes; an unfinished one with the same settings is resumed, one with
        other settings is refused (JobError). Raises `framepack.sampling.Cancelled` when `cancel()`
        turns true (between sampling steps); every finished section stays in the job.

        In a started process group of several ranks (`torchrun`), rank 0 runs it with each model
        call split across the ranks, and the other ranks yield nothing: they serve its model calls
        and write nothing (`framepack.pipeline.ranks`).
        """
        bundle, prepared = self.bundle, self.prepared
        s = prepared.settings
        if not ranks().leader:
            serve_run(bundle, prepared)
            return
        with (  # the memory plan first: a budget too small fails before the job directory exists
            leading(bundle.transformer),
            applied_loras(bundle.transformer, prepared.loras),
            offloaded(bundle, device_budget(s, bundle.device), s.fp8_copies, prepared) as memory,
        ):
            if self.one_frame is not None:
                history = OneFrameHistory(prepared, *self.one_frame)
                output = FrameOutput(bundle, prepared, out_dir, self._frame_info(history))
                yield from run_sections(bundle, prepared, history, output, cancel, memory)
                return
            extra = None if self.source is None else {"video": self.source.file}
            order = prepared.plan.packing_order
            with open_job(out_dir, self.job_dir, s, bundle, order, extra) as job:
                if self.source is not None:
                    self.source.check(job)
                job.check_images(prepared)
                history, output = self._video(job)
                for event in run_sections(bundle, prepared, history, output, cancel, memory):
                    if isinstance(event, Finished) and s.loop:
                        event.info["loop_seam"] = record_loop_seam(event.video, event.sidecar)
                    yield event

    def run(
        self,
        out_dir: str | Path = "outputs",
        cancel: Callable[[], bool] | None = None,
        on_event: Callable[[Event], None] | None = None,
    ) -> Finished | FrameDone | None:
        """Run it to the end; returns the last event (`Finished`, or `FrameDone` for one frame;
        None on a rank other than 0 of several, which only serves model calls)."""
        last = None
        for event in self.events(out_dir, cancel):
            if on_event is not None:
                on_event(event)
            last = event
        assert isinstance(last, (Finished, FrameDone)) or not ranks().leader
        return last

    def _video(self, job: JobDir) -> tuple[object, VideoOutput]:
        """The history and the output of a video run in `job`."""
        bundle, prepared, source = self.bundle, self.prepared, self.source
        s, plan = prepared.settings, prepared.plan
        decoder = section_decoder(bundle, bundle.device, plan.window)
        fps = prepared.fps if source is None else source.fps
        video = SegmentedVideo(job, decoder, plan.packing_order != "forward", fps, s.crf, s.gif or s.png)
        info = {
            "settings": s.to_dict(),
            "used": used_settings(prepared),
            "bundle": str(getattr(bundle, "root", "")),
            "sections": len(plan.sections),
        }
        if source is None:
            history = GenerationHistory(prepared)
        else:
            history = ExtensionHistory(prepared, source)
            history.setup_video(video)
            count = int(source.frames.shape[0])
            info["extension"] = {"source": source.path, "source_frames": count, "source_fps": source.fps}
        return history, VideoOutput(job, video, info, len(plan.sections), s.png, s.gif, fps)

    def _frame_info(self, history: OneFrameHistory) -> dict:
        s = self.prepared.settings
        return {
            "settings": s.to_dict(),
            "bundle": str(getattr(self.bundle, "root", "")),
            "one_frame": {
                "index": history.index,
                "groups": list(history.groups),
                "history_indices": history.history_indices(),
                "reference": s.end_image,
            },
        }


def open_run(bundle, request: Request, checked: Prepared | None = None) -> Run:
    """Check `request` against `bundle` (images, plan, LoRAs; ValueError, one sentence) into a
    `Run`; nothing is written. `checked` is `check_request`'s result for the same request."""
    if request.resume is not None:
        root = find_job(request.resume)
        prepared, source = resume_job(bundle, root)
        check_ranks(bundle.transformer.config.num_attention_heads)
        return Run(bundle, prepared, source, job_dir=root)
    _check_kind(request)
    source = None
    if request.video is not None:
        prepared, source = prepare_extension(bundle, request.settings, request.video, request.image)
    elif checked is not None:
        prepared = complete_prepared(bundle, checked)
    else:
        prepared = prepare(bundle, request.settings, request.image)
    one_frame = _one_frame(prepared, request)
    check_ranks(bundle.transformer.config.num_attention_heads)
    run = Run(bundle, prepared, source, one_frame=one_frame)  # checked before any weight changes
    if request.lora_merge and prepared.loras:  # folded into the weights: no per-step cost
        if disk_backed(bundle.transformer):
            raise ValueError(
                "a LoRA cannot be merged into weights that stay in their files under a RAM budget; "
                "drop --lora-merge (the LoRA then applies on the fly) or the RAM budget."
            )
        merge_loras(bundle.transformer, prepared.loras)
        prepared.loras = []
    return run


def resume_job(bundle, job_dir: str | Path) -> tuple[Prepared, Source | None]:
    """`(prepared, source)` to continue an unfinished job, from its settings and stored images:
    `source` is the video an extension job extends, None for a generation. LoRA files are read
    again from their paths; the images come from the job directory (unless the run stopped before
    it stored them), so moving or editing the originals does not change the resumed video."""
    root = find_job(job_dir)
    job = JobDir(root)
    data = job.read()
    if "video" in data:
        return resume_extension(bundle, root)
    try:
        settings = settings_from_dict(data["settings"])
    except TypeError as e:
        raise JobError(f"the settings in {job.root / 'job.json'} are not valid ({e}).") from None
    folder = job.root / "images"
    if not (job.root / "inputs.safetensors").is_file():  # stopped before its inputs were stored
        return prepare(bundle, settings), None
    stored = replace(
        settings,
        end_image=str(folder / "end.png") if settings.end_image else None,
        keyframes=tuple(
            (t, str(folder / f"keyframe_{i}.png")) for i, (t, _) in enumerate(settings.keyframes)
        ),
    )
    # A text-to-video colour is only accepted without a start image; its plain frame is recomputed.
    start = load_image(folder / "start.png") if settings.t2v_colour is None else None
    return replace(prepare(bundle, stored, image=start), settings=settings), None
