"""SLURM jobs: the signal that comes before a pre-emption or the time limit, and the requeue that follows.

`#SBATCH --signal=USR1@90` (or `scancel --signal=USR1 JOB`) warns every task of a job. A fit stops on it as on
SIGTERM: every process at the same batch, with a checkpoint. Then the first process asks SLURM to requeue the job
(`scontrol requeue`), and the requeued job runs its script again, whose `fit --ckpt_path auto` resumes from that
checkpoint. Lightning's own handler for the signal is off with the rest of its signal handling (mnist_lit.signals):
it saves from inside the handler and trains on until SLURM kills the job. Its knobs still choose, as
`--trainer.plugins` takes them: SLURMEnvironment's `requeue_signal` (SIGUSR1 by default) and `auto_requeue` (false:
no signal is taken for it). SIGTERM, which SLURM sends on a pre-emption, a `scontrol requeue` or a `scancel`,
stops the same way; whether the job comes back is then SLURM's (its PreemptMode, the job's --requeue).
"""

from __future__ import annotations

import os
import subprocess
from typing import Any

from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch import Trainer
from lightning.pytorch.plugins.environments import SLURMEnvironment

from mnist_lit import signals
from mnist_lit.errors import one_line

_requeue_on: int | None = None  # the signal that requeues this process's job, once a fit in a SLURM job has started


def take_requeue_signal(trainer: Trainer, plugins: Any) -> None:
    """In a SLURM batch job with auto-requeue on: its signal stops this fit as SIGTERM does, and requeues the job.
    plugins: --trainer.plugins, where a SLURMEnvironment of the user's says which signal, if any."""
    global _requeue_on
    given = [
        *(plugins if isinstance(plugins, list) else [plugins]),
        getattr(trainer.strategy, "cluster_environment", None),
    ]
    environment = next((p for p in given if isinstance(p, SLURMEnvironment)), None)
    if environment is None:
        if not SLURMEnvironment.detect():  # not in a job, or in an interactive one (job name bash or interactive)
            return
        environment = SLURMEnvironment()
    if environment.auto_requeue and environment.requeue_signal is not None and job() is not None:
        _requeue_on = int(environment.requeue_signal)
        signals.stop_also_on(_requeue_on)


def job() -> str | None:
    """This batch job's id as scontrol takes it (an array's task as JOB_TASK); None outside one."""
    if (number := SLURMEnvironment.job_id()) is None or number < 0:
        return None
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID", ""), os.environ.get("SLURM_ARRAY_TASK_ID", "")
    # digits only: whatever else the environment holds never reaches scontrol's command line as an option
    return f"{array}_{task}" if array.isdigit() and task.isdigit() else str(number)


def requeued(signum: int) -> str | None:
    """After a fit stopped on signum: what became of the job, for the stop's line; None if signum does not requeue
    it. Only the first process asks SLURM; the others say that it does."""
    if signum != _requeue_on or (name := job()) is None:
        return None
    if rank_zero_only.rank != 0:
        return f"the first process asks SLURM to requeue job {name}"
    try:
        done = subprocess.run(["scontrol", "requeue", name], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"SLURM job {name} was not requeued: scontrol failed ({one_line(str(err))})"
    if done.returncode != 0:
        return f"SLURM job {name} was not requeued: {one_line(done.stderr or done.stdout) or 'scontrol failed'}"
    return f"SLURM job {name} requeued: it runs its script again (with --ckpt_path auto, its fit resumes from here)"
