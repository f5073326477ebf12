"""The job queue behind the GUI: one worker thread owns the device and runs jobs in order.

Jobs are submitted from any thread (every browser tab, the `/generate` API); their settings are
validated at once (`framepack.pipeline.run.open_run`), so bad input fails as a job with one sentence
and never reaches the worker. The worker runs the job's `Run` (a generation, a video extension or
a one-frame edit alike) and copies each event into its job (latent preview,
section/step, the video so far), so a reader sees the live state with `get(job_id)`. Cancelling a
queued job drops it; cancelling a running one stops it within one sampling step, keeping the
sections it finished in its job directory, and `resume(job_dir)` queues the rest of such a job
(also one left by a crashed server or the CLI). A failing job records its error and the worker goes
on with the next.
Nothing here imports Gradio.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..memory.runtime import is_out_of_memory
from ..pipeline.events import Finished, FrameDone, SectionDone, Stage, StepEvent
from ..pipeline.jobs import JOB_SUFFIX, JobDir, check_free
from ..pipeline.run import Request, Run, open_run
from ..pipeline.settings import GenerationSettings
from ..sampling import Cancelled

__all__ = [
    "QUEUED",
    "RUNNING",
    "DONE",
    "FAILED",
    "CANCELLED",
    "ENDED",
    "QueuedJob",
    "JobQueue",
    "describe_error",
]

log = logging.getLogger(__name__)

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
ENDED = (DONE, FAILED, CANCELLED)


@dataclass
class QueuedJob:
    """One generation and its live state (readers get copies; only the queue mutates a job)."""

    id: int
    prompt: str
    settings: GenerationSettings | None  # None when the form itself was rejected
    state: str = QUEUED
    error: str | None = None
    submitted: float = field(default_factory=time.time)
    started: float | None = None
    ended: float | None = None
    stage: str = ""
    sections: int = 0  # S, from the section plan
    section: int = 0  # 0-based, in generation order, of the last step seen
    sections_done: int = 0
    step: int = 0  # 1-based step within the current section
    steps: int = 0
    steps_done: int = 0  # over every section
    fps: int = 30
    preview: np.ndarray | None = field(default=None, repr=False)  # (T, h, w, 3) uint8
    video: Path | None = None  # the mp4 so far (final once done)
    frames: int = 0
    gif: Path | None = None
    sidecar: Path | None = None
    image: Path | None = None  # a one-frame job's PNG
    one_frame: int | None = None  # one-frame mode: the latent time index
    one_frame_groups: tuple[str, ...] = ()
    video_source: str | None = None  # a video extension: the video being extended
    resume_dir: Path | None = None  # a resumed job: the job directory it continues
    skipped_steps: int = 0  # a resumed job: the steps of the sections finished before it
    version: int = 0  # bumped on every change, so a view can skip unchanged jobs
    video_version: int = 0  # bumped when the mp4 is rewritten
    run: Run | None = field(default=None, repr=False)  # the checked run, until it has ended
    cancel_requested: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def total_steps(self) -> int:
        return self.sections * self.steps

    @property
    def ended_state(self) -> bool:
        return self.state in ENDED

    @property
    def video_seconds(self) -> float:
        """Seconds of video made so far."""
        return self.frames / self.fps if self.fps else 0.0

    def eta(self, now: float | None = None) -> float | None:
        """Seconds left, from the mean time per sampling step so far (None before the first step)."""
        if self.state != RUNNING or not self.steps_done or self.started is None:
            return None
        elapsed = (time.time() if now is None else now) - self.started
        left = self.total_steps - self.skipped_steps - self.steps_done
        return max(0.0, elapsed / self.steps_done * left)


def describe_error(e: BaseException) -> str:
    """One sentence for a failed job (tracebacks go to the server log, never to the page)."""
    if isinstance(e, ValueError):
        text = str(e)
    elif is_out_of_memory(e):
        text = (
            "the device ran out of memory; set a VRAM budget (auto, or a number of GiB) to stream the "
            "weights, or try a lower resolution or a smaller window"
        )
    elif isinstance(e, OSError):
        where = f" ({e.filename})" if e.filename else ""
        text = f"could not read or write a file{where}: {e.strerror or e}"
    else:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        text = f"generation failed with {type(e).__name__}" + (f": {first}" if first else "")
    text = " ".join(text.split())
    return text if text.endswith((".", "!", "?")) else text + "."


class JobQueue:
    """Jobs in submission order and the one worker thread that runs them on `bundle`'s device.

    `vram_budget` (the server's `--vram-budget`, for a bundle loaded onto the host with it) is the
    budget of new jobs that give none; a job's own budget wins, and "none" runs it with every
    weight on the device (the bundle moves there, which works when it fits). Resumed jobs keep
    the budget they were started with.
    """

    def __init__(
        self, bundle, out_dir: str | Path, start: bool = True, vram_budget: str | float | None = None
    ):
        self.bundle = bundle
        self.vram_budget = vram_budget
        self.out_dir = Path(out_dir)
        self._cond = threading.Condition()
        self._jobs: dict[int, QueuedJob] = {}
        self._pending: deque[int] = deque()
        self._names: set[str] = set()
        self._next_id = 1
        self._closed = False
        self._version = 0
        self._thread = threading.Thread(target=self._work, name="framepack-worker", daemon=True)
        if start:
            self.start()

    # ------------------------------------------------------------------ public API (any thread)
    def start(self) -> None:
        if not self._thread.is_alive():
            self._thread.start()

    def close(self, timeout: float | None = 30.0) -> None:
        """Cancel everything and stop the worker."""
        with self._cond:
            self._closed = True
            for job in self._jobs.values():
                job.cancel_requested.set()
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def version(self) -> int:
        """Bumped whenever any job changes."""
        return self._version

    def submit(
        self,
        settings: GenerationSettings,
        image: np.ndarray | None = None,
        *,
        video: str | Path | None = None,
        one_frame: int | None = None,
        one_frame_groups: tuple[str, ...] = ("post", "k2", "k4"),
    ) -> QueuedJob:
        """Validate and queue one generation; returns a copy of the job (state FAILED on bad input).

        `video` extends that video (`framepack.pipeline.extend`); `one_frame` makes one PNG at that
        latent time index from the history `one_frame_groups` (`framepack.pipeline.one_frame`).
        """
        if settings.vram_budget is None and self.vram_budget is not None:  # the server's budget
            settings = dataclasses.replace(settings, vram_budget=self.vram_budget)
        request = Request(settings, image, video, one_frame, tuple(one_frame_groups))
        try:
            run = open_run(self.bundle, request)
        except ValueError as e:
            return self.reject(settings.prompt, describe_error(e), settings)
        with self._cond:
            if self._closed:
                raise RuntimeError("the job queue is closed.")
            if settings.name is None:
                run.prepared.settings = settings = dataclasses.replace(
                    run.prepared.settings, name=self._unique_name(settings)
                )
            job = self._add(settings.prompt, settings)
            job.run, job.video_source = run, None if video is None else str(video)
            job.sections, job.steps, job.fps = run.sections, run.prepared.steps, run.prepared.fps
            if run.one_frame is not None:
                job.one_frame, job.one_frame_groups = run.one_frame
            self._pending.append(job.id)
            self._cond.notify_all()
            return copy.copy(job)

    def resume(self, job_dir: str | Path) -> QueuedJob:
        """Queue the rest of an unfinished job of the outputs folder (`OUT/NAME.job`, its mp4, or
        either's name), with the job's own settings; returns a copy of the job (state FAILED, one sentence, when the
        folder is not an unfinished job of this outputs folder and this model, or is already queued).

        The finished video equals that of an uninterrupted run (`framepack.pipeline.jobs`).
        """
        path = Path(job_dir)
        prompt, settings = f"resume {path.name}", None
        try:
            root = self._own_job_dir(path)
            run = open_run(self.bundle, Request(resume=root))  # validates the settings against the model
            settings = run.prepared.settings
            prompt = settings.prompt
        except ValueError as e:
            return self.reject(prompt, describe_error(e), settings)
        with self._cond:
            if self._closed:
                raise RuntimeError("the job queue is closed.")
            if root in self.job_dirs():
                return self.reject(prompt, f"the job {root.name} is already queued or running.", settings)
            try:
                check_free(root)  # a CLI run or another server is still on it
            except ValueError as e:
                return self.reject(prompt, describe_error(e), settings)
            job = self._add(prompt, settings)
            job.run, job.resume_dir = run, root
            job.video_source = None if run.source is None else run.source.path
            job.sections, job.steps, job.fps = run.sections, run.prepared.steps, run.prepared.fps
            self._names.add(root.name[: -len(JOB_SUFFIX)])
            self._pending.append(job.id)
            self._cond.notify_all()
            return copy.copy(job)

    def job_dirs(self) -> set[Path]:
        """The job directories of the queued and running jobs (resolved), which are not to be resumed."""
        out = self.out_dir.resolve()
        with self._cond:
            return {
                j.resume_dir or out / f"{j.settings.name}{JOB_SUFFIX}"
                for j in self._jobs.values()
                if not j.ended_state and j.settings is not None and (j.resume_dir or j.settings.name)
            }

    def _own_job_dir(self, path: Path) -> Path:
        """`path` resolved, if it is a job directory (or its mp4) right in the outputs folder; a
        relative path is taken in the outputs folder."""
        if path.suffix == ".mp4":
            path = path.with_suffix(JOB_SUFFIX)
        root = (self.out_dir / path).resolve()
        if root.parent != self.out_dir.resolve() or root.suffix != JOB_SUFFIX:
            raise ValueError(f"{path.name} is not a job directory in this server's outputs folder.")
        if not (root / "job.json").is_file():
            raise ValueError(f"{path.name} is not an unfinished job directory (no job.json in it).")
        recorded = JobDir(root).read().get("bundle") or "None"
        ours = str(getattr(self.bundle, "root", None))
        if "None" not in (recorded, ours) and Path(recorded).resolve() != Path(ours).resolve():
            raise ValueError(
                f"the job {root.name} was made with another model ({Path(recorded).name}); "
                f"resume it with framepack generate --resume {root.name} --model MODEL."
            )
        return root

    def reject(self, prompt: str, error: str, settings: GenerationSettings | None = None) -> QueuedJob:
        """Record a job that failed before it could be queued (bad input); returns a copy."""
        with self._cond:
            job = self._add(prompt, settings)
            job.state, job.error, job.ended = FAILED, error, time.time()
            self._touch(job)
            return copy.copy(job)

    def cancel(self, job_id: int) -> bool:
        """Cancel a queued job (dropped) or a running one (stops within a sampling step).

        Returns False when the job is unknown or already ended.
        """
        with self._cond:
            job = self._jobs.get(job_id)
            if job is None or job.ended_state:
                return False
            job.cancel_requested.set()
            if job.state == QUEUED:
                self._pending.remove(job_id)
                job.state, job.ended, job.run = CANCELLED, time.time(), None
            self._touch(job)
            return True

    def get(self, job_id: int) -> QueuedJob | None:
        with self._cond:
            job = self._jobs.get(job_id)
            return copy.copy(job) if job is not None else None

    def jobs(self) -> list[QueuedJob]:
        """Copies of every job, oldest first."""
        with self._cond:
            return [copy.copy(j) for j in self._jobs.values()]

    def position(self, job_id: int) -> int | None:
        """How many jobs run before this queued one (0: it is next), None when it is not queued."""
        with self._cond:
            try:
                return self._pending.index(job_id) + sum(j.state == RUNNING for j in self._jobs.values())
            except ValueError:
                return None

    def wait(self, job_id: int, timeout: float | None = None) -> QueuedJob | None:
        """Block until the job has ended (or `timeout` passed); returns a copy of it."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while (job := self._jobs.get(job_id)) is not None and not job.ended_state:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._cond.wait(left)
            return copy.copy(job) if job is not None else None

    # ------------------------------------------------------------------------------- internals
    def _add(self, prompt: str, settings: GenerationSettings | None) -> QueuedJob:
        job = QueuedJob(id=self._next_id, prompt=prompt, settings=settings)
        self._next_id += 1
        self._jobs[job.id] = job
        self._touch(job)
        return job

    def _touch(self, job: QueuedJob) -> None:
        job.version += 1
        self._version += 1
        self._cond.notify_all()

    def _unique_name(self, settings: GenerationSettings) -> str:
        """An output stem no other job and no file in the outputs folder uses."""
        base = time.strftime("framepack_%Y%m%d-%H%M%S") + f"_{settings.seed}"
        name, k = base, 1
        while name in self._names or any(self.out_dir.glob(f"{name}.*")):
            k += 1
            name = f"{base}-{k}"
        self._names.add(name)
        return name

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                job = self._jobs[self._pending.popleft()]
                job.state, job.started = RUNNING, time.time()
                self._touch(job)
            self._run(job)

    def _run(self, job: QueuedJob) -> None:
        state, error = DONE, None
        try:
            for event in job.run.events(self.out_dir, cancel=job.cancel_requested.is_set):
                self._apply(job, event)
        except Cancelled:
            state = CANCELLED
        except Exception as e:  # a failed job must never stop the worker
            log.exception("job %d failed", job.id)
            state, error = FAILED, describe_error(e)
        with self._cond:
            job.state, job.error, job.ended, job.run = state, error, time.time(), None
            job.stage = ""
            self._touch(job)

    def _apply(self, job: QueuedJob, event) -> None:
        with self._cond:
            if isinstance(event, StepEvent):
                job.section, job.sections = event.section, event.sections
                job.step, job.steps = event.step + 1, event.steps
                job.steps_done += 1
                job.preview = event.preview
            elif isinstance(event, SectionDone):
                if not job.steps_done:  # a resumed job's restored sections, reported first
                    job.skipped_steps = (event.section + 1) * job.steps
                    job.section = min(event.section + 1, job.sections - 1)
                job.sections_done = event.section + 1
                if event.video is not None:
                    job.video, job.frames = event.video, event.frames
                    job.video_version += 1
            elif isinstance(event, Finished):
                job.video, job.frames, job.gif, job.sidecar = (
                    event.video,
                    event.frames,
                    event.gif,
                    event.sidecar,
                )
                job.video_version += 1
            elif isinstance(event, FrameDone):
                job.image, job.sidecar, job.frames = event.image, event.sidecar, 1
            elif isinstance(event, Stage):
                job.stage = event.name
            self._touch(job)

    # ----------------------------------------------------------- page-18 stand-ins (MERGE: keep theirs)
    # Minimal versions of the queue engineer's `remove`, `move` and `clear_finished`, added only so
    # the Queue tab works on this branch; at the merge their versions replace these three methods.
    def remove(self, job_id: int) -> bool:
        """Drop a queued job or forget an ended one; False for a running or unknown job."""
        with self._cond:
            job = self._jobs.get(job_id)
            if job is None or job.state == RUNNING:
                return False
            if job.state == QUEUED:
                self._pending.remove(job_id)
                job.cancel_requested.set()
            del self._jobs[job_id]
            self._version += 1
            self._cond.notify_all()
            return True

    def move(self, job_id: int, offset: int) -> bool:
        """Move a queued job `offset` places later in the run order (negative: earlier)."""
        with self._cond:
            if job_id not in self._pending:
                return False
            i = self._pending.index(job_id)
            j = max(0, min(len(self._pending) - 1, i + int(offset)))
            if i == j:
                return False
            del self._pending[i]
            self._pending.insert(j, job_id)
            self._touch(self._jobs[job_id])
            return True

    def clear_finished(self) -> int:
        """Forget every ended job; returns how many."""
        with self._cond:
            ended = [i for i, j in self._jobs.items() if j.ended_state]
            for i in ended:
                del self._jobs[i]
            if ended:
                self._version += 1
                self._cond.notify_all()
            return len(ended)
