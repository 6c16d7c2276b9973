"""Run the CLI with a SIGKILL planted at one moment: the fault-injection test's way to crash reproducibly.

    python tests/helpers/killpoints.py MOMENT N fit ARGS...

MOMENT is where the process kills itself, N counts from 1:
  step    inside the training step that makes global step N (after the forward pass, before the update), once
          the checkpoints saved before it are on disk (the writer thread may lag a save or two behind; the soak
          test kills at unplanned moments, these at exact ones)
  write   while the N-th checkpoint file of this process is being written: half its bytes are on disk
  rename  after the N-th checkpoint file is complete and fsynced, before it replaces the previous one
  link    before the N-th complete copy of last.ckpt replaces the previous one
  val     inside the first step of the N-th validation after a training epoch (the sanity check not counted)
Or, instead of a SIGKILL of itself:
  slow          every training step takes N milliseconds longer (a slow model, for time limits)
  sanity-term   the process of rank N sends itself SIGTERM in its first sanity-check step
  rank1-kill    the process of rank 1 is SIGKILLed inside training step N
  rank1-int     the process of rank 1 gets SIGINT (Ctrl-C) inside training step N
  rank1-once    as rank1-kill, in the first run in the working directory only (it leaves .killpoint-done there):
                a run that torchrun restarts goes on
  val-int       the process gets SIGINT (Ctrl-C) inside the first step of the N-th validation after an epoch
  batch-int     the process gets SIGINT (Ctrl-C) inside its N-th training batch (under gradient accumulation
                not every batch is a step)
Nothing here is imported by mnist_lit: the hooks wrap the real functions the package calls.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from mnist_lit.__main__ import main  # the command's entry point: its lines end as a user's do
from mnist_lit.checkpoints import writer
from mnist_lit.model import LitMNIST


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def plant(moment: str, n: int) -> None:
    count = {"calls": 0}

    def nth() -> bool:
        count["calls"] += 1
        return count["calls"] == n

    if moment == "step":
        training_step = LitMNIST.training_step

        def step(self, batch, batch_idx):
            loss = training_step(self, batch, batch_idx)
            if self.global_step + 1 == n:
                self.trainer.strategy.checkpoint_io.flush()
                die()
            return loss

        LitMNIST.training_step = step
    elif moment == "write":
        fsync = os.fsync

        def torn_fsync(fd: int) -> None:
            path = os.readlink(f"/proc/self/fd/{fd}")
            if path.endswith(".ckpt.part") and nth():
                os.truncate(path, os.path.getsize(path) // 2)  # what a power cut mid-write leaves
                die()
            fsync(fd)

        writer.os.fsync = torn_fsync
    elif moment in ("rename", "link"):
        replace = os.replace

        def replace_or_die(src, dst, **folders):  # the writer renames relative to the folder it opened
            copy = os.path.basename(dst) == "last.ckpt"
            if copy == (moment == "link") and nth():
                die()
            return replace(src, dst, **folders)

        writer.os.replace = replace_or_die
    elif moment == "batch-int":
        training_step = LitMNIST.training_step

        def interrupted_step(self, batch, batch_idx):
            if nth():
                os.kill(os.getpid(), signal.SIGINT)
            return training_step(self, batch, batch_idx)

        LitMNIST.training_step = interrupted_step
    elif moment in ("val", "val-int"):
        validation_step = LitMNIST.validation_step

        def val_step(self, batch, batch_idx):
            if not self.trainer.sanity_checking and batch_idx == 0 and nth():
                os.kill(os.getpid(), signal.SIGKILL if moment == "val" else signal.SIGINT)
            return validation_step(self, batch, batch_idx)

        LitMNIST.validation_step = val_step
    elif moment == "slow":
        training_step = LitMNIST.training_step

        def slow_step(self, batch, batch_idx):
            time.sleep(n / 1000)
            return training_step(self, batch, batch_idx)

        LitMNIST.training_step = slow_step
    elif moment == "sanity-term":
        validation_step = LitMNIST.validation_step

        def signalled_step(self, batch, batch_idx):
            if self.trainer.sanity_checking and batch_idx == 0 and self.global_rank == n:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1)  # the handler runs at once; this is never reached if it stops the process
            return validation_step(self, batch, batch_idx)

        LitMNIST.validation_step = signalled_step
    elif moment in ("rank1-kill", "rank1-int", "rank1-once"):
        training_step = LitMNIST.training_step
        sig = signal.SIGINT if moment == "rank1-int" else signal.SIGKILL

        def rank1_step(self, batch, batch_idx):
            if self.global_rank == 1 and self.global_step + 1 == n:
                if moment == "rank1-once":
                    if os.path.exists(".killpoint-done"):
                        return training_step(self, batch, batch_idx)
                    open(".killpoint-done", "w").close()
                os.kill(os.getpid(), sig)
            return training_step(self, batch, batch_idx)

        LitMNIST.training_step = rank1_step
    elif moment == "curves-term":  # after the final save, while the figures are drawn
        from mnist_lit.report import TrainingCurves

        def signalled_curves(self, trainer, pl_module):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs at once; this is never reached if it stops the process

        TrainingCurves.on_fit_end = signalled_curves
    else:
        sys.exit(f"unknown moment {moment}")


if __name__ == "__main__":
    plant(sys.argv[1], int(sys.argv[2]))
    main(sys.argv[3:])
