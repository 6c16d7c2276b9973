"""Lightning's checkpoint I/O for mnist_lit: every checkpoint a trainer writes is sealed with a digest and written
through write_atomically on a writer thread; every one it reads is verified (or was, by mnist_lit.runs, moments
ago)."""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO

# private-lightning[cloud_io]: TorchCheckpointIO's own test for a local path; _PATH its path type
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.fabric.utilities.types import _PATH

from mnist_lit.checkpoints.digest import DIGEST_KEY, digest
from mnist_lit.checkpoints.files import load_checkpoint, newest_intact
from mnist_lit.checkpoints.writer import write_atomically
from mnist_lit.errors import CheckpointError, WriteFailed


def _copy_file(target: str, source: str) -> None:
    write_atomically(target, io.BytesIO(Path(source).read_bytes()))


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoint files written atomically, sealed with a digest, and off the training thread.

    A checkpoint is sealed and serialised on the caller's thread (a snapshot while training goes on); one writer
    thread then writes it with write_atomically. Removals wait in the same queue behind the writes before them,
    and once a write fails nothing queued after it runs: an older file is never removed unless its successor is
    complete on disk. A kill at any instant leaves complete files only. At most one write is in flight (a slow
    disk slows training down rather than piling up snapshots), and a failed write is raised at the next save or
    at teardown, naming the file and the cause.
    """

    def __init__(self) -> None:
        super().__init__()
        self._writer: ThreadPoolExecutor | None = None
        self._write: Future | None = None
        self._error: BaseException | None = None
        self._latest: tuple[str, io.BytesIO] | None = None
        self._failed: Path | None = None

    def _submit(self, fn: Callable[..., None], *args: Any) -> Future:
        self._raise_error()
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        return self._writer.submit(self._run, fn, *args)

    def _run(self, fn: Callable[..., None], *args: Any) -> None:
        if self._error is not None:  # a write before this failed: keep every older file as it is
            return
        try:
            fn(*args)
        except OSError as err:
            self._error = WriteFailed(f"could not write checkpoint {args[0]}: {err.strerror or err}")
            self._failed = Path(args[0])
        except BaseException as err:
            self._error = err

    def _raise_error(self) -> None:
        if self._error is None:
            return
        error, self._error = self._error, None
        if isinstance(error, CheckpointError) and self._failed is not None:
            if kept := newest_intact(self._failed.parent, besides=self._failed):
                error = type(error)(f"{error}; the checkpoints written before it are intact (newest: {kept})")
            else:
                error = type(error)(f"{error}; no checkpoint of this run reached the disk")
        raise error

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        # Sealed and serialised here, not on the writer thread: with tensors snapshotted and the rest moved to the
        # writer, an epoch of training with a save every 10 steps took 2.49 s against 2.31 s here (2 cores, epochs
        # alternated in one process): a third busy thread stalls torch's two compute threads more than the 0.8 ms
        # of work saves. The writer keeps only the file system's work.
        checkpoint[DIGEST_KEY] = digest(checkpoint)
        if storage_options is not None or not _is_local_file_protocol(path):
            self.flush()
            return super().save_checkpoint(checkpoint, path, storage_options)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        if self._write is not None:
            wait([self._write])
        self._latest = (os.fspath(path), buffer)
        self._write = self._submit(write_atomically, os.fspath(path), buffer)

    def copy(self, source: str, target: str) -> None:
        """target becomes a second, independent copy of the checkpoint just saved as source: its own inode, so
        damage to one file (a truncation, bit rot) leaves the other intact."""
        if self._latest is not None and self._latest[0] == source:
            self._write = self._submit(write_atomically, target, self._latest[1])
        else:
            self._write = self._submit(_copy_file, target, source)

    def load_checkpoint(self, path: _PATH, map_location: Any | None = None, weights_only: bool | None = None) -> Any:
        """Every checkpoint Lightning reads (a resume, test's weights) verified as mnist_lit reads one."""
        if not _is_local_file_protocol(path):
            return super().load_checkpoint(path, map_location, weights_only)
        return load_checkpoint(path)

    def remove_checkpoint(self, path: _PATH) -> None:
        if not _is_local_file_protocol(path):
            self.flush()
            return super().remove_checkpoint(path)
        self._submit(_remove, os.fspath(path))

    def flush(self) -> None:
        """Wait until every queued write and removal is on disk (or has failed)."""
        if self._writer is not None:
            self._writer.submit(lambda: None).result()
        self._raise_error()

    def teardown(self) -> None:
        try:
            self.flush()
        finally:
            if self._writer is not None:
                self._writer.shutdown()
                self._writer = None
