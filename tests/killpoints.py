"""Run the CLI with a SIGKILL planted at one moment: the fault-injection test's way to crash reproducibly.

    python tests/killpoints.py MOMENT N fit ARGS...

MOMENT is where the process kills itself, N counts from 1:
  step    inside the training step that makes global step N (after the forward pass, before the update)
  write   while the N-th checkpoint file of this process is being written: half its bytes are on disk
  rename  after the N-th checkpoint file is complete and fsynced, before it replaces the previous one
  link    before the N-th hard-linked last.ckpt replaces the previous one
Nothing here is imported by mnist_lit: the hooks wrap the real functions the package calls.
"""

from __future__ import annotations

import os
import signal
import sys

from mnist_lit import checkpoint
from mnist_lit.cli import main
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

        checkpoint.os.fsync = torn_fsync
    elif moment in ("rename", "link"):
        replace = os.replace

        def replace_or_die(src, dst):
            linked = os.stat(src).st_nlink > 1
            if linked == (moment == "link") and nth():
                die()
            return replace(src, dst)

        checkpoint.os.replace = replace_or_die
    else:
        sys.exit(f"unknown moment {moment}")


if __name__ == "__main__":
    plant(sys.argv[1], int(sys.argv[2]))
    main(sys.argv[3:])
