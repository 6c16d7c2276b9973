"""Checkpoints: a lower layer that knows no model and no data.

The callback that decides when to save and stops on a signal or a limit (callback); whether a file's training state
fits this run (resume); reading and verifying a file from elsewhere, and finding a run's `last` (files); the one
atomic writer every file of the project goes through (writer); Lightning's checkpoint I/O on a writer thread (io);
the digest sealed into every checkpoint (digest); one fit per folder (runlock)."""

from mnist_lit.checkpoints.callback import LOG_VERSION, THREADS, Checkpoint
from mnist_lit.checkpoints.files import (
    AUTO,
    DIGEST_KEY,
    EXTENSION,
    LAST,
    checkpoint_dir,
    hand_over,
    load_checkpoint,
    load_ckpt_path,
    load_weights,
    newest_checkpoint,
    read_bytes,
    refuse_linked_folder,
    resolve,
)
from mnist_lit.checkpoints.io import AtomicCheckpointIO
from mnist_lit.checkpoints.resume import (
    ResumeCheck,
    check_resumable,
    check_training_state,
    check_weights,
    keep_own_files,
    run_seed,
    tunable,
)
from mnist_lit.checkpoints.runlock import RunLock
from mnist_lit.checkpoints.writer import PART, open_log, refuse_link, write_atomically

__all__ = [
    "AUTO", "DIGEST_KEY", "EXTENSION", "LAST", "LOG_VERSION", "PART", "THREADS", "AtomicCheckpointIO", "Checkpoint",
    "ResumeCheck", "RunLock",
    "check_resumable", "check_training_state", "check_weights", "checkpoint_dir", "hand_over", "keep_own_files",
    "load_checkpoint", "load_ckpt_path", "load_weights", "newest_checkpoint", "open_log", "read_bytes", "refuse_link",
    "refuse_linked_folder", "resolve", "run_seed", "tunable", "write_atomically",
]  # fmt: skip
