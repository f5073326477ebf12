"""The job queue behind the GUI: one worker thread owns the device and runs jobs in order.

Jobs are submitted from any thread (every browser tab, the `/generate` API); their settings are
validated at once (`framepack.pipeline.run.open_run`), so bad input fails as a job with one sentence
and never reaches the worker. The worker runs the job's `Run` (a generation, a video extension or
a one-frame edit alike) and copies each event into its job (latent preview,
section/step, the video so far), so a reader sees the live state with `get(job_id)`. Cancelling a
queued job drops it; cancelling a running one stops it within one sampling step, keeping the
sections it finished in its job directory, and `resume(job_dir)` queues the rest of such a job
(also one left by a crashed server or the CLI). A failing job records its error and the worker goes
on with the next. A queued job can be moved up or down the queue, and an ended one removed from
the list (`move`, `remove`, `clear_finished`).

Job numbers go on across server restarts: the next one is kept in the outputs folder
(`QUEUE_FILE`). Nothing here imports Gradio.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np

from ..io import write_json_atomic
from ..pipeline.events import Finished, FrameDone, SectionDone, Stage, StepEvent
from ..pipeline.jobs import JOB_SUFFIX, JobDir, check_free
from ..pipeline.run import Request, open_run
from ..pipeline.settings import GenerationSettings
from ..sampling import Cancelled
from .pictures import readable, thumbnail
from .record import CANCELLED, DONE, ENDED, FAILED, QUEUED, RUNNING, QueuedJob, describe_error

__all__ = [
    "QUEUED",
    "RUNNING",
    "DONE",
    "FAILED",
    "CANCELLED",
    "ENDED",
    "QUEUE_FILE",
    "QueuedJob",
    "JobQueue",
    "describe_error",
]

log = logging.getLogger(__name__)

QUEUE_FILE = ".framepack-queue.json"  # in the outputs folder: {"next_id": N}


def _read_next_id(out_dir: Path) -> int:
    """The next job number stored in `out_dir` (1 when there is none or it cannot be read)."""
    path = out_dir / QUEUE_FILE
    try:
        value = json.loads(path.read_text(encoding="utf-8"))["next_id"]
    except FileNotFoundError:
        return 1
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("job numbers start at 1 again: %s cannot be read (%s)", path, e)
        return 1
    return value if isinstance(value, int) and value >= 1 else 1


def _store_next_id(out_dir: Path, next_id: int) -> None:
    """Keep the next job number in `out_dir`; a failure is logged, never raised (jobs still run)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic({"next_id": next_id}, out_dir / QUEUE_FILE)
    except OSError as e:
        log.warning("could not store the next job number in %s: %s", out_dir / QUEUE_FILE, e)


class JobQueue:
    """Jobs in submission order and the one worker thread that runs them on `bundle`'s device.

    `vram_budget` (the server's `--vram-budget`, for a bundle loaded onto the host with it) is the
    budget of new jobs that give none; a job's own budget wins, and "none" runs it with every
    weight on the device (the bundle moves there, which works when it fits). Resumed jobs keep
    the budget they were started with. `ram_budget` (the server's `--ram-budget`, for a bundle
    loaded with it) is every job's RAM budget: the bundle's weights wait where it put them.
    `compile` (the server's `--compile`) compiles every job's blocks; the first job pays the compile.
    `fp8_compute` (the server's `--fp8-compute`, checked against the device before loading) runs
    every job's blocks in e4m3. `attention` (the server's `--attention`) is every job's attention
    kernel.
    """

    def __init__(
        self,
        bundle,
        out_dir: str | Path,
        start: bool = True,
        vram_budget: str | float | None = None,
        ram_budget: str | float | None = None,
        compile: bool = False,
        fp8_compute: bool = False,
        attention: str = "sdpa",
    ):
        self.bundle = bundle
        self.vram_budget = vram_budget
        self.ram_budget = ram_budget
        self.compile = compile  # the server's --compile: every job's blocks compiled
        self.fp8_compute = fp8_compute  # the server's --fp8-compute
        self.attention = attention  # the server's --attention
        self.out_dir = Path(out_dir)
        self._cond = threading.Condition()
        self._jobs: dict[int, QueuedJob] = {}
        self._pending: deque[int] = deque()
        self._names: set[str] = set()
        self._next_id = _read_next_id(self.out_dir)
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
        if self.ram_budget is not None:
            settings = dataclasses.replace(settings, ram_budget=self.ram_budget)
        if self.compile:
            settings = dataclasses.replace(settings, compile=True)
        if self.fp8_compute:
            settings = dataclasses.replace(settings, fp8_compute=True)
        if self.attention != "sdpa":
            settings = dataclasses.replace(settings, attention=self.attention)
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
            self._set_run(job, run)
            job.video_source = None if video is None else str(video)
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
            self._set_run(job, run)
            job.resume_dir = root
            job.video_source = None if run.source is None else run.source.path
            self._restore_progress(job, root)
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
                self._drop(job)
            self._touch(job)
            return True

    def remove(self, job_id: int) -> bool:
        """Take a job off the list: an ended one, or a queued one (cancelled first). A running job
        is not removed (cancel it first). Returns whether it was removed."""
        with self._cond:
            job = self._jobs.get(job_id)
            if job is None or job.state == RUNNING:
                return False
            if job.state == QUEUED:
                job.cancel_requested.set()
                self._drop(job)
            del self._jobs[job_id]
            self._touch(job)  # wakes a `wait` on it: it has ended
            return True

    def move(self, job_id: int, offset: int) -> bool:
        """Move a queued job `offset` places later in the queue (negative: sooner), clamped to the
        queue's ends. Returns False when the job is not queued."""
        with self._cond:
            if job_id not in self._pending:
                return False
            old = self._pending.index(job_id)
            new = min(max(old + int(offset), 0), len(self._pending) - 1)
            if new != old:
                del self._pending[old]
                self._pending.insert(new, job_id)
                self._touch_queued()
            return True

    def clear_finished(self) -> int:
        """Take every ended job (done, failed, cancelled) off the list; returns how many."""
        with self._cond:
            ended = [job for job in self._jobs.values() if job.ended_state]
            for job in ended:
                del self._jobs[job.id]
                self._touch(job)
            return len(ended)

    def get(self, job_id: int) -> QueuedJob | None:
        with self._cond:
            job = self._jobs.get(job_id)
            return copy.copy(job) if job is not None else None

    def jobs(self) -> list[QueuedJob]:
        """Copies of every job, oldest first: the ended and running ones by number, then the queued
        ones in the order they will run."""
        with self._cond:
            queued = set(self._pending)
            started = [j for j in self._jobs.values() if j.id not in queued]
            return [copy.copy(j) for j in started + [self._jobs[i] for i in self._pending]]

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
            job = self._jobs.get(job_id)
            while job is not None and not job.ended_state:  # a removed job has ended too
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._cond.wait(left)
            return copy.copy(job) if job is not None else None

    # ------------------------------------------------------------------------------- internals
    def _add(self, prompt: str, settings: GenerationSettings | None) -> QueuedJob:
        job = QueuedJob(id=self._next_id, prompt=prompt, settings=settings)
        self._next_id += 1
        _store_next_id(self.out_dir, self._next_id)
        self._jobs[job.id] = job
        self._touch(job)
        return job

    def _touch(self, job: QueuedJob) -> None:
        job.version += 1
        self._version += 1
        self._cond.notify_all()

    def _drop(self, job: QueuedJob) -> None:
        """A queued job cancelled: off the queue, ended (the jobs after it move up)."""
        self._pending.remove(job.id)
        job.state, job.ended, job.run = CANCELLED, time.time(), None
        self._touch_queued()

    def _touch_queued(self) -> None:
        """Every queued job changed: their places in the queue did."""
        for job_id in self._pending:
            self._touch(self._jobs[job_id])

    @staticmethod
    def _set_run(job: QueuedJob, run) -> None:
        """A new job's checked run, its plan, frame size and first thumbnail (the start image)."""
        job.run = run
        job.sections, job.steps, job.fps = run.sections, run.prepared.steps, run.prepared.fps
        job.frame_size = tuple(run.prepared.image.shape[:2])
        job.thumbnail = thumbnail(run.prepared.image)

    def _restore_progress(self, job: QueuedJob, root: Path) -> None:
        """A resumed job starts with the progress its job directory holds (the committed sections,
        counted on disk; the run reports them again first), and the stopped job of this queue that
        left the directory points to it."""
        committed = len(list((root / "sections").glob("[0-9]*.safetensors")))
        job.restored_sections = job.sections_done = min(committed, job.sections)
        job.skipped_steps = job.restored_sections * job.steps
        job.section = min(job.restored_sections, max(job.sections - 1, 0))
        out = self.out_dir.resolve()
        for old in self._jobs.values():
            if old.state in (CANCELLED, FAILED) and old.started is not None and old.resumed_as is None:
                if (old.resume_dir or out / f"{old.settings.name}{JOB_SUFFIX}") == root:
                    old.resumed_as = job.id
                    self._touch(old)

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
                job.thumbnail = thumbnail(readable(event.preview[len(event.preview) // 2]))
            elif isinstance(event, SectionDone):
                if not job.steps_done:  # a resumed job's restored sections, reported first
                    job.restored_sections = event.section + 1
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
                job.thumbnail = thumbnail(event.frame)
            elif isinstance(event, Stage):
                job.stage = event.name
            self._touch(job)
