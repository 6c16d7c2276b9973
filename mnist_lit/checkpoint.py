"""Checkpoints that survive a kill at any instant, resume exactly, and load nothing but tensors."""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import re
import shutil
import signal
import zipfile
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says which and why."""


class Diverged(RuntimeError):
    """Training produced weights that are not finite numbers; they were not saved."""


class Interrupted(Exception):
    """Training stopped on Ctrl-C or SIGTERM after saving a resumable checkpoint."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


def checkpoint_dir(default_root_dir: str | os.PathLike | None, dirpath: str | os.PathLike | None) -> Path:
    """Where a run's checkpoints go: --checkpoint.dirpath, else <default_root_dir>/checkpoints."""
    if dirpath is not None:
        return Path(dirpath).expanduser()
    return Path(default_root_dir or os.getcwd()).expanduser() / "checkpoints"


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint's contents, unpickling nothing but tensors and plain containers (weights_only)."""
    unreadable = f"{path} is not a readable checkpoint (it is not in torch.save's format)"
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except pickle.UnpicklingError as err:
        # torch's safe unpickler names what it refused: a GLOBAL (a function or class), a call, an object
        if re.search(r"GLOBAL|reduce for|new object", str(err)):
            raise CheckpointError(
                f"refusing to load {path}: it holds pickled Python objects, not just tensors (loading it could run"
                " code). Use a checkpoint written by mnist_lit"
            ) from None
        raise CheckpointError(unreadable) from None
    except IsADirectoryError:
        raise CheckpointError(f"{path} is a folder, not a checkpoint file") from None
    except PermissionError as err:
        raise CheckpointError(f"cannot read {path}: {err.strerror}") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path} is not a readable checkpoint ({first}); it may be truncated") from None
    except Exception:  # torch's legacy reader fails on arbitrary bytes with KeyError, struct.error, ...
        raise CheckpointError(unreadable) from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(f"{path} is not a Lightning checkpoint (it has no state_dict)")
    if "pytorch-lightning_version" not in checkpoint:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (it has no pytorch-lightning_version)")
    return checkpoint


def check_resumable(path: str | os.PathLike, checkpoint: dict[str, Any]) -> None:
    """Fail unless the checkpoint holds what resuming needs besides the weights."""
    if not checkpoint.get("optimizer_states") or "loops" not in checkpoint:
        raise CheckpointError(
            f"{path} holds weights only (no optimizer state or progress), so training cannot resume from it;"
            " it can still be tested, used to predict or exported"
        )


def check_weights(path: str | os.PathLike, checkpoint: dict[str, Any], model: torch.nn.Module) -> None:
    """Fail unless the checkpoint holds weights of exactly this model's shapes."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    found = {k: getattr(v, "shape", None) for k, v in checkpoint["state_dict"].items()}
    if expected.keys() != found.keys():
        missing, unexpected = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
        raise CheckpointError(
            f"{path} is a checkpoint of another model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    if wrong := [k for k in expected if expected[k] != found[k]]:
        raise CheckpointError(f"{path} is a checkpoint of another model: {wrong[0]} has shape {found[wrong[0]]}")
    weights = checkpoint["state_dict"]
    if broken := [k for k in expected if not weights[k].is_floating_point() or not bool(weights[k].isfinite().all())]:
        raise CheckpointError(f"{path} holds no usable weights: {broken[0]} is not a tensor of finite numbers")


def newest_checkpoint(directory: Path) -> Path | None:
    """The run's latest checkpoint: last.ckpt, or, if a kill came between the first periodic file and the first
    last.ckpt, the newest periodic file (the same state)."""
    last = directory / f"{Checkpoint.CHECKPOINT_NAME_LAST}{Checkpoint.FILE_EXTENSION}"
    if last.is_file():
        return last
    periodic = [p for p in directory.glob(f"*{Checkpoint.FILE_EXTENSION}") if p.is_file()]
    return max(periodic, key=lambda p: p.stat().st_mtime_ns, default=None)


def resolve(ckpt_path: str, directory: Path, fitting: bool, root_option: str = "--trainer.default_root_dir") -> str:
    """The file --ckpt_path names: 'last' is the run's latest checkpoint in directory, which must exist."""
    if ckpt_path == "best":
        raise CheckpointError(
            "--ckpt_path best needs a checkpoint that tracks a metric; pass 'last' or a checkpoint file"
        )
    if ckpt_path != "last":
        return ckpt_path
    if (newest := newest_checkpoint(directory)) is None:
        last = directory / f"{Checkpoint.CHECKPOINT_NAME_LAST}{Checkpoint.FILE_EXTENSION}"
        verb, hint = ("resume", "drop --ckpt_path to start a new run") if fitting else ("load", "run `fit` first")
        raise CheckpointError(
            f"no checkpoint to {verb}: {last.absolute()} does not exist ({hint}, or check {root_option})"
        )
    return str(newest)


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


def write_atomically(path: str, data: io.BytesIO) -> None:
    """data to a temporary file beside path, fsynced, then renamed over path: a complete file or none."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.part"
    try:
        with open(tmp, "wb") as f:
            f.write(data.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    fsync_dir(directory)


def link_atomically(source: str, target: str) -> None:
    """target becomes a second name of source's file (a copy where hard links are not supported)."""
    if os.path.exists(target) and os.path.samefile(source, target):  # a rename onto itself would leave tmp
        return
    tmp = f"{target}.part"
    with contextlib.suppress(FileNotFoundError):
        os.remove(tmp)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)
    fsync_dir(os.path.dirname(target) or ".")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoint files written atomically, and off the training thread.

    A checkpoint is serialised on the caller's thread, a snapshot while training goes on; one writer thread
    then writes it with write_atomically. Removals and links wait in the same queue behind the writes before
    them, so an older file is never removed before its successor is complete. A kill at any instant leaves
    complete files only. At most one write is in flight (a slow disk slows training down rather than piling up
    snapshots), and a failed write is raised at the next save or at teardown.
    """

    def __init__(self) -> None:
        super().__init__()
        self._writer: ThreadPoolExecutor | None = None
        self._write: Future | None = None
        self._error: BaseException | None = None

    def _submit(self, fn: Callable[..., None], *args: Any) -> Future:
        self._raise_error()
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        future = self._writer.submit(fn, *args)
        future.add_done_callback(self._record_error)
        return future

    def _record_error(self, future: Future) -> None:
        if future.exception() is not None and self._error is None:
            self._error = future.exception()

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            self.flush()
            return super().save_checkpoint(checkpoint, path, storage_options)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        if self._write is not None:
            wait([self._write])
        self._write = self._submit(write_atomically, os.fspath(path), buffer)

    def remove_checkpoint(self, path: _PATH) -> None:
        if not _is_local_file_protocol(path):
            self.flush()
            return super().remove_checkpoint(path)
        self._submit(_remove, os.fspath(path))

    def link(self, source: str, target: str) -> None:
        self._submit(link_atomically, source, target)

    def flush(self) -> None:
        """Wait until every queued write, link and removal is on disk."""
        if self._writer is not None:
            self._writer.submit(lambda: None).result()
        self._raise_error()

    def teardown(self) -> None:
        self.flush()
        if self._writer is not None:
            self._writer.shutdown()
            self._writer = None


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


class Checkpoint(ModelCheckpoint):
    """ModelCheckpoint whose files are never half-written and whose last.ckpt resumes a run exactly.

    - Every file is written through AtomicCheckpointIO: a kill at any instant leaves the previous complete
      file or the new one, never a torn one; a periodic file is complete before the older one is deleted.
    - The checkpoint carries the torch RNG state (dropout's randomness) and, through the train loader, the
      position in the epoch, so a resumed run continues bit for bit on the same hardware.
    - Ctrl-C or SIGTERM during fit finishes the current batch, saves last.ckpt and stops.
    - last.ckpt is also written when training ends, so `test --ckpt_path last` sees the final weights.
    """

    def __init__(
        self,
        dirpath: str | None = None,
        filename: str | None = None,
        every_n_train_steps: int | None = 10,
        save_last: bool = True,
        save_top_k: int = 1,
        save_weights_only: bool = False,
        verbose: bool = False,
    ) -> None:
        """
        Args:
            dirpath: Folder for checkpoints; default <trainer.default_root_dir>/checkpoints.
            filename: Name pattern of the periodic checkpoints; default "epoch={epoch}-step={step}".
            every_n_train_steps: Save after this many optimizer steps (the guide saves every 10 batches).
            save_last: Also keep last.ckpt, the one `--ckpt_path last` resumes from.
            save_top_k: Periodic checkpoints to keep: 1 the newest only, -1 all of them, 0 none.
            save_weights_only: Leave out optimizer and loop state (such checkpoints cannot resume a run).
            verbose: Print a line on every save.
        """
        super().__init__(
            dirpath=dirpath,
            filename=filename,
            every_n_train_steps=every_n_train_steps,
            save_last=save_last,
            save_top_k=save_top_k,
            save_weights_only=save_weights_only,
            verbose=verbose,
            # Overwrite a name rather than write name-v1: a file left by a killed run is replaced atomically.
            enable_version_counter=False,
        )
        self._rng_to_restore: dict[str, Any] | None = None
        self._stop_signal: int | None = None
        self._previous_handlers: dict[int, Any] = {}
        self._last_write: tuple[int, str] | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = str(checkpoint_dir(trainer.default_root_dir, None).resolve())
        # Every checkpoint the trainer writes, this callback's or anyone's, goes through the atomic writer.
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        super().setup(trainer, pl_module, stage)

    # --- atomic writes -------------------------------------------------------------------------------------

    def _save_checkpoint(self, trainer: Trainer, filepath: str) -> None:
        # A diverged model (nan or inf weights) must not replace the last good checkpoint. Checked per save, not
        # per step: a few microseconds and one device sync every 10 steps.
        if not bool(torch.stack([p.isfinite().all() for p in trainer.lightning_module.parameters()]).all()):
            raise Diverged(
                f"training diverged: the weights are not finite numbers at step {trainer.global_step} (is --model.lr"
                " too high?); stopped without saving them: checkpoints written before keep the last finite weights"
            )
        previous = self._last_write
        self._last_write = (trainer.global_step, filepath)
        if previous is None or previous[0] != trainer.global_step:
            super()._save_checkpoint(trainer, filepath)  # through AtomicCheckpointIO
            return
        # last.ckpt right after the periodic file of the same step holds the same bytes: link them rather than
        # serialise and write them again.
        if trainer.is_global_zero:
            checkpoint_io = trainer.strategy.checkpoint_io
            if isinstance(checkpoint_io, AtomicCheckpointIO):
                checkpoint_io.link(previous[1], filepath)
            else:
                link_atomically(previous[1], filepath)
        trainer.strategy.barrier("Checkpoint.link")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step and not trainer.fast_dev_run:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        self._restore_signal_handlers()

    # --- exact resume: the RNG state rides in the checkpoint ------------------------------------------------

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        # At the checkpoint's top level, not in this callback's state: that is keyed by the callback's settings
        # and silently dropped when a run resumes with, say, another every_n_train_steps.
        rng = {"cpu": torch.get_rng_state()}
        if pl_module.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(pl_module.device)
        checkpoint["rng_state"] = rng

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self._rng_to_restore = checkpoint.get("rng_state")

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        loop = trainer.fit_loop
        epoch_loop = loop.epoch_loop
        if (
            loop.restarted_mid_epoch
            and epoch_loop.restarted_on_train_batch_end
            and epoch_loop.batch_progress.is_last_batch
        ):
            # The checkpoint was taken after an epoch's last batch. Lightning 2.6 closes that epoch on resume but
            # then runs the next as if already started (never counted as started, no on_train_epoch_start, and
            # its checkpoints resume wrongly), and keeps counting the finished epoch's batches when an epoch has
            # another number of them now (another number of processes). Start the next epoch afresh.
            loop.reset_restart_stage()
            epoch_loop.reset_restart_stage()
            epoch_loop.batch_progress.reset_on_run()
            epoch_loop.scheduler_progress.reset_on_run()
            epoch_loop.automatic_optimization.optim_progress.reset_on_run()
            epoch_loop.val_loop.batch_progress.total.reset()
        # A resumed run starts from a checkpoint of this very step: nothing new to save until the next step.
        self._last_global_step_saved = trainer.global_step
        # Restored here, not on load: the sanity check and loader setup in between must not shift it.
        if self._rng_to_restore:
            torch.set_rng_state(self._rng_to_restore["cpu"])
            if "cuda" in self._rng_to_restore and pl_module.device.type == "cuda":
                torch.cuda.set_rng_state(self._rng_to_restore["cuda"], pl_module.device)
            self._rng_to_restore = None
        self._install_signal_handlers()

    # --- Ctrl-C and SIGTERM: stop at the next batch boundary with a checkpoint ----------------------------

    def _install_signal_handlers(self) -> None:
        self._stop_signal = None

        def handler(signum: int, frame: FrameType | None) -> None:
            if self._stop_signal is not None:  # a second Ctrl-C: the user really wants out now
                raise KeyboardInterrupt
            self._stop_signal = signum

        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous_handlers[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread: leave signals to whoever owns them
                return

    def _restore_signal_handlers(self) -> None:
        for sig, previous in self._previous_handlers.items():
            signal.signal(sig, previous)
        self._previous_handlers = {}

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore_signal_handlers()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        stop = self._stop_signal is not None
        if trainer.world_size > 1:  # every process must stop at the same batch
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        if self._last_global_step_saved != trainer.global_step:
            if self.save_last:
                self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            elif self.save_top_k != 0:  # no last.ckpt wanted: a periodic file of this step then
                self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))
        signum = self._stop_signal or signal.SIGTERM  # another process got the signal
        step, saved = trainer.global_step, self._last_checkpoint_saved or (self.save_last and self.last_model_path)
        if not saved:
            done = f"stopped at step {step}; no checkpoint was saved (--checkpoint.save_last and save_top_k are off)"
        elif self._last_global_step_saved == step:
            done = f"stopped at step {step} and saved {saved}; resume with `fit --ckpt_path last`"
        else:
            done = f"stopped at step {step}; the newest checkpoint is {saved}; resume with `fit --ckpt_path last`"
        raise Interrupted(f"{signal.Signals(signum).name}: {done}", signum)
