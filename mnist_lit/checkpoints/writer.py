"""The one writer of every file the project writes: checkpoints, a run's config.yaml, figures, predictions, exports,
every sweep file. A complete file or none (a temporary file beside it, fsynced, renamed over it, the rename made
durable), and never through a link, a device or a folder planted where the file goes."""

from __future__ import annotations

import contextlib
import errno
import io
import os
import stat

from mnist_lit.errors import CheckpointError

PART = ".part"  # a file being written: .<random>.<name>.part, renamed to <name> once complete


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename in this directory durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def refuse_link(path: str | os.PathLike) -> None:
    """A file we are about to write must be a regular file or nothing: never a link planted to redirect the write
    (into the file it points to), a device or a folder."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISLNK(mode):
        raise CheckpointError(f"refusing to write {path}: it is a symbolic link, and links are not followed")
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"refusing to write {path}: it exists and is not a regular file")


def write_atomically(path: str, data: io.BytesIO | bytes) -> None:
    """data to a fresh temporary file beside path, fsynced, then renamed over path: a complete file or none.

    Only a regular file (or nothing) is replaced: a link, a device or a folder there is refused. The temporary
    file is created anew (O_EXCL, a random name), so no link planted beside path is followed either.
    """
    # os calls, not tempfile.mkstemp and a file object: a checkpoint's two files are written every 10 steps by a
    # thread beside training, and with the Python work between the system calls cut, a step of fit took 0.05 to
    # 0.13 ms less (2 to 5% of it; two runs of the two ways alternated by chunks of 100 steps in one process).
    refuse_link(path)
    directory = os.path.dirname(path) or "."
    tmp, fd = _create_beside(directory, os.path.basename(path))
    try:
        try:
            view = memoryview(data.getbuffer() if isinstance(data, io.BytesIO) else data).cast("B")
            while view:
                if (written := os.write(fd, view)) == 0:
                    raise OSError(errno.EIO, f"no bytes written to {tmp}")
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    fsync_dir(directory)


def _create_beside(directory: str, name: str) -> tuple[str, int]:
    """A new, empty file .<random>.<name>.part in directory (made if missing), opened for writing: O_EXCL, so never
    a file or link already there; its mode what a plain open() gives (0666 less the umask)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    made = False
    for _ in range(100):
        tmp = os.path.join(directory, f".{os.urandom(6).hex()}.{name}{PART}")
        try:
            return tmp, os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue  # taken (by chance, or planted): another name
        except FileNotFoundError:
            if made:
                raise
            os.makedirs(directory, exist_ok=True)
            made = True
    raise FileExistsError(errno.EEXIST, f"no free temporary name beside {os.path.join(directory, name)}")


def open_log(path: str | os.PathLike) -> io.TextIOWrapper:
    """A log file opened to append to (a child process's output): created if missing, never through a link, and
    refused if something other than a regular file is there."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise CheckpointError(
                f"refusing to write {path}: it is a symbolic link, and links are not followed"
            ) from None
        if err.errno == errno.ENXIO:  # a pipe no one reads
            raise CheckpointError(f"refusing to write {path}: it exists and is not a regular file") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CheckpointError(f"refusing to write {path}: it exists and is not a regular file")
    os.set_blocking(fd, True)
    return open(fd, "a")
