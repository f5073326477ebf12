"""Batch runs: many generations from a JSON-lines file, resumable and sharded over processes.

Each non-blank line of the jobs file is one JSON object: the fields of `GenerationSettings`
(`prompt`, `image`, `seconds`, `seed`, `loras`, ...), plus optionally `model` (a bundle; the
batch's default otherwise), `video` (a video to extend) and `one_frame` / `one_frame_groups`
(a one-frame job writes a PNG).
A job without a `name` is named after its position and content, so a rerun finds it again; a
`name` must be a plain file name (`framepack.io.check_file_name`), as everywhere.
A job is finished when its output (video or PNG) and its JSON sidecar exist; the sidecar is
written last, so a job stopped half-way runs again. Relative paths in a job (`image`, `end_image`,
keyframe images, LoRA files, `video`, and a `model` that is a folder there) are relative to the
jobs file's folder, so a jobs file and its inputs can move together. Under `torchrun --nproc-per-node N` (env
`RANK`, `WORLD_SIZE`) job i goes to rank `i % N`; the processes need no communication.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..io import check_file_name
from ..lora import lora_specs
from .run import Request
from .settings import GenerationSettings, settings_from_dict

__all__ = ["BatchJob", "read_jobs", "job_outputs", "is_finished", "shard", "process_rank"]

_EXTRA = ("model", "video", "one_frame", "one_frame_groups")
_FIELDS = {f.name: f for f in dataclasses.fields(GenerationSettings)}
_SCALARS = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,), "None": (type(None),)}


@dataclass(frozen=True)
class BatchJob:
    """One line of a jobs file."""

    index: int  # 0-based, among the jobs
    line: int  # 1-based line number in the file
    settings: GenerationSettings  # with its `name` filled in
    model: str | None = None
    one_frame: int | None = None
    one_frame_groups: tuple[str, ...] = ("post", "k2", "k4")
    video: str | None = None  # a video to extend (framepack.pipeline.extend)

    @property
    def name(self) -> str:
        assert self.settings.name is not None
        return self.settings.name

    def request(self) -> Request:
        """The run this line asks for (`framepack.pipeline.run`)."""
        return Request(
            self.settings, video=self.video, one_frame=self.one_frame, one_frame_groups=self.one_frame_groups
        )


def _check_type(key: str, value, where: str) -> None:
    annotation = str(_FIELDS[key].type)
    if annotation.startswith("tuple"):
        ok = isinstance(value, (list, tuple)) or (value is None and "None" in annotation)
    else:
        kinds = tuple(t for part in annotation.split("|") for t in _SCALARS.get(part.strip(), ()))
        ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if not ok:
        raise ValueError(
            f"{where}: {key} has the wrong type ({type(value).__name__}, expected {annotation})."
        )


def _from(base: Path | None, value: str) -> str:
    """A relative path of a job, resolved against the jobs file's folder `base`."""
    if base is None or not value or Path(value).is_absolute():
        return value
    return str(base / value)


def _rebase(fields: dict, base: Path | None) -> dict:
    """`fields` with their file paths relative to `base` (after type checks)."""
    for key in ("image", "end_image"):
        if fields.get(key):
            fields[key] = _from(base, fields[key])
    if "keyframes" in fields:
        fields["keyframes"] = [
            [k[0], _from(base, k[1])]
            if isinstance(k, (list, tuple)) and len(k) == 2 and isinstance(k[1], str)
            else k
            for k in fields["keyframes"]
        ]
    if "loras" in fields:
        fields["loras"] = [(_from(base, f), scale) for f, scale in fields["loras"]]
    return fields


def _job(data: dict, index: int, line: int, where: str, base: Path | None = None) -> BatchJob:
    unknown = [k for k in data if k not in _FIELDS and k not in _EXTRA]
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r} (a generation setting, model or one_frame).")
    if "prompt" not in data:
        raise ValueError(f"{where}: the job has no prompt.")
    for key, value in data.items():
        if key in _FIELDS:
            _check_type(key, value, where)
    fields = {k: v for k, v in data.items() if k in _FIELDS}
    if "loras" in fields:
        fields["loras"] = lora_specs(fields["loras"], where)
    fields = _rebase(fields, base)
    if fields.get("name") is None:
        digest = hashlib.sha1(json.dumps(data, sort_keys=True).encode()).hexdigest()[:8]
        fields["name"] = f"job{index:04d}-{digest}"
    check_file_name(fields["name"], f"{where}: the name")
    model, one_frame, video = data.get("model"), data.get("one_frame"), data.get("video")
    if model is not None and not isinstance(model, str):
        raise ValueError(f"{where}: model must be a bundle directory or name.")
    if video is not None and (not isinstance(video, str) or one_frame is not None):
        raise ValueError(f"{where}: video must be the path of a video to extend (and not a one-frame job).")
    if one_frame is not None and (not isinstance(one_frame, int) or isinstance(one_frame, bool)):
        raise ValueError(f"{where}: one_frame must be a whole number (the latent time index).")
    groups = data.get("one_frame_groups", ["post", "k2", "k4"])
    if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
        raise ValueError(f'{where}: one_frame_groups must be a list of group names such as ["post", "k4"].')
    if video is not None:
        video = _from(base, video)
    if model is not None and base is not None and (base / model).is_dir():
        model = str(base / model)
    return BatchJob(index, line, settings_from_dict(fields), model, one_frame, tuple(groups), video)


def read_jobs(path: str | os.PathLike) -> list[BatchJob]:
    """Parse a jobs file; ValueError naming the first bad line. Names must be unique."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read the jobs file {path} ({type(e).__name__}).") from None
    jobs: list[BatchJob] = []
    names: dict[str, int] = {}
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        where = f"{path.name} line {number}"
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where} is not valid JSON ({e.msg}).") from None
        if not isinstance(data, dict):
            raise ValueError(f"{where} is not a JSON object of settings.")
        job = _job(data, len(jobs), number, where, path.resolve().parent)
        if job.name in names:
            raise ValueError(f"{where}: the name {job.name!r} is already used on line {names[job.name]}.")
        names[job.name] = number
        jobs.append(job)
    if not jobs:
        raise ValueError(f"the jobs file {path} has no jobs.")
    return jobs


def job_outputs(job: BatchJob, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """The job's output (mp4, or PNG for a one-frame job) and its sidecar."""
    out = Path(out_dir)
    suffix = ".png" if job.one_frame is not None else ".mp4"
    return out / f"{job.name}{suffix}", out / f"{job.name}.json"


def is_finished(job: BatchJob, out_dir: str | os.PathLike) -> bool:
    """True when the job's output and its sidecar (written last) both exist."""
    return all(p.is_file() for p in job_outputs(job, out_dir))


def process_rank() -> tuple[int, int]:
    """`(rank, world size)` from torchrun's environment; `(0, 1)` outside it."""
    try:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    except ValueError:
        raise ValueError("RANK and WORLD_SIZE must be whole numbers.") from None
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK {rank} does not fit WORLD_SIZE {world}.")
    return rank, world


def shard(jobs: list[BatchJob], rank: int, world: int) -> list[BatchJob]:
    """This process's jobs: job i goes to rank `i % world`."""
    return [job for job in jobs if job.index % world == rank]
