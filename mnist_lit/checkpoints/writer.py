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


def refuse_link(path: str | os.PathLike, dir_fd: int | None = None, shown: str | os.PathLike | None = None) -> None:
    """A file we are about to write must be a regular file or nothing: never a link planted to redirect the write
    (into the file it points to), a device or a folder. dir_fd: path is relative to that open folder."""
    try:
        mode = os.stat(path, dir_fd=dir_fd, follow_symlinks=False).st_mode
    except FileNotFoundError:
        return
    shown = path if shown is None else shown
    if stat.S_ISLNK(mode):
        raise CheckpointError(f"refusing to write {shown}: it is a symbolic link, and links are not followed")
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"refusing to write {shown}: it exists and is not a regular file")


def write_atomically(path: str, data: io.BytesIO | bytes) -> None:
    """data to a fresh temporary file beside path, fsynced, then renamed over path: a complete file or none.

    Only a regular file (or nothing) is replaced: a link, a device or a folder there is refused. The temporary
    file is created anew (O_EXCL, a random name), so no link planted beside path is followed either. Every step
    is taken relative to the folder opened once (made if missing): a folder swapped for a link between the check
    and the rename cannot redirect the write.
    """
    # os calls, not tempfile.mkstemp and a file object: a checkpoint's two files are written every 10 steps by a
    # thread beside training, and with the Python work between the system calls cut, a step of fit took 0.05 to
    # 0.13 ms less (2 to 5% of it; two runs of the two ways alternated by chunks of 100 steps in one process).
    directory, name = os.path.split(path)
    folder = _open_folder(directory or ".")
    try:
        refuse_link(name, dir_fd=folder, shown=path)
        tmp, fd = _create_beside(folder, name, path)
        try:
            try:
                view = memoryview(data.getbuffer() if isinstance(data, io.BytesIO) else data).cast("B")
                while view:
                    if (written := os.write(fd, view)) == 0:
                        raise OSError(errno.EIO, f"no bytes written to {os.path.join(directory, tmp)}")
                    view = view[written:]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, name, src_dir_fd=folder, dst_dir_fd=folder)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp, dir_fd=folder)
            raise
        with contextlib.suppress(OSError):  # the rename made durable (a no-op where folders cannot be synced)
            os.fsync(folder)
    finally:
        os.close(folder)


def _open_folder(directory: str) -> int:
    """The folder a file is written into, opened (made first if missing): the handle every later step goes by."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        return os.open(directory, flags)
    except FileNotFoundError:
        os.makedirs(directory, exist_ok=True)
        return os.open(directory, flags)
    except NotADirectoryError:
        raise CheckpointError(f"refusing to write into {directory}: it is not a folder") from None


def _create_beside(folder: int, name: str, path: str) -> tuple[str, int]:
    """A new, empty file .<random>.<name>.part in the open folder, opened for writing: O_EXCL, so never a file or
    link already there; its mode what a plain open() gives (0666 less the umask)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = f".{os.urandom(6).hex()}.{name}{PART}"
        try:
            return tmp, os.open(tmp, flags, 0o666, dir_fd=folder)
        except FileExistsError:
            continue  # taken (by chance, or planted): another name
    raise FileExistsError(errno.EEXIST, f"no free temporary name beside {path}")


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
