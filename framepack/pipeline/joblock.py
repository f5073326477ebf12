"""An OS lock on a job directory, held while a run works in it, so two processes (a CLI run still
going and a GUI Resume or a second `--resume`) never write the same job.

The lock is an exclusive `flock` on `<job>/run.lock` (`msvcrt.locking` on Windows), which the
kernel drops when the holding process ends in any way, kill -9 included: a killed run leaves its
job resumable and no stale lock to clean up. The holder writes its pid into the file so a refused
run can name it. A probe (`holder`) takes the lock shared for an instant; a run that meets a probe
tries again for a moment before it reports the job as taken.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
try:
    import msvcrt
except ImportError:  # POSIX
    msvcrt = None

__all__ = ["LOCK_FILE", "JobLock"]

LOCK_FILE = "run.lock"
_WIN_OFFSET = 1 << 20  # Windows locks are mandatory: lock a byte past the pid, not the pid itself


def _try_lock(fd: int, shared: bool) -> bool:
    """Take the lock without waiting; False when another open file holds it."""
    try:
        if fcntl is not None:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        elif msvcrt is not None:
            os.lseek(fd, _WIN_OFFSET, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError:
        return False
    return True  # neither module: no locking on this platform


def _unlock(fd: int) -> None:
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
    elif msvcrt is not None:
        os.lseek(fd, _WIN_OFFSET, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)


def _read_pid(fd: int) -> int:
    """The pid the holder wrote (0 when it has not written one yet)."""
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 32).decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else 0


class JobLock:
    """The lock of the job directory `root` (see the module docstring)."""

    def __init__(self, root: str | Path) -> None:
        self.path = Path(root) / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, patience: float = 0.5) -> int | None:
        """Take the lock and write this process's pid into it; None on success, else the pid of
        the process that holds it (0 if it has not written one yet). FileNotFoundError when the job
        directory is gone."""
        assert self._fd is None, "the lock is already held"
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + patience
        while not _try_lock(fd, shared=False):
            if time.monotonic() >= deadline:  # not a probe's instant: another run holds it
                pid = _read_pid(fd)
                os.close(fd)
                return pid
            time.sleep(0.02)
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return None

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                _unlock(fd)
            finally:
                os.close(fd)

    def holder(self) -> int | None:
        """Without waiting: None when no run holds the lock, else the holder's pid (0 if unknown).

        A job directory without a lock file (never run by this version) is free.
        """
        if self._fd is not None:
            return os.getpid()
        try:
            fd = os.open(self.path, os.O_RDWR)
        except OSError:
            return None
        try:
            if _try_lock(fd, shared=True):
                _unlock(fd)
                return None
            return _read_pid(fd)
        finally:
            os.close(fd)
