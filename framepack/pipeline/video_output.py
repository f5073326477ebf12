"""A run's video as it grows: encoded segments in its job directory and the bookkeeping around them.

`SegmentedVideo` wraps the `IncrementalDecoder`: frames no later section can change are encoded
once into `segments/NNNN.mp4` (`framepack.pipeline.jobs` describes the directory), the frames still
being blended into are kept apart, and the playable mp4 is a remux of the parts. `VideoOutput` is
what a video run does in its job directory around the section loop: restore the committed
sections, rebuild the mp4 and commit after each new one, write the outputs at the end.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from ..io import atomic_write, concat_mp4, write_gif, write_json_atomic, write_mp4, write_png_frames
from .decode import to_uint8_frames
from .events import Finished, SectionDone
from .jobs import JobDir, SectionState

__all__ = ["SegmentedVideo", "VideoOutput"]


class SegmentedVideo:
    """The decoded video of a job as encoded segments plus a tail that is still being blended.

    Wraps an `IncrementalDecoder`: after each update, the frames no later section touches (all but
    the `4 * window - 3` at the growing end) are encoded once into a segment and dropped from
    memory; the tail is encoded on its own; the playable mp4 is the segments and the tail remuxed.
    """

    def __init__(
        self, job: JobDir, decoder, grows_at_start: bool, fps: int, crf: int, keep_raw: bool
    ) -> None:
        self.job, self.decoder, self.at_start = job, decoder, grows_at_start
        self.fps, self.crf, self.keep_raw = fps, crf, keep_raw
        self.segments: list[list] = []  # [name, frames] in display order
        self.tail_name: str | None = None
        # uint8 frames beyond the decoder's, settled from the start (a source video's far part),
        # written with the first segment
        self.pending: np.ndarray | None = None

    @property
    def frames(self) -> int:
        tail, pending = self.decoder.frames, self.pending
        return (
            sum(n for _, n in self.segments)
            + (0 if tail is None else tail.shape[2])
            + (0 if pending is None else len(pending))
        )

    def restore(self, state: SectionState) -> None:
        self.segments = [list(s) for s in state.segments]
        self.decoder.lo, self.decoder.hi = state.lo, state.hi
        self.decoder.frames = state.tail.float() if state.hi > state.lo else None
        self.tail_name, self.pending = state.tail_name, None

    def state(self, number: int, rng: torch.Tensor, elapsed: float) -> SectionState:
        tail = self.decoder.frames
        # Stored in the blend dtype: the tail after an update is decoded or blended frames, which
        # that dtype holds exactly (an fp16 VAE's tail takes half the bytes of fp32).
        tail = torch.zeros(1, 3, 0, 1, 1) if tail is None else tail.to(self.decoder.blend_dtype)
        lo, hi = self.decoder.lo, self.decoder.hi
        return SectionState(number, rng, lo, hi, tail, self.segments, self.tail_name, elapsed)

    def update(self, bank: torch.Tensor, lo: int, hi: int, number: int, final: bool) -> bool:
        """Decode and show latents `[lo, hi)`; write the new segment, the tail and the mp4 parts."""
        if not self.decoder.update(bank, lo, hi):
            return False
        frames = self.decoder.frames  # (1, 3, T, H, W) float
        count = frames.shape[2]
        keep = 0 if final else min(count, 4 * self.decoder.window - 3)
        cut = keep if self.at_start else count - keep
        head, rest = frames[:, :, :cut], frames[:, :, cut:]
        settled, tail = (rest, head) if self.at_start else (head, rest)
        settled = to_uint8_frames(settled)
        if self.pending is not None:
            parts = [settled, self.pending] if self.at_start else [self.pending, settled]
            settled, self.pending = np.concatenate(parts), None
        folder = self.job.root / "segments"
        name = f"{number:04d}"
        if len(settled):
            write_mp4(settled, folder / f"{name}.mp4", fps=self.fps, crf=self.crf)
            if self.keep_raw:
                with atomic_write(folder / f"{name}.npy") as tmp, open(tmp, "wb") as f:
                    np.save(f, settled)
            entry = [name, int(len(settled))]
            self.segments.insert(0, entry) if self.at_start else self.segments.append(entry)
        self.decoder.frames = tail.contiguous()  # only the frames still to be blended stay
        self.tail_name = name if tail.shape[2] else None
        if self.tail_name:
            write_mp4(to_uint8_frames(tail), folder / f"{name}.tail.mp4", fps=self.fps, crf=self.crf)
        return True

    def parts(self) -> list[Path]:
        """The mp4 files of the video so far, in display order."""
        folder = self.job.root / "segments"
        files = [folder / f"{name}.mp4" for name, _ in self.segments]
        if self.tail_name:
            tail = folder / f"{self.tail_name}.tail.mp4"
            files = [tail, *files] if self.at_start else [*files, tail]
        return files

    def write(self, path: Path, metadata: dict[str, str]) -> None:
        """The playable mp4 of every frame so far, atomically; then drop tails no commit needs."""
        concat_mp4(self.parts(), path, metadata=metadata)

    def prune(self) -> None:
        """Remove tail files of earlier sections (call after the section's commit)."""
        keep = f"{self.tail_name}.tail.mp4" if self.tail_name else None
        for old in (self.job.root / "segments").glob("*.tail.mp4"):
            if old.name != keep:
                old.unlink(missing_ok=True)

    def all_frames(self) -> np.ndarray:
        """Every frame (raw uint8) once the video is complete; needs `keep_raw`."""
        folder = self.job.root / "segments"
        return np.concatenate([np.load(folder / f"{name}.npy") for name, _ in self.segments])


class VideoOutput:
    """What every video run does in its job directory, a generation's and an extension's alike:
    restore the committed sections and the generator, rebuild the mp4 after each new section and
    commit it, write the outputs at the end (`png` frames and a `gif` at `fps` when asked) and
    remove the job. The section loop (`framepack.pipeline.sections`) samples; this keeps the books.
    """

    def __init__(
        self, job: JobDir, video: SegmentedVideo, info: dict, sections: int, png: bool, gif: bool, fps: float
    ) -> None:
        self.job, self.video, self.info, self.sections = job, video, info, sections
        self.png, self.gif, self.fps = png, gif, fps
        stem = job.name
        self.video_path, self.sidecar_path = job.out / f"{stem}.mp4", job.out / f"{stem}.json"
        self.started, self.before = time.perf_counter(), 0.0  # seconds spent before a resume
        self.frames = 0  # frames in the mp4

    @property
    def elapsed(self) -> float:
        return self.before + time.perf_counter() - self.started

    def inputs(self, prepared, encode) -> dict[str, torch.Tensor]:
        """The run's conditioning: stored in the job once (`JobDir.inputs`)."""
        return self.job.inputs(prepared, encode)

    def _section_done(self, number: int, seconds: float) -> SectionDone:
        shown = self.video_path if self.frames else None
        return SectionDone(number, self.sections, shown, self.frames, seconds)

    def _write(self) -> None:
        self.info["frames"] = self.frames = self.video.frames
        self.video.write(self.video_path, {"framepack": json.dumps(self.info)})

    def restore(self, numbers: list[int], generator: torch.Generator):
        """The committed sections' latents by number, and the `SectionDone` of the last one (None
        for a fresh job); restores `generator` and the video, and writes the mp4 of exactly them."""
        saved, state = self.job.load_sections(numbers)
        if state is None:
            return saved, None
        generator.set_state(state.rng)
        self.video.restore(state)
        self.before = state.elapsed
        if self.video.frames:
            self._write()
        return saved, self._section_done(state.number, 0.0)

    def commit(
        self, number: int, latents: torch.Tensor, bank, lo: int, hi: int, final: bool, generator, t0: float
    ) -> SectionDone:
        """Show latents `[lo, hi)` of `bank` after section `number` (its window `latents`), commit
        it with the generator's state; returns its `SectionDone` (`t0`: when it started)."""
        with torch.no_grad():  # settled frames are encoded once; the mp4 is a remux of the segments
            if self.video.update(bank, lo, hi, number, final):
                self._write()
        self.job.commit_section(
            number, latents, self.video.state(number, generator.get_state(), self.elapsed)
        )
        self.video.prune()
        return self._section_done(number, time.perf_counter() - t0)

    def finish(self, extra: dict) -> Finished:
        """PNG frames, the GIF and the sidecar (`extra` added to its info); removes the job and
        returns the `Finished` event."""
        out, stem = self.job.out, self.video_path.stem
        frames = self.video.all_frames() if self.png or self.gif else None
        if self.png:
            write_png_frames(frames, out / f"{stem}_frames")
        gif_path = write_gif(frames, out / f"{stem}.gif", fps=self.fps) if self.gif else None
        self.info.update(
            video=self.video_path.name,
            gif=gif_path.name if gif_path else None,
            wall_seconds=round(self.elapsed, 3),  # the run's time (not the video's length)
        )
        self.info.update(extra)
        write_json_atomic(self.info, self.sidecar_path)
        self.job.remove()  # everything it held is in the outputs now
        return Finished(
            self.video_path, self.frames, self.sidecar_path, gif_path, self.info["wall_seconds"], self.info
        )
