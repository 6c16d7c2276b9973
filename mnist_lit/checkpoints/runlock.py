"""One fit at a time per checkpoint folder: the run lock."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import time
from pathlib import Path

from filelock import FileLock, Timeout

from mnist_lit.checkpoints.files import EXTENSION
from mnist_lit.checkpoints.writer import PART
from mnist_lit.errors import CheckpointError

LOCK_NAME = ".lock"


class RunLock:
    """An exclusive lock on a checkpoint folder, held while a fit writes there.

    filelock's FileLock: flock on <folder>/.lock, which the OS releases when the process ends, however it ends, so
    a killed run never leaves a stale lock behind. filelock opens the file with O_NOFOLLOW (since 3.20.1; checked in
    4.3.1's _native/_unix.py), so a link planted as the lock file is refused (ELOOP), not followed; a FIFO or a
    device there it would lock all the same, so that is refused here first. The file holds the holder's PID, for
    the refusal message only (filelock 3.x truncates it on open: the message then says "another process"), and is
    removed while still held: a process that locked the removed file finds it unlinked and does not take it.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / LOCK_NAME
        self._created = not directory.exists()
        self._lock: FileLock | None = None

    def acquire(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):  # filelock would lock a FIFO or a device as well
            if not stat.S_ISREG(mode := os.lstat(self.path).st_mode) and not stat.S_ISLNK(mode):
                self._clean_up()
                raise CheckpointError(f"refusing to lock {self.path}: it exists and is not a regular file")
        lock = FileLock(self.path, timeout=0)
        try:
            lock.acquire()
        except Timeout:
            self._clean_up()
            holder = self._read_holder()
            for _ in range(20):  # a holder that has just taken the lock writes its PID a moment later
                if holder.isdigit():
                    break
                time.sleep(0.005)
                holder = self._read_holder()
            who = f"PID {holder}" if holder.isdigit() else "another process"
            raise CheckpointError(
                f"{self.directory} is in use by another fit ({who}): wait for it to end, or give this run its own"
                " --trainer.default_root_dir"
            ) from None
        except OSError as err:
            self._clean_up()
            if err.errno == errno.ELOOP:
                raise CheckpointError(
                    f"refusing to lock {self.path}: it is a symbolic link, and links are not followed"
                ) from None
            raise
        self._lock = lock
        fd = os.open(self.path, os.O_WRONLY | os.O_NOFOLLOW)
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        finally:
            os.close(fd)
        # Torn temporary files of a killed run: ours to remove, now that no other fit writes here.
        for torn in self.directory.glob(f".*{EXTENSION}{PART}"):
            with contextlib.suppress(OSError):
                if stat.S_ISREG(torn.lstat().st_mode):
                    torn.unlink()

    def _read_holder(self) -> str:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return ""
        try:
            return os.read(fd, 32).decode(errors="replace").strip()
        finally:
            os.close(fd)

    def release(self) -> None:
        if self._lock is None:
            return
        with contextlib.suppress(OSError):
            os.remove(self.path)  # while still holding the lock: see the class's docstring
        self._lock.release()
        self._lock = None
        self._clean_up()

    def _clean_up(self) -> None:
        """A folder this run created and left empty goes again: a refused or failed run leaves nothing."""
        if self._created:
            with contextlib.suppress(OSError):
                self.directory.rmdir()
