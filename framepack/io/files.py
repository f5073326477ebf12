"""Atomic file writes: a reader sees the old file or the whole new one, never a partial one.

Each write goes to a hidden temporary file in the target's directory (same file system, so the
final `os.replace` is atomic), is flushed and fsynced, then renamed onto the target; the directory
is fsynced too so the rename survives a crash. Any failure, including KeyboardInterrupt, removes
the temporary file and leaves the target as it was.
"""

from __future__ import annotations

import json
import os
import secrets
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from framepack.io.errors import InputError

# The longest name an output may take: with the longest suffix written beside it (the temporary
# ".NAME.json.XXXXXXXX.tmp" of `atomic_write`, 19 bytes) it stays under the usual 255-byte limit.
MAX_NAME_BYTES = 200


def check_file_name(name: object, what: str = "the name") -> str:
    """`name` when outputs can be named after it (`<out>/<name>.mp4`), else InputError.

    A plain file name: 1 to `MAX_NAME_BYTES` bytes of UTF-8, no `/` or `\\` (so never a path, on
    any system), no leading dot (so not `.`, `..` or a hidden file), no control character (NUL
    included) or undecodable byte, no whitespace at either end (refused rather than stripped, so the
    files are named exactly as asked). `what` starts the one-sentence error ("the name", or a place
    and "the name").
    """
    if isinstance(name, str) and _is_plain(name):
        return name
    shown = repr(name[:40] + "...") if isinstance(name, str) and len(name) > 43 else repr(name)
    raise InputError(
        f"{what} {shown} is not a plain file name: use 1 to {MAX_NAME_BYTES} bytes with no / or \\, "
        "no control characters, no leading dot and no spaces at either end."
    )


def _is_plain(name: str) -> bool:
    if name != name.strip() or name.startswith(".") or any(c in "/\\" for c in name):
        return False
    if any(unicodedata.category(c) in ("Cc", "Cs") for c in name):  # Cs: an undecodable argv byte
        return False
    return 0 < len(name.encode("utf-8")) <= MAX_NAME_BYTES


def fsync_path(path: Path) -> None:
    """Flush the file at `path` to disk."""
    # "r+b", not "rb": Windows only flushes handles opened for writing.
    with open(path, "r+b") as f:
        os.fsync(f.fileno())


def _fsync_dir(directory: Path) -> None:
    if os.name == "nt":  # directories cannot be opened (or fsynced) on Windows
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems (network mounts) refuse; the data itself is synced
        pass
    finally:
        os.close(fd)


def _create_temp(target: Path) -> Path:
    # Not `tempfile.mkstemp`: it creates mode 0600, which the rename would carry onto the output;
    # mode 0o666 lets the umask decide, as for any ordinary file.
    while True:
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return tmp
        except FileExistsError:  # pragma: no cover - 32 random bits collided
            continue


@contextmanager
def atomic_write(path: str | os.PathLike[str], replace: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write into; on success it replaces `path` atomically.

    Creates missing parent directories. The temporary file exists (empty) when yielded, so
    writers may open it by name or overwrite it. With `replace=False` the file only appears if
    `path` does not exist yet, and FileExistsError is raised (nothing written) if it does: the
    complete file is its own claim on the name.
    """
    target = Path(path)
    if target.is_dir():
        raise InputError(f"Cannot write {target} because it is a directory.")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temp(target)
    try:
        yield tmp
        fsync_path(tmp)
        if replace:
            os.replace(tmp, target)
        else:
            _move_new(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def _move_new(tmp: Path, target: Path) -> None:
    """Rename `tmp` to `target` unless `target` exists (FileExistsError): a hard link, which never
    replaces; where the file system has none, an exclusive empty file claims the name first."""
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise
    except OSError:  # no hard links here (FAT, some network mounts)
        os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        os.replace(tmp, target)
        return
    tmp.unlink()


def write_bytes_atomic(data: bytes, path: str | os.PathLike[str]) -> Path:
    """Write `data` to `path` atomically and return the path."""
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_json_atomic(data: Any, path: str | os.PathLike[str]) -> Path:
    """Write `data` as UTF-8 JSON (indented, strict: no NaN/Infinity) to `path` atomically.

    Serialises before touching the disk, so unserialisable data leaves no file behind.
    """
    text = json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    return write_bytes_atomic(text.encode("utf-8"), path)
