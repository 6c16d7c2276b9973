"""`python -m mnist_lit sweep`: a hyperparameter search with Optuna, each trial an ordinary fit in its own folder.

Its options and entry (command), the search space (space), the study and its storage (study), the workers that run
the trials (worker), the callback inside each trial's fit (trial) and the sweep's answer (report)."""

from mnist_lit.sweep.command import run_sweep
from mnist_lit.sweep.trial import Report

__all__ = ["Report", "run_sweep"]
