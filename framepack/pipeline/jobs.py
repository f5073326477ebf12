"""Job directories: a generation's state on disk, so a stopped run resumes where it stopped.

Every generation works in `<out>/<name>.job/` next to its video. Each file is written atomically
(temporary file, fsync, rename; `framepack.io.atomic_write`), so a kill at any moment leaves the
last finished section intact:

- `job.json`: the settings, the bundle, the output name and the packing order (written first);
- `images/`: the bucket-fitted start, end and keyframe images (PNG), so the plan is rebuilt from
  exactly the pixels the run used;
- `inputs.safetensors`: the conditioning (prompt, negative prompt and SigLIP embeddings, the start
  and reference latents) and the bucket-fitted input images, so a resume needs neither the encoders
  nor the original image files and samples from exactly the same inputs;
- `segments/NNNN.mp4`: frames that no later section can change, each encoded once (and
  `NNNN.npy`, the raw uint8 frames, when a GIF or PNG frames are wanted at the end);
  `segments/NNNN.tail.mp4`: the frames the next section still blends into (`4 * window - 3`);
- `segments/NNNN.tail.safetensors`: those frames as the decoder gave them (floats, not clamped, in
  the VAE's dtype), which the next section blends into as the release does; only the last is kept;
- `sections/NNNN.safetensors`, the commit of section NNNN (generation order), written last: its
  window latents, the CPU generator's state after it, and (as metadata) the decoded range and the
  segment list in display order.

The playable `<out>/<name>.mp4` is rebuilt after every section by remuxing the segments (stream
copy, `framepack.io.concat_mp4`), not by encoding every frame again, so writing stays constant per
section however long the video is. A resume reloads the sections committed in generation order,
restores the generator, and goes on; since sampling draws nothing but the per-section noise from
that generator, the frames are the same as those of an uninterrupted run. The directory is removed
once the video, its sidecar and any GIF/PNG frames are written.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch

from ..io import atomic_write, write_json_atomic
from .decode import from_uint8_frames
from .joblock import JobLock
from .output_names import claim_name, default_stem

__all__ = [
    "JOB_SUFFIX",
    "JobDir",
    "JobError",
    "SectionState",
    "check_free",
    "find_job",
    "open_job",
]

JOB_SUFFIX = ".job"
_VERSION = 1


class JobError(ValueError):
    """A job directory that cannot be created or resumed; the message is one sentence."""


@dataclass
class SectionState:
    """What the commit of the last finished section restores."""

    number: int  # generation order
    rng: torch.Tensor  # the CPU generator's state after the section (uint8)
    lo: int  # decoded latent range [lo, hi)
    hi: int
    tail: torch.Tensor  # (1, 3, P, H, W) float pixels still to be blended (the decoder's, unclamped)
    segments: list[list] = field(default_factory=list)  # [name, frames] in display order
    tail_name: str | None = None  # the segment file stem of the tail's mp4
    elapsed: float = 0.0  # seconds spent on the job so far


def _settings_json(settings_dict: dict) -> dict:
    return json.loads(json.dumps(settings_dict))  # tuples -> lists, as read back from job.json


def find_job(path: str | Path) -> Path:
    """The job directory `path` names (a `.job` folder, or the video next to it); JobError if none."""
    p = Path(path)
    if p.suffix == ".mp4" or (not p.is_dir() and p.with_name(p.name + JOB_SUFFIX).is_dir()):
        p = p.with_suffix(JOB_SUFFIX) if p.suffix == ".mp4" else p.with_name(p.name + JOB_SUFFIX)
    if not (p / "job.json").is_file():
        raise JobError(f"{path} is not an unfinished job directory (no job.json in it).")
    return p


class JobDir:
    """One job directory (see the module docstring)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    # ------------------------------------------------------------------ description
    @property
    def out(self) -> Path:
        return self.root.parent

    @property
    def name(self) -> str:
        """The output file stem (`<out>/<name>.mp4`)."""
        return self.read()["name"]

    def read(self) -> dict:
        try:
            data = json.loads((self.root / "job.json").read_text())
        except (OSError, ValueError) as e:
            raise JobError(f"the job file {self.root / 'job.json'} cannot be read ({e}).") from None
        if not isinstance(data, dict) or data.get("version") != _VERSION or "settings" not in data:
            raise JobError(f"{self.root / 'job.json'} is not a framepack job file of version {_VERSION}.")
        return data

    @classmethod
    def open_for(
        cls,
        out: Path,
        stem: str,
        settings_dict: dict,
        bundle_root: str,
        order: str,
        extra: dict | None = None,
    ) -> JobDir:
        """The job of a new run: created, or resumed when an unfinished one with the same settings
        exists. `extra` is more of the job's description for `job.json` (an extension's video)."""
        job = cls(out / f"{stem}{JOB_SUFFIX}")
        described = {
            "version": _VERSION,
            "name": stem,
            "bundle": bundle_root,
            "order": order,
            "settings": _settings_json(settings_dict),
            **(extra or {}),
        }
        if (job.root / "job.json").is_file():
            old = job.read()
            if old["settings"] != described["settings"] or old.get("bundle") != bundle_root:
                check_free(job.root)  # a run still going: its pid, not "delete it"
                raise JobError(
                    f"{job.root} holds an unfinished job with other settings; resume it with "
                    f"--resume {job.root} or delete it."
                )
            return job
        if job.root.exists() and not job.root.is_dir():
            raise JobError(f"cannot create the job directory {job.root}: a file is in the way.")
        try:
            write_json_atomic(described, job.root / "job.json")  # creates the folder
        except BaseException:
            if job.root.is_dir() and not any(job.root.iterdir()):
                job.root.rmdir()  # leave no empty job directory behind (a full disk, say)
            raise
        return job

    # ------------------------------------------------------------------ inputs
    def save_images(self, prepared) -> None:
        """The fitted input images as PNGs (the start image is the plain frame in text-to-video)."""
        from PIL import Image

        images = {"start": prepared.image}
        if prepared.end_image is not None:
            images["end"] = prepared.end_image
        images.update({f"keyframe_{i}": im for i, im in enumerate(prepared.keyframe_images)})
        for name, image in images.items():
            with atomic_write(self.root / "images" / f"{name}.png") as tmp:
                Image.fromarray(image).save(tmp, format="PNG")

    def save_inputs(self, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        with atomic_write(self.root / "inputs.safetensors") as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))

    def check_images(self, prepared) -> None:
        """Refuse to go on with other input pixels than the job's (same settings, other image array)."""
        from ..io import load_image

        stored = self.root / "images" / "start.png"
        if stored.is_file() and not np.array_equal(load_image(stored), prepared.image):
            raise JobError(
                f"{self.root} holds an unfinished job with another start image; resume it with "
                f"--resume {self.root} or delete it."
            )

    def load_inputs(self) -> dict[str, torch.Tensor] | None:
        from safetensors.torch import load_file

        path = self.root / "inputs.safetensors"
        if not path.is_file():
            return None
        try:
            return load_file(str(path))
        except Exception as e:  # a damaged file: one sentence, the job cannot go on
            raise JobError(f"the job's inputs {path} cannot be read ({e}).") from None

    def inputs(self, prepared, encode) -> dict[str, torch.Tensor]:
        """The run's conditioning: read back from the job, or `encode()`d and stored with the
        fitted images (once per job)."""
        inputs = self.load_inputs()
        if inputs is None:
            inputs = encode()
            self.save_images(prepared)
            self.save_inputs(inputs)
        return inputs

    # ------------------------------------------------------------------ sections
    def _section_path(self, number: int) -> Path:
        return self.root / "sections" / f"{number:04d}.safetensors"

    def _tail_path(self, number: int) -> Path:
        return self.root / "segments" / f"{number:04d}.tail.safetensors"

    def commit_section(self, number: int, latents: torch.Tensor, state: SectionState) -> None:
        """Write section `number`'s commit (after its segments): latents, RNG, decoder state. The
        blending tail goes to its own file first; earlier sections' tails are dropped after."""
        from safetensors.torch import save_file

        with atomic_write(self._tail_path(number)) as tmp:
            save_file({"tail": state.tail.detach().cpu().contiguous()}, str(tmp))
        tensors = {"latents": latents.detach().float().cpu().contiguous(), "rng": state.rng.contiguous()}
        meta = {
            "lo": state.lo,
            "hi": state.hi,
            "segments": state.segments,
            "tail": state.tail_name,
            "elapsed": state.elapsed,
        }
        with atomic_write(self._section_path(number)) as tmp:
            save_file(tensors, str(tmp), metadata={"state": json.dumps(meta)})
        for old in (self.root / "segments").glob("*.tail.safetensors"):
            if old != self._tail_path(number):
                old.unlink(missing_ok=True)

    def _read_tail(self, number: int, commit) -> torch.Tensor:
        """The float frames section `number` left to be blended (a job written before the float
        blend kept them as uint8 in the commit itself)."""
        from safetensors.torch import load_file

        path = self._tail_path(number)
        if not path.is_file() and "tail" in commit.keys():
            return from_uint8_frames(commit.get_tensor("tail").numpy())
        try:
            return load_file(str(path))["tail"]
        except Exception as e:
            raise JobError(f"the job's blending frames {path} cannot be read ({e}).") from None

    def load_sections(self, numbers: list[int]) -> tuple[dict[int, torch.Tensor], SectionState | None]:
        """Window latents of the committed sections (a prefix of `numbers`) and the last one's state."""
        from safetensors import safe_open

        latents: dict[int, torch.Tensor] = {}
        state = None
        committed = []  # the prefix of `numbers` with a commit
        for n in numbers:
            if not self._section_path(n).is_file():
                break
            committed.append(n)
        for n in committed:
            path = self._section_path(n)
            try:
                with safe_open(str(path), "pt") as f:
                    meta = json.loads(f.metadata()["state"])
                    latents[n], rng = f.get_tensor("latents"), f.get_tensor("rng")
                    tail = self._read_tail(n, f) if n == committed[-1] else None
            except JobError:
                raise
            except Exception as e:
                raise JobError(f"the job's section file {path} cannot be read ({e}).") from None
            state = SectionState(
                n, rng, meta["lo"], meta["hi"], tail, meta["segments"], meta["tail"], meta["elapsed"]
            )
        needed = [f"{name}.mp4" for name, _ in state.segments] if state else []
        needed += [f"{state.tail_name}.tail.mp4"] if state and state.tail_name else []
        for name in needed:
            if not (self.root / "segments" / name).is_file():
                raise JobError(f"the job's segment {name} is missing from {self.root / 'segments'}.")
        return latents, state

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _taken(root: Path, pid: int) -> JobError:
    who = f"pid {pid}" if pid else "pid unknown"
    return JobError(f"the job {root} is being run by another process ({who}).")


def check_free(job_dir: str | Path) -> None:
    """JobError when another run holds the job directory (a check before any work; the run's own
    lock in `open_job` is what keeps two runs apart)."""
    pid = JobLock(job_dir).holder()
    if pid is not None:
        raise _taken(Path(job_dir), pid)


def _claim_job(out: Path, stem: str) -> None:
    """Take the default name `stem` by creating its job directory (FileExistsError: taken)."""
    (out / f"{stem}{JOB_SUFFIX}").mkdir()


@contextmanager
def open_job(
    out_dir: str | Path, job_dir: str | Path | None, settings, bundle, order: str, extra: dict | None = None
) -> Iterator[JobDir]:
    """The job directory a run works in, locked against other processes while the run holds it.

    `job_dir` resumes that job (its folder and name replace `out_dir` and `settings.name`);
    otherwise `<out_dir>/<name>.job` is created, or resumed when it holds the same settings
    (`JobDir.open_for`); without a name, a new default one (`framepack.pipeline.output_names`)
    whose job directory's creation claims it. JobError when another process runs the job
    (`framepack.pipeline.joblock`), naming its pid.
    """
    if job_dir is not None:
        job = JobDir(job_dir)
        job.read()
    else:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        stem = settings.name or claim_name(out, default_stem(settings.seed), partial(_claim_job, out))
        bundle_root = str(getattr(bundle, "root", ""))
        job = JobDir.open_for(out, stem, settings.to_dict(), bundle_root, order, extra)
    lock = JobLock(job.root)
    try:
        pid = lock.acquire()
    except FileNotFoundError:  # finished (and removed) by the run that held it
        raise JobError(f"{job.root} is not an unfinished job directory (no job.json in it).") from None
    if pid is not None:
        raise _taken(job.root, pid)
    try:
        if not (job.root / "job.json").is_file():
            raise JobError(f"{job.root} is not an unfinished job directory (no job.json in it).")
        yield job
    finally:
        lock.release()
        if not (job.root / "job.json").exists():  # finished: where an open file kept it (Windows)
            shutil.rmtree(job.root, ignore_errors=True)
