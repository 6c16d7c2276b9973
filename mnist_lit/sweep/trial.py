"""Inside one trial's `fit` process: report each validation to the sweep's study, stop when the pruner says so.

Our own callback rather than optuna-integration's PyTorchLightningPruningCallback (optuna-integration 5.0): that one
needs a live `optuna.trial.Trial`, which cannot come through a config file to a `fit` subprocess, and it prunes by
raising TrialPruned inside the Trainer (a traceback, a non-zero exit, and no checkpoint at the epoch's end); its DDP
path reads Lightning's private `trainer._accelerator_connector`. This one uses public hooks only and stops a pruned
trial as early stopping does (`trainer.should_stop`), so the fit ends normally at that epoch's end and saves.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from mnist_lit.checkpoints import write_atomically

TRIAL_ENV = "MNIST_LIT_SWEEP_TRIAL"  # what the sweep tells its fit process: study, trial, metric, pruner
STORAGE_ENV = "MNIST_LIT_SWEEP_STORAGE"  # the storage URL: in the environment, never on a command line
RESULT = "result.json"  # in the trial's folder: the last validation's value, the steps, whether it was pruned


def engine_kwargs(url: str) -> dict[str, Any]:
    """SQLite: wait for a lock held by another worker instead of failing at once; elsewhere: drop dead connections."""
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": 120}}
    return {"pool_pre_ping": True}


def make_pruner(name: str, startup_trials: int, warmup_epochs: int) -> Any:
    import optuna

    if name == "none":
        return optuna.pruners.NopPruner()
    # One report per epoch (step = epoch), so a trial is compared with the others at the same epoch.
    return optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=warmup_epochs)


def read_result(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / RESULT).read_text())
    except (OSError, ValueError):
        return {}


def write_result(folder: Path, result: dict[str, Any]) -> None:
    write_atomically(str(folder / RESULT), json.dumps(result).encode())


class Report(Callback):
    """Report the sweep's metric after every validation (one value per epoch) to the trial in the study, record
    it in the trial's result.json, and stop at this epoch's end when the pruner gives the trial up.

    Takes no arguments: the sweep passes the trial in the environment (MNIST_LIT_SWEEP_TRIAL,
    MNIST_LIT_SWEEP_STORAGE), so a resumed trial finds its study with the same command line.
    """

    def __init__(self) -> None:
        spec = json.loads(os.environ.get(TRIAL_ENV, "{}"))
        self.spec = spec
        self.folder = Path(spec.get("folder", "."))
        self._trial: Any = None
        self._broken = False

    def _connect(self) -> Any:
        if self._trial is None:
            import optuna

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            url = os.environ[STORAGE_ENV]
            storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs(url))
            pruner = make_pruner(self.spec["pruner"], self.spec["startup_trials"], self.spec["warmup_epochs"])
            study = optuna.load_study(study_name=self.spec["study"], storage=storage, pruner=pruner)
            self._trial = optuna.trial.Trial(study, self.spec["trial_id"])
        return self._trial

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or not self.spec:
            return
        value = trainer.callback_metrics.get(self.spec["metric"])
        if value is None:
            return
        value, epoch = float(value), trainer.current_epoch
        result = {**read_result(self.folder), "value": value, "epoch": epoch, "step": trainer.global_step}
        pruned = False
        # At the run's last validation there is nothing left to save: the trial has finished, not been pruned
        last = 0 < (trainer.max_epochs or 0) <= epoch + 1 or 0 < trainer.max_steps <= trainer.global_step
        if not self._broken and not last:
            try:
                trial = self._connect()
                with warnings.catch_warnings():  # a resumed trial reports its epochs again: optuna keeps the first
                    warnings.simplefilter("ignore")
                    trial.report(value, epoch)
                pruned = trial.should_prune()
            except Exception as err:  # the database is out of reach: train on, unpruned, rather than lose the trial
                self._broken = True
                print(f"warning: cannot report to the sweep's study, so no pruning ({err})", file=sys.stderr)
        if pruned:
            result["pruned"] = epoch
            trainer.should_stop = True
            print(
                f"pruned: {self.spec['metric']} {value:.4f} at epoch {epoch} is worse than the median of the other"
                " trials at that epoch; stopping at this epoch's end",
                file=sys.stderr,
            )
        write_result(self.folder, result)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero and self.spec:
            write_result(self.folder, {**read_result(self.folder), "steps": trainer.global_step})
