"""Where a checkpoint's time goes inside a real fit: each phase of a save timed as it runs (wall time and the
calling thread's CPU time, medians over the fit's saves), then the same phases alone, repeated on the last save's
checkpoint with nothing else running. Benchmark seams: the phases' functions are wrapped in this process.

    python tests/benchmarks/save_profile.py [--data_dir ../shared/mnist] [--epochs 1] [--repeats 300]

A phase that takes much longer inside the fit than alone with CPU time close to its wall time is slowed by the
machine's state after a training step (its caches), not by waiting for another thread.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

PHASES = ["hook", "monitor", "dump", "digest", "torch.save", "trainer.save", "write_atomically"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default="../shared/mnist")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=300)
    options = parser.parse_args()

    import torch
    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.trainer.connectors.checkpoint_connector import _CheckpointConnector

    import mnist_lit.checkpoints.io as checkpoint_io
    from mnist_lit.__main__ import main as command
    from mnist_lit.checkpoints import callback

    timed: dict[str, list[tuple[float, float]]] = {phase: [] for phase in PHASES}
    taken: list[dict[str, Any]] = []  # the last checkpoint saved
    original: dict[str, Callable] = {}

    def wrap(owner: Any, name: str, phase: str) -> None:
        function = original[phase] = getattr(owner, name)

        def timed_call(*args: Any, **kwargs: Any) -> Any:
            wall, cpu = time.perf_counter(), time.thread_time()
            try:
                return function(*args, **kwargs)
            finally:
                timed[phase].append((time.perf_counter() - wall, time.thread_time() - cpu))
                if phase == "digest":
                    taken[:] = [args[0]]

        setattr(owner, name, timed_call)

    wrap(callback.Checkpoint, "on_train_batch_end", "hook")
    wrap(ModelCheckpoint, "_monitor_candidates", "monitor")
    wrap(_CheckpointConnector, "dump_checkpoint", "dump")
    wrap(checkpoint_io, "digest", "digest")
    wrap(checkpoint_io.torch, "save", "torch.save")
    wrap(Trainer, "save_checkpoint", "trainer.save")
    wrap(checkpoint_io, "write_atomically", "write_atomically")

    data_dir = os.path.abspath(options.data_dir)
    with tempfile.TemporaryDirectory() as folder:
        os.chdir(folder)
        args = ["fit", "--data.data_dir", data_dir, "--data.val_size", "0", "--trainer.max_epochs", str(options.epochs),
                "--trainer.enable_progress_bar", "false"]  # fmt: skip
        try:
            command(args)
        except SystemExit as exit_:
            if exit_.code:
                raise
        hooks = sorted(timed["hook"], reverse=True)
        timed["hook"] = hooks[: len(timed["dump"])]  # the hook calls that saved: the longest, one a save
        alone = phases_alone(taken[0], options.repeats, original)
    print(f"{'phase':18s} {'saves':>5s}  in the fit: wall   cpu (ms)   alone: cpu (ms)   in the fit / alone")
    for phase in PHASES:
        walls, cpus = zip(*timed[phase], strict=True) if timed[phase] else ((0.0,), (0.0,))
        wall, cpu = 1000 * statistics.median(walls), 1000 * statistics.median(cpus)
        if phase in alone:
            print(f"{phase:18s} {len(timed[phase]):5d}  {wall:17.3f} {cpu:6.3f}   {alone[phase]:15.3f}   "
                  f"{cpu / alone[phase]:17.2f}")  # fmt: skip
        else:
            print(f"{phase:18s} {len(timed[phase]):5d}  {wall:17.3f} {cpu:6.3f}")
    print(f"threads {torch.get_num_threads()}; write_atomically's calls run on the writer thread (two files a save)")


def phases_alone(checkpoint: dict[str, Any], repeats: int, original: dict[str, Callable]) -> dict[str, float]:
    """The serialising phases on one checkpoint, repeated with nothing else running: CPU ms, medians."""
    save, digest, write = original["torch.save"], original["digest"], original["write_atomically"]
    buffer = io.BytesIO()
    save(checkpoint, buffer)

    def cpu_ms(run: Callable[[], Any]) -> float:
        times = []
        for _ in range(repeats):
            started = time.thread_time()
            run()
            times.append(time.thread_time() - started)
        return 1000 * statistics.median(times)

    return {
        "digest": cpu_ms(lambda: digest(checkpoint)),
        "torch.save": cpu_ms(lambda: save(checkpoint, io.BytesIO())),
        "write_atomically": cpu_ms(lambda: write("alone.ckpt", buffer)),
    }


if __name__ == "__main__":
    sys.exit(main())
