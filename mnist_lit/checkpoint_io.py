"""Lightning's checkpoint I/O for mnist_lit: every checkpoint a trainer writes goes through write_atomically, sealed
with a digest and off the training thread; every one it reads is verified (or was, by mnist_lit.runs, moments ago)."""

from __future__ import annotations

import contextlib
import copy
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

from mnist_lit.digest import DIGEST_KEY, digest
from mnist_lit.storage import CheckpointError, load_checkpoint, newest_intact, write_atomically


def _copy_file(target: str, source: str) -> None:
    write_atomically(target, io.BytesIO(Path(source).read_bytes()))


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def _snapshot(value: Any) -> Any:
    """The checkpoint as it is now: containers copied, tensors cloned (the optimizer's state and the weights are
    updated in place by the next step); everything else is immutable or rebuilt at each save."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        copied = copy.copy(value)  # its own type, and an OrderedDict's attributes (a state_dict's _metadata)
        for key, item in value.items():
            copied[key] = _snapshot(item)
        return copied
    if type(value) in (list, tuple):
        return type(value)(_snapshot(item) for item in value)
    return value


class _Sealed:
    """One checkpoint, sealed and serialised on the writer thread, written once or twice (last.ckpt's copy)."""

    buffer: io.BytesIO | None = None

    def write(self, path: str, checkpoint: dict[str, Any]) -> None:
        checkpoint[DIGEST_KEY] = digest(checkpoint)
        self.buffer = io.BytesIO()
        torch.save(checkpoint, self.buffer)
        write_atomically(path, self.buffer)

    def write_again(self, path: str) -> None:
        assert self.buffer is not None  # the queue runs in order, and nothing after a failed write runs
        write_atomically(path, self.buffer)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoint files written atomically, sealed with a digest, and off the training thread.

    On the caller's thread a checkpoint is only snapshotted (its tensors copied, while the weights are still
    those of the step saved); one writer thread then seals it with its digest, serialises it and writes it with
    write_atomically while training goes on. Removals wait in the same queue behind the writes before them,
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
        self._latest: tuple[str, _Sealed] | None = None
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
            self._error = CheckpointError(f"could not write checkpoint {args[0]}: {err.strerror or err}")
            self._failed = Path(args[0])
        except BaseException as err:
            self._error = err

    def _raise_error(self) -> None:
        if self._error is None:
            return
        error, self._error = self._error, None
        if isinstance(error, CheckpointError) and self._failed is not None:
            if kept := newest_intact(self._failed.parent, besides=self._failed):
                error = CheckpointError(f"{error}; the checkpoints written before it are intact (newest: {kept})")
            else:
                error = CheckpointError(f"{error}; no checkpoint of this run reached the disk")
        raise error

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            self.flush()
            checkpoint[DIGEST_KEY] = digest(checkpoint)
            return super().save_checkpoint(checkpoint, path, storage_options)
        snapshot = _snapshot(checkpoint)
        if self._write is not None:
            wait([self._write])
        sealed = _Sealed()
        self._latest = (os.fspath(path), sealed)
        self._write = self._submit(sealed.write, os.fspath(path), snapshot)

    def copy(self, source: str, target: str) -> None:
        """target becomes a second, independent copy of the checkpoint just saved as source: its own inode, so
        damage to one file (a truncation, bit rot) leaves the other intact."""
        if self._latest is not None and self._latest[0] == source:
            self._write = self._submit(self._latest[1].write_again, target)
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
