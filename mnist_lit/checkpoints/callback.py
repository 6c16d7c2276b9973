"""The training-time side of checkpoints: when to save, exact resume (RNG, position in the epoch), and stopping on a
signal or a limit with a checkpoint of the step reached."""

from __future__ import annotations

import signal
import sys
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, Timer

from mnist_lit import signals
from mnist_lit.checkpoints.files import checkpoint_dir
from mnist_lit.checkpoints.io import AtomicCheckpointIO
from mnist_lit.checkpoints.resume import own_files
from mnist_lit.errors import Diverged
from mnist_lit.signals import Interrupted

LOG_VERSION = "log_version"  # the run's lightning_logs/version_N, at the checkpoint's top level
THREADS = "threads"  # the torch threads the run trained with


class Checkpoint(ModelCheckpoint):
    """ModelCheckpoint whose files are never half-written, never silently damaged, and resume a run exactly.

    - Every file is written through AtomicCheckpointIO (mnist_lit.checkpoints.io): sealed with a digest, written to a
      temporary name, fsynced and renamed; an older file is removed only after its successor is on disk.
    - last.ckpt is a second copy of the newest periodic file (its own inode): one damaged file never takes the
      run's only checkpoint with it.
    - The checkpoint carries the torch RNG state (dropout's randomness) and, through the train loader, the
      position in the epoch, so a resumed run continues bit for bit on the same hardware.
    - Whatever ends training early (Ctrl-C or SIGTERM, max_steps, max_time, early stopping) saves last.ckpt at
      that batch, mid-epoch position included, so a resume goes on from exactly there.
    - Nothing is saved between an epoch's last batch and the end of its validation and scheduler step: a save or
      a stop due there is made as the next epoch starts (or training ends), so no resume skips or repeats them.
    - The final weights are saved when training ends (last.ckpt, or a periodic file with save_last off), so
      `test --ckpt_path last` sees them.
    """

    # The command that resumes this run, as the stop line names it: the command line sets the one its user typed.
    resume_command = "python -m mnist_lit fit --ckpt_path last"

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
        self._last_write: tuple[int, str] | None = None
        self._save_due = False  # a periodic save that fell on an epoch's last batch, made at the next epoch's start
        self._step_seen = 0  # global_step at the last batch's end: a batch that leaves it is mid-accumulation
        self._stop_asked = False

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._seed = torch.initial_seed()  # the run's seed (--seed_everything), before any state is restored
        if self.dirpath is None:
            self.dirpath = str(checkpoint_dir(trainer.default_root_dir, None).resolve())
        # Every checkpoint the trainer writes, this callback's or anyone's, goes through the atomic writer.
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        super().setup(trainer, pl_module, stage)

    # --- saving ----------------------------------------------------------------------------------------------

    # private-lightning[ModelCheckpoint._save_checkpoint,ModelCheckpoint.state]: the one place every file is
    # written; ModelCheckpoint's own record of what it saved, kept true for the copy it does not make itself
    def _save_checkpoint(self, trainer: Trainer, filepath: str) -> None:
        previous = self._last_write
        if previous is None or previous[0] != trainer.global_step:
            self._check_finite(trainer)
            self._last_write = (trainer.global_step, filepath)
            super()._save_checkpoint(trainer, filepath)  # through AtomicCheckpointIO
            return
        self._last_write = (trainer.global_step, filepath)
        # last.ckpt right after the periodic file of the same step holds the same bytes: write the serialised
        # snapshot a second time rather than collect and serialise it again.
        if trainer.is_global_zero:
            checkpoint_io = trainer.strategy.checkpoint_io
            if isinstance(checkpoint_io, AtomicCheckpointIO):
                checkpoint_io.copy(previous[1], filepath)
            else:
                trainer.strategy.save_checkpoint(torch.load(previous[1], weights_only=True), filepath)
        trainer.strategy.barrier("Checkpoint.copy")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath

    @staticmethod
    def _check_finite(trainer: Trainer) -> None:
        # A diverged model (nan or inf weights) must not replace the last good checkpoint. Checked per save (not
        # again for last.ckpt's copy of the same step), not per step, and by one sum per tensor (20 us, a third of
        # an isfinite per tensor): a nan or inf makes the sum non-finite; so can huge finite weights, which the
        # exact check then tells apart.
        parameters = [p.detach() for p in trainer.lightning_module.parameters()]
        if not bool(torch.stack([p.sum() for p in parameters]).sum().isfinite()) and not all(
            bool(p.isfinite().all()) for p in parameters
        ):
            raise Diverged(
                f"training diverged: the weights are not finite numbers at step {trainer.global_step} (is the"
                " learning rate too high?); stopped without saving them: checkpoints written before keep the last"
                " finite weights"
            )

    # private-lightning[ModelCheckpoint._save_topk_checkpoint,ModelCheckpoint._save_last_checkpoint]: its two
    # saves, at moments of our choosing (an epoch's start, a stop); [ModelCheckpoint._monitor_candidates] what
    # they take; [ModelCheckpoint._should_skip_saving_checkpoint] its rule for when not to save (below)
    def _save_periodic(self, trainer: Trainer) -> None:
        """The periodic file and last.ckpt, as ModelCheckpoint saves every_n_train_steps."""
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)

    def _save_now(self, trainer: Trainer) -> None:
        """A checkpoint of this very step, unless there is one: last.ckpt, else a periodic file."""
        if self._last_global_step_saved == trainer.global_step:
            return
        if self.save_last:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        elif self.save_top_k != 0:
            self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))

    def newest_saved(self) -> str | None:
        return self._last_checkpoint_saved or (self.save_last and self.last_model_path) or None

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._disarm()
        signum = self._signal(trainer, pl_module)  # one that came during the last epoch's end
        if not self._should_skip_saving_checkpoint(trainer):  # the final weights
            if self._save_due:
                self._save_periodic(trainer)
            else:
                self._save_now(trainer)  # last.ckpt, or a periodic file when save_last is off
        self._save_due = False
        timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
        remaining = timer.time_remaining() if timer is not None else None
        if remaining is not None and remaining <= 0 and trainer.is_global_zero:
            saved = self.newest_saved()
            where = f"; saved {saved}: resume with `{self.resume_command}`" if saved else ""
            print(f"stopped by --trainer.max_time at step {trainer.global_step}{where}", file=sys.stderr)
        if signum:  # training had ended all the same: nothing is left to resume
            saved = f"; the final weights are in {saved}" if (saved := self.newest_saved()) else ""
            name = signal.Signals(signum).name
            raise Interrupted(f"{name}: came as training ended at step {trainer.global_step}{saved}", signum)

    # --- exact resume: the RNG state rides in the checkpoint ------------------------------------------------

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        # At the checkpoint's top level, not in this callback's state: that is keyed by the callback's settings
        # and silently dropped when a run resumes with, say, another every_n_train_steps.
        rng: dict[str, Any] = {"cpu": torch.get_rng_state(), "seed": self._seed}
        if pl_module.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(pl_module.device)
        checkpoint["rng_state"] = rng
        if isinstance(version := getattr(trainer.logger, "version", None), int):  # where a resume goes on logging
            checkpoint[LOG_VERSION] = version
        checkpoint[THREADS] = torch.get_num_threads()  # what a resume runs, to end bit for bit
        for counts in checkpoint["loops"]["fit_loop"]["epoch_progress"].values():
            if counts["ready"] == counts["started"] + 1:
                # Saved in on_train_epoch_start: Lightning has counted the new epoch as ready, not yet started, and
                # 2.6 resumes that wrongly (it skips the epoch or miscounts it). Saved as the state between two
                # epochs, the one a finished run's last.ckpt has: Lightning resumes it with the next epoch.
                counts["ready"] -= 1

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self._rng_to_restore = checkpoint.get("rng_state")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if (kept := own_files(state_dict, self.dirpath)) is not None:
            super().load_state_dict(kept)

    # private-lightning[loops]: two Lightning 2.6 resume workarounds inside its loops (see each comment)
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        loop = trainer.fit_loop
        epoch_loop = loop.epoch_loop
        if (
            loop.restarted_mid_epoch
            and epoch_loop.restarted_on_train_batch_end
            and epoch_loop.batch_progress.is_last_batch
        ):
            # A checkpoint taken after an epoch's last batch, as older mnist_lit ones were. Lightning 2.6 closes
            # that epoch on resume but then runs the next as if already started (never counted as started, no
            # on_train_epoch_start, and its checkpoints resume wrongly), and keeps counting the finished epoch's
            # batches when an epoch has another number of them now (another number of processes). Start the next
            # epoch afresh.
            loop.reset_restart_stage()
            epoch_loop.reset_restart_stage()
            self._new_epoch(epoch_loop)
        epochs = loop.epoch_progress.current
        if epoch_loop.restarting and epochs.ready == epochs.started == epochs.processed:
            # A checkpoint between two epochs (at an epoch's start, or a finished run's). With max_steps set,
            # Lightning 2.6 resumes it as restarting all the same and counts the finished epoch's batches as the
            # next one's: it would skip that epoch whole. The next epoch's batches start from zero.
            self._new_epoch(epoch_loop)
        # A resumed run starts from a checkpoint of this very step: nothing new to save until the next step.
        self._last_global_step_saved = self._step_seen = trainer.global_step
        # Restored here, not on load: the sanity check and loader setup in between must not shift it.
        if self._rng_to_restore:
            torch.set_rng_state(self._rng_to_restore["cpu"])
            if "cuda" in self._rng_to_restore and pl_module.device.type == "cuda":
                torch.cuda.set_rng_state(self._rng_to_restore["cuda"], pl_module.device)
            self._rng_to_restore = None
        self._arm()

    @staticmethod
    def _new_epoch(epoch_loop: Any) -> None:
        # Lightning's own loop counters, reset as it does when an epoch starts (tests/checkpoints/test_resume.py
        # resumes each kind of checkpoint that needs this and fails if a Lightning upgrade changes them).
        epoch_loop.batch_progress.reset_on_run()
        epoch_loop.scheduler_progress.reset_on_run()
        epoch_loop.automatic_optimization.optim_progress.reset_on_run()
        epoch_loop.val_loop.batch_progress.total.reset()

    # --- stopping early: a signal or a limit, with a checkpoint of the step reached ----------------------------

    # Ctrl-C and SIGTERM while the training loop runs: mnist_lit.signals hands them to catch()

    def _arm(self) -> None:
        self._stop_signal = None
        signals.arm(self)

    def _disarm(self) -> None:
        signals.disarm(self)

    def catch(self, signum: int) -> bool:
        """Take a signal during training: True for the first (stop at the next batch), False for a second."""
        if self._stop_signal is not None:
            return False
        self._stop_signal = signum
        return True

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._disarm()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._disarm()

    def _signal(self, trainer: Trainer, pl_module: LightningModule) -> int:
        """The signal this run stops on, 0 if none: under DDP every process names the one any of them got."""
        signum = self._stop_signal or 0
        if trainer.world_size > 1:
            signum = int(trainer.strategy.reduce(torch.tensor(signum, device=pl_module.device), reduce_op="max"))
        return signum

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        signum = self._signal(trainer, pl_module)
        stepped, self._step_seen = trainer.global_step != self._step_seen, trainer.global_step
        if batch_idx + 1 == trainer.num_training_batches:
            # An epoch's last batch: its validation, the callbacks' epoch-end state and the epoch's scheduler step
            # (ReduceLROnPlateau's included) come after it. A checkpoint taken here would miss them, and a resume
            # from it would skip them; a save or a stop due here waits for the next epoch's start (or train end).
            every = self._every_n_train_steps
            self._save_due = self._save_due or (every >= 1 and trainer.global_step % every == 0)
            trainer.should_stop, self._stop_asked = trainer.should_stop or self._stop_asked, False
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not stepped:
            # Mid gradient accumulation: the gradients summed so far go into no checkpoint, so a stop here would
            # lose them on resume. A signal waits for the batch that steps; so does a stop another callback asked
            # for (max_time's Timer), asked again there.
            self._stop_asked = self._stop_asked or trainer.should_stop
            trainer.should_stop = False
            return
        trainer.should_stop, self._stop_asked = trainer.should_stop or self._stop_asked, False
        # Callbacks that end training (max_time's Timer, EarlyStopping) run before this one (Lightning puts
        # checkpoint callbacks last): a stop they asked for is already set.
        if signum or trainer.should_stop or 0 <= trainer.max_steps <= trainer.global_step:
            self._save_now(trainer)  # now, while the loop's state still says where in the epoch it is
        if signum:
            self._stop(trainer, signum)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        signum = self._signal(trainer, pl_module)  # also one that came during the last epoch's validation
        if self._save_due and not self._should_skip_saving_checkpoint(trainer):
            self._save_periodic(trainer)
        self._save_due = False
        if signum:
            self._save_now(trainer)
            self._stop(trainer, signum)

    # private-lightning[loops]: Lightning 2.6's skipped ReduceLROnPlateau step after a resume (see the comment)
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        loop = trainer.fit_loop
        plateaus = [c.monitor for c in trainer.lr_scheduler_configs if c.reduce_on_plateau]
        if plateaus and loop.restarting and loop.epoch_loop.batch_progress.is_last_batch:
            # Lightning 2.6 skips ReduceLROnPlateau's step at the end of the first epoch after a resume, taking the
            # validation metrics for lost. Checkpoints here are never taken after an epoch's validation, so this
            # epoch validated anew: step as an uninterrupted run does (the non-plateau ones already stepped).
            if all(monitor in trainer.callback_metrics for monitor in plateaus):
                loop.epoch_loop.update_lr_schedulers("epoch", update_plateau_schedulers=True)

    def _stop(self, trainer: Trainer, signum: int) -> None:
        step, saved = trainer.global_step, self.newest_saved()
        if saved and self._last_global_step_saved == step:
            done = f"stopped at step {step} and saved {saved}; resume with `{self.resume_command}`"
        elif saved:
            done = f"stopped at step {step}; the newest checkpoint is {saved}; resume with `{self.resume_command}`"
        elif self.save_last or self.save_top_k != 0:
            done = f"stopped at step {step}, before any training step; nothing new was saved"
        else:
            done = f"stopped at step {step}; no checkpoint was saved (--checkpoint.save_last and save_top_k are off)"
        raise Interrupted(f"{signal.Signals(signum).name}: {done}", signum)
