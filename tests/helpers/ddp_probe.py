"""Run the CLI and record, per process, which samples it trained on and which checkpoint files it wrote.

    python tests/helpers/ddp_probe.py OUT_DIR fit ARGS...

Lightning's DDP launcher re-runs this same command for every process, so each one is probed. Writes
OUT_DIR/indices-rank<R>.txt (one line per epoch pass: "epoch index index ..."), OUT_DIR/writes-rank<R>.txt and
OUT_DIR/threads-rank<R>.txt (the torch threads it trained with).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from mnist_lit.__main__ import main  # the command's entry point: its lines end as a user's do
from mnist_lit.checkpoints import io as checkpoint_io
from mnist_lit.datasets import batches


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def probe(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    indices = batches.EpochBatches.indices

    def recorded_indices(self: batches.EpochBatches) -> torch.Tensor:
        result = indices(self)
        (out / f"threads-rank{rank()}.txt").write_text(str(torch.get_num_threads()))
        if self.shuffle:
            with open(out / f"indices-rank{rank()}.txt", "a") as f:
                f.write(" ".join(map(str, [self.epoch, *result.tolist()])) + "\n")
        return result

    save = checkpoint_io.AtomicCheckpointIO.save_checkpoint

    def recorded_save(self, ckpt, path, storage_options=None):
        with open(out / f"writes-rank{rank()}.txt", "a") as f:
            f.write(f"{path}\n")
        return save(self, ckpt, path, storage_options)

    batches.EpochBatches.indices = recorded_indices
    checkpoint_io.AtomicCheckpointIO.save_checkpoint = recorded_save


if __name__ == "__main__":
    probe(Path(sys.argv[1]))
    main(sys.argv[2:])
