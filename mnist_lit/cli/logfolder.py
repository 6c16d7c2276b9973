"""A run's log folder (lightning_logs/version_N): taken when the trainer is built, its config.yaml and hparams.yaml
written by the project's one writer, and removed again for a run that trained nothing."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from lightning.fabric.loggers import TensorBoardLogger as FabricTensorBoardLogger
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.core.saving import save_hparams_to_yaml
from lightning.pytorch.loggers import TensorBoardLogger

from mnist_lit.checkpoints import write_atomically


class SaveConfig(SaveConfigCallback):
    """The run's config.yaml, in the logger's version folder only. Without a logger the folder would be the root
    itself, where a config.yaml may well be the user's own. Written by the project's one writer (Lightning's own
    save, with save_to_log_dir, would write through a link planted there), on the main process only."""

    own_folder = False  # whether this run's version folder is new (set when the trainer is built)
    _start_step: int | None = None  # the step training started from, once it has
    resuming = False  # whether this fit resumes a run (set when the trainer is built)
    _deferred = False  # a resume's config.yaml, written once it has trained a step

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{**kwargs, "save_to_log_dir": False})  # save_config below writes it

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if trainer.logger is None:
            return
        try:
            super().setup(trainer, pl_module, stage)
        except OSError as err:  # a full disk: name the file, which the error itself does not
            path = err.filename or os.path.join(trainer.log_dir or ".", self.config_filename)
            raise OSError(err.errno, err.strerror, path) from None

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not self.own_folder and self.resuming and stage == "fit":
            self._deferred = True  # a resume in its run's folder: that run's config.yaml stays until it trains
            return
        self._write(trainer)

    def _write(self, trainer: Trainer) -> None:
        # Lightning calls save_config on the main process only: the logger's folder, not trainer.log_dir, which is
        # a collective every process must join (a DDP run would hang on it)
        folder = trainer.logger.log_dir if trainer.logger is not None else None
        if folder is None:
            return
        text = self.parser.dump(self.config, skip_none=False)
        write_atomically(os.path.join(folder, self.config_filename), text.encode())

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start_step = trainer.global_step

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        if self._deferred and trainer.global_step > (self._start_step or 0) and trainer.is_global_zero:
            self._deferred = False
            self._write(trainer)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # A run that failed before it trained a step (any failed validate, test or predict) leaves nothing worth
        # a version folder: its config.yaml would only describe a run that never was.
        if self._start_step is None or trainer.global_step == self._start_step:
            self.discard(trainer)

    def discard(self, trainer: Trainer) -> None:
        """Remove the version folder this run created (and lightning_logs/ if that leaves it empty)."""
        if not self.own_folder or trainer.logger is None or trainer.logger.log_dir is None:
            return
        if trainer.is_global_zero:
            folder = trainer.logger.log_dir
            shutil.rmtree(folder, ignore_errors=True)
            with contextlib.suppress(OSError):
                os.rmdir(os.path.dirname(folder))
        self.own_folder = False


class RunLogger(TensorBoardLogger):
    """Lightning's TensorBoardLogger, the default one, with its hparams.yaml written by the project's one writer:
    Lightning's own save opens the path as it finds it, and would write through a link planted there."""

    @rank_zero_only
    def save(self) -> None:
        FabricTensorBoardLogger.save(self)  # the event file flushed, as Lightning's save does first
        target = Path(self.log_dir) / self.NAME_HPARAMS_FILE
        if not Path(self.log_dir).is_dir() or (target.is_file() and not target.is_symlink()):  # written once
            return
        with tempfile.TemporaryDirectory() as scratch:  # Lightning's own YAML for the hyperparameters, then ours
            save_hparams_to_yaml(os.path.join(scratch, self.NAME_HPARAMS_FILE), self.hparams)
            write_atomically(target, Path(scratch, self.NAME_HPARAMS_FILE).read_bytes())


def claim_version(folder: Path) -> int:
    """The next free version_N in folder, created here: the first run to create it owns it. The logs' folder is a
    folder, never a link (one planted in a shared run folder would have the run's logs written where it points)."""
    if folder.is_symlink():
        raise OSError(errno.ELOOP, "a symbolic link, and a run's log folder is never followed", str(folder))
    folder.mkdir(parents=True, exist_ok=True)
    taken = [int(m[1]) for p in folder.iterdir() if (m := re.fullmatch(r"version_(\d+)", p.name))]
    version = max(taken, default=-1) + 1
    while True:
        try:
            (folder / f"version_{version}").mkdir()
            return version
        except FileExistsError:
            version += 1
