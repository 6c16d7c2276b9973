"""SLURM jobs: the signal that warns of a job's end, and the requeue that follows.

`#SBATCH --signal=USR1@90` (SIGUSR1 to every task 90 s before the time limit) or `scancel --signal=USR1 JOB` warns
the job. A fit stops on it as on SIGTERM: every process at the same batch, with a checkpoint. Then the first process
asks SLURM to requeue the job (`scontrol requeue`), and the requeued job runs its script again, whose
`fit --ckpt_path auto` resumes from that checkpoint. Lightning's own handler for the signal is off with the rest of
its signal handling (mnist_lit.signals): it saves a checkpoint of its own from inside the handler, mid-step, which
mnist_lit's checks and exact resume do not cover. Its switches still choose, as `--trainer.plugins` takes them:
SLURMEnvironment's `requeue_signal` (SIGUSR1 by default) and `auto_requeue` (false: the signal is not taken).

SIGTERM, which SLURM sends at the time limit, on a pre-emption, a `scontrol requeue` or a `scancel`, stops a fit the
same way; whether the job comes back is then SLURM's (its PreemptMode, the job's --requeue). A sweep (mnist_lit.sweep)
takes the warning for its trials, which leave the job to it (signals.MANAGED_ENV).
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Any

from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch import Trainer
from lightning.pytorch.plugins.environments import ClusterEnvironment, SLURMEnvironment

from mnist_lit import signals
from mnist_lit.errors import CheckpointError, ConfigError, one_line

WARNING = signal.SIGUSR1  # the warning, unless Lightning's SLURMEnvironment names another (the sweep's, always)
RESUMING = ("auto", "last")  # the --ckpt_path values with which a requeued job's fit resumes this run
# signals that cannot be the warning: the ones that stop a run already, and those a handler cannot take or must not
NOT_A_WARNING = {signal.SIGINT, signal.SIGTERM, signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD}

_requeue_on: int | None = None  # the warning signal of this process's job, once a fit in a SLURM job has started
_ckpt_path: str | None = None  # that fit's --ckpt_path, as given


def take_requeue_signal(trainer: Trainer, plugins: Any, ckpt_path: str | None) -> None:
    """In a SLURM batch job with auto-requeue on: its warning signal stops this fit as SIGTERM does, and then
    requeues the job. plugins: --trainer.plugins, where a SLURMEnvironment of the user's says which signal, if any;
    ckpt_path: --ckpt_path as given (a requeue resumes the run only with 'auto' or 'last')."""
    global _requeue_on, _ckpt_path
    given = plugins if isinstance(plugins, list) else [plugins]
    given = [*given, getattr(trainer.strategy, "cluster_environment", None)]  # a single process holds none
    environment = next((p for p in given if isinstance(p, ClusterEnvironment)), None)
    if environment is None:
        if not SLURMEnvironment.detect():  # not in a job, or in an interactive one (job name bash or interactive)
            return
        environment = SLURMEnvironment()
    if not isinstance(environment, SLURMEnvironment):  # the user's choice of another: SLURM's signals are not ours
        return
    warning = environment.requeue_signal
    if not environment.auto_requeue or warning is None or job() is None:
        return
    if warning in NOT_A_WARNING:
        raise ConfigError(
            f"--trainer.plugins: SLURMEnvironment's requeue_signal {signal.Signals(warning).name} cannot warn of a"
            " job's end (SIGINT and SIGTERM stop a run already; SIGKILL, SIGSTOP and SIGCHLD cannot be taken as a"
            " warning): choose another, such as SIGUSR1 or SIGUSR2"
        )
    _requeue_on, _ckpt_path = int(warning), ckpt_path
    signals.stop_on_warning(_requeue_on)


def job() -> str | None:
    """This batch job's id as scontrol takes it (an array's task as JOB_TASK); None outside one, or in an
    interactive one (Lightning's rule: job name bash or interactive)."""
    if (number := SLURMEnvironment.job_id()) is None or number < 0:
        return None
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID", ""), os.environ.get("SLURM_ARRAY_TASK_ID", "")
    # digits only: whatever else the environment holds never reaches scontrol's command line as an option
    return f"{array}_{task}" if array.isdigit() and task.isdigit() else str(number)


def requeued(signum: int) -> str | None:
    """After a fit stopped on signum: what became of the job, for the stop's line; None if signum is not the job's
    warning, or if another process manages this one's job (a sweep's trial). Only the first process asks SLURM."""
    if signum != _requeue_on or (name := job()) is None or os.environ.get(signals.MANAGED_ENV):
        return None
    if _ckpt_path not in RESUMING:
        given = f"--ckpt_path {_ckpt_path}" if _ckpt_path else "no --ckpt_path"
        return f"SLURM job {name} not requeued: this fit has {given}, so a requeued job would not resume it"
    if rank_zero_only.rank != 0:
        return f"the first process asks SLURM to requeue job {name}"
    return requeue(name, f"its fit's --ckpt_path {_ckpt_path} resumes from the newest checkpoint")


def requeue(name: str, then: str) -> str:
    """Ask SLURM to requeue job name; what came of it, in words (then: what the requeued job does)."""
    try:
        done = subprocess.run(["scontrol", "requeue", name], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"SLURM job {name} was not requeued: scontrol failed ({one_line(str(err))})"
    if done.returncode != 0:
        return f"SLURM job {name} was not requeued: {one_line(done.stderr or done.stdout) or 'scontrol failed'}"
    return f"SLURM job {name} requeued: it runs its script again, and {then}"


def refuse_lightnings_checkpoint(root: str | None) -> None:
    """A new fit in a SLURM job: Lightning would resume, in place of starting it, from any file named like its own
    SLURM handler's checkpoints (hpc_ckpt_N.ckpt) in the run's root, unchecked. Refused, naming the file."""
    if not SLURMEnvironment.detect():
        return
    folder = Path(root or os.getcwd())
    if found := sorted(p.name for p in folder.glob("*hpc_ckpt_*")):  # Lightning's rule: any name holding hpc_ckpt_
        raise CheckpointError(
            f"{folder / found[-1]} is named like Lightning's own SLURM checkpoints, which Lightning would resume in a"
            " SLURM job in place of this new run, without mnist_lit's checks: move it out of the run's folder"
        )
