"""A sweep's study: its storage (SQLite in the root, or a shared PostgreSQL), and what makes two sweeps the same."""

from __future__ import annotations

import contextlib
import json
import os
import random
import sqlite3
import time
import warnings
from pathlib import Path
from typing import Any

from mnist_lit.errors import CheckpointError, ConfigError, first_line, printable
from mnist_lit.sweep.trial import STORAGE_ENV, engine_kwargs, make_pruner

FINGERPRINT = "sweep.json"  # in the root: the space and base config this root's sweep was started with


def retry(study: Any, trial: Any) -> None:
    """Enqueue a stopped trial again with its parameters, user attributes (its folder) and reported values, once:
    a trial that is already in a later trial's retry history (another worker found it stopped too) is left."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    if trial.number in retried(study.get_trials(deepcopy=False)):
        return
    RetryHeartbeatStaleTrialCallback(inherit_intermediate_values=True)(study, trial)


def retried(trials: list[Any]) -> set[int]:
    """The numbers of the trials already enqueued again: those in a later trial's retry history."""
    return {number for t in trials for number in t.system_attrs.get("retry_history", ())}


def storage_url(sweep: Any, root: Path) -> str:
    url = sweep.storage or os.environ.get(STORAGE_ENV) or f"sqlite:///{root / 'sweep.db'}"
    # SQLAlchemy's plain postgresql:// means psycopg2; the extra installs psycopg (3)
    for plain in ("postgresql://", "postgres://"):
        if url.startswith(plain):
            return "postgresql+psycopg://" + url.removeprefix(plain)
    return url


def open_study(sweep: Any, root: Path, create: bool, fingerprint: dict[str, Any] | None = None) -> Any:
    import optuna
    from sqlalchemy.exc import DBAPIError, SQLAlchemyError

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Heartbeats and retries are "experimental" in Optuna: a warning each time, nothing the user can act on.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # ... and one that says heartbeats are meant for Study.optimize: this loop records its own (Sweeper._heartbeat)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    url = storage_url(sweep, root)
    if not create and not (root / FINGERPRINT).is_file():
        raise CheckpointError(
            f"no sweep in {root}: start one there (without --report), or check --trainer.default_root_dir"
        )
    if create:
        root.mkdir(parents=True, exist_ok=True)  # where SQLite's file goes
    problem: BaseException = RuntimeError()
    for _ in range(5):
        try:
            return _open(sweep, url, create, fingerprint)
        except SQLAlchemyError as err:  # workers started together on a new database race to create its tables
            problem = err
            if not create or not isinstance(err, DBAPIError):  # a bad URL: no use trying again
                break
            time.sleep(0.5 + random.random())
        except (ImportError, ValueError, KeyError, sqlite3.Error) as err:
            problem = err
            break
    raise ConfigError(f"--sweep.storage: cannot open the study {sweep.study_name!r}: {first_line(problem)}")


def _open(sweep: Any, url: str, create: bool, fingerprint: dict[str, Any] | None) -> tuple[Any, Any]:
    import optuna

    if url.startswith("sqlite:///") and create:
        # Write-ahead logging: a worker reading (or stopped while it reads) never holds the others' writes up
        with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite:///"), timeout=120)) as db:
            db.execute("PRAGMA journal_mode=WAL")
    storage = optuna.storages.RDBStorage(
        url,
        engine_kwargs=engine_kwargs(url),
        heartbeat_interval=sweep.heartbeat_interval,
        grace_period=sweep.grace_period,
        heartbeat_stale_trial_callback=retry,
    )
    from mnist_lit.sweep.sampler import TrialSeededSampler

    sampler = TrialSeededSampler(sweep.seed)
    pruner = make_pruner(sweep.pruner, sweep.startup_trials, sweep.warmup_epochs)
    if not create:
        return optuna.load_study(study_name=sweep.study_name, storage=storage, sampler=sampler, pruner=pruner), storage
    study = optuna.create_study(
        storage=storage, study_name=sweep.study_name, direction=sweep.direction, sampler=sampler, pruner=pruner,
        load_if_exists=True,
    )  # fmt: skip
    if "fingerprint" not in study.user_attrs:
        study.set_user_attr("fingerprint", fingerprint)  # two workers may both: the same value
    recorded = study.user_attrs["fingerprint"]
    if recorded != fingerprint:
        raise CheckpointError(
            f"the study {sweep.study_name!r} in {public_url(url)} was started with {difference(recorded, fingerprint)}:"
            " run it with its own options, or give this sweep another --sweep.study_name"
        )
    return study, storage


def trial_folder(root: Path, trial: Any) -> Path:
    """A trial's folder, trials/<number>: its own number, or that of the stopped trial it resumes. The study records
    which; a study from elsewhere may record anything, so nothing but the number of this or an earlier trial is
    taken (a folder of '../../outside' would have the report copy that folder's config.yaml into best.yaml)."""
    number = trial.user_attrs.get("folder", trial.number)
    if isinstance(number, bool) or not isinstance(number, int) or not 0 <= number <= trial.number:
        shown = printable(repr(number))[:80]
        raise CheckpointError(
            f"the study records {shown} as the folder of trial {trial.number}: not the number of this or an earlier"
            " trial, so not a folder of this sweep's"
        )
    return root / "trials" / str(number)


# private-optuna[Trial._trial_id]: the storage's id of a trial, which every storage method takes (heartbeats, a
# trial's state and attributes) and a trial's fit needs to report to it; Optuna's Trial exposes only its number.
def trial_id_of(trial: Any) -> int:
    return trial._trial_id


def public_url(url: str) -> str:
    """The URL without its password, to print."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    return f"{scheme}{sep}{userinfo.split(':')[0]}{at}{host}" if at else url


def difference(recorded: dict[str, Any], given: dict[str, Any]) -> str:
    """What differs between two fingerprints, in a few words."""
    for key, what in (("space", "another space"), ("metric", "another metric"), ("direction", "another direction")):
        if recorded.get(key) != given.get(key):
            return f"{what} ({json.dumps(recorded.get(key))})"
    changed = [k.rstrip(".") for k in sorted(set(_flat(recorded["base"])) | set(_flat(given["base"])))
               if _flat(recorded["base"]).get(k) != _flat(given["base"]).get(k)]  # fmt: skip
    return f"another base config ({', '.join(changed[:3])} differ)"


def _flat(config: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(config, dict):
        return {prefix: config}
    return {k: v for key, value in config.items() for k, v in _flat(value, f"{prefix}{key}.").items()} or {
        prefix: config
    }


def counted(trial: Any) -> bool:
    """Whether a trial counts towards --sweep.trials: finished, pruned, or failed in its own right (not stopped
    and enqueued again, not one too many)."""
    from optuna.trial import TrialState

    if trial.state == TrialState.FAIL:
        return "error" in trial.user_attrs
    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED)
