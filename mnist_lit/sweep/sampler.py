"""The sweep's sampler: Optuna's TPE, seeded anew for each trial from --sweep.seed and the trial's number.

One TPESampler seeded once proposes the same settings in the same order every time it starts: a sweep started again
after a crash re-proposed its first settings, and two machines on one study proposed the same ones. Seeded by the
trial's number (which the storage hands out once), a restarted or added worker continues the search instead, and a
given study still proposes the same setting for the same trial number given the same finished trials."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler, TPESampler
from optuna.trial import FrozenTrial, TrialState


class TrialSeededSampler(BaseSampler):
    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._tpe = self._for(0)

    def _for(self, number: int) -> TPESampler:
        return TPESampler(seed=(self.seed * 1_000_003 + number) % 2**32)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._tpe = self._for(trial.number)
        self._tpe.before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self._tpe.infer_relative_search_space(study, trial)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        return self._tpe.sample_relative(study, trial, search_space)

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        return self._tpe.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(
        self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None
    ) -> None:
        self._tpe.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._tpe.reseed_rng()
