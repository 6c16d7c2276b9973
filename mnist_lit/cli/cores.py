"""The torch threads a process runs: a share of the cores, fewer on a machine whose cores are already busy.

Measured here (2 cores, `fit` of 1,000 steps on MNIST, images a second while training): alone, 16,400 with two
threads and 9,000 with one; two fits side by side, 2,600 each with two threads and 9,000 each with one; a fit beside
a process that keeps one core busy, 3,500 with two threads and 10,000 with one. A thread per core on cores already
busy collapses, one thread fewer per busy core does not. The thread count changes the float rounding, so it is
said in one line, and a resume keeps its run's count, which the checkpoint records, to end bit for bit.
"""

from __future__ import annotations

import os
import sys
import time

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

BUSY = 0.6  # cores other processes must keep busy before a process takes fewer threads
SAMPLE = 0.25  # seconds over which the machine's use is sampled


def cores() -> list[int]:
    """The cores this process may run on."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def busy_elsewhere(allowed: list[int], seconds: float = SAMPLE) -> float:
    """How many of these cores other processes keep busy now: their use over a short sample, less this process's."""
    start = use(allowed)
    time.sleep(seconds)
    return elsewhere(start, use(allowed))


def use(allowed: list[int]) -> tuple[float, float, float] | None:
    """(now, seconds the cores have been busy, seconds this process has run), from /proc/stat; None where the
    machine does not say."""
    try:
        busy = _busy_jiffies(allowed) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
    own = os.times()
    return time.monotonic(), busy, own.user + own.system


def elsewhere(start: tuple[float, float, float] | None, end: tuple[float, float, float] | None) -> float:
    """The cores other processes kept busy between two readings of use()."""
    if start is None or end is None or end[0] <= start[0]:
        return 0.0
    return max(0.0, ((end[1] - start[1]) - (end[2] - start[2])) / (end[0] - start[0]))


def _busy_jiffies(allowed: list[int]) -> int:
    total = 0
    with open("/proc/stat") as stat:
        for line in stat:
            name, *fields = line.split()
            if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in allowed:
                numbers = [int(f) for f in fields]
                total += sum(numbers[:8]) - numbers[3] - numbers[4]  # all but idle and iowait (guest is in user)
    return total


def share_cores(processes: int, workers: int, recorded: object = None, main: bool = True, alone: bool = True) -> bool:
    """Give each training process on this machine an equal share of the cores: threads x processes <= cores, a core
    for each data loader worker; one thread fewer for each core another process keeps busy, for a run of one
    process only (alone: the processes of a DDP run, on this machine or others, would count each other and could
    each choose differently). recorded: the thread count a resumed run's checkpoint holds, kept so that the resume
    ends bit for bit. OMP_NUM_THREADS, when set, wins. main: whether this process says what it chose. Returns
    whether the count is fixed (OMP_NUM_THREADS, or a resume's): BusyWatch then leaves it."""
    if os.environ.get("OMP_NUM_THREADS"):
        return True
    allowed = cores()
    share = max(1, len(allowed) // processes - workers)
    if isinstance(recorded, int) and not isinstance(recorded, bool) and 1 <= recorded <= len(allowed):
        busy = busy_elsewhere(allowed) if alone and recorded > 1 else 0.0
        torch.set_num_threads(recorded)
        if busy >= BUSY and main:
            print(
                f"note: other processes keep {busy:.1f} of this machine's {len(allowed)} cores busy; this resume"
                f" keeps its run's {recorded} threads so that it ends bit for bit as the whole run would, and may"
                " run several times slower (OMP_NUM_THREADS=1: faster here, other float rounding)",
                file=sys.stderr,
            )
        return True
    busy = busy_elsewhere(allowed) if alone and share > 1 else 0.0
    threads = max(1, share - round(busy)) if busy >= BUSY else share
    torch.set_num_threads(threads)
    if threads < share and main:
        print(
            f"note: other processes keep {busy:.1f} of this machine's {len(allowed)} cores busy, so this runs"
            f" {threads} torch thread{'s' if threads > 1 else ''}, not {share} (a thread per busy core slows both many"
            f" times over); its numbers are those of OMP_NUM_THREADS={threads}, which sets the count yourself",
            file=sys.stderr,
        )
    return False


class BusyWatch(Callback):
    """A fit of one process, watched while it trains: every few seconds, the cores other processes keep busy; one
    thread fewer for each, said in one line (a run that another starts beside, or that starts beside a run the start
    did not catch). Never more threads than it started with, and not for a resume that keeps its run's count."""

    def __init__(self, every: float = 5.0) -> None:
        self.every = every
        self.fixed = False  # the thread count is OMP_NUM_THREADS's or a resumed run's (set by the command line)
        self.active = False
        self._start: tuple[float, float, float] | None = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.active = trainer.world_size == 1 and not self.fixed
        self._start = use(cores())

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: object) -> None:
        if not self.active or self._start is None or time.monotonic() - self._start[0] < self.every:
            return
        now = use(cores())
        busy, self._start = elsewhere(self._start, now), now
        threads = torch.get_num_threads()
        if busy >= BUSY and threads > 1:
            fewer = max(1, threads - round(busy))
            torch.set_num_threads(fewer)
            pl_module.print(
                f"note: other processes now keep {busy:.1f} of this machine's {len(cores())} cores busy, so this fit"
                f" goes on with {fewer} torch thread{'s' if fewer > 1 else ''}, not {threads} (a thread per busy"
                " core slows both many times over); OMP_NUM_THREADS sets the count yourself",
                file=sys.stderr,
            )
