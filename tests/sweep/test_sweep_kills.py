"""A sweep killed anywhere: every process of it SIGKILLed at one instant (tests/helpers/sweepkill), then the same
command again, until it ends. Whatever the instant, the study it leaves holds exactly the trials asked for, each
folder one chain of one setting, no setting run twice, every stopped trial resumed exactly once, and every finished
trial's value its own fit's."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
import yaml
from helpers.cli import ROOT
from helpers.sweep import env, study, sweep_args

pytest.importorskip("optuna", reason="the sweep extra is not installed: pip install -e '.[sweep]'")

TRIALS = 3
TRAIN = 640 - 64  # the synthetic training images less the validation ones
KILLS = str(ROOT / "tests" / "helpers" / "sweepkill")

# instant: the kills of successive runs of the same command (sweepkill's MOMENT:N), before one that runs to the end
INSTANTS = {
    "before the first trial": ["look:1"],
    "a trial handed out, its heartbeat not yet recorded": ["asked:2"],
    "a trial owned, its folder not yet made": ["started:2"],
    "a trial's config written, its fit not started": ["config:1"],
    "mid-trial, after a checkpoint": ["ckpt:2"],
    "after a validation's value, before its checkpoint": ["result:1"],
    "after a trial's last checkpoint, before its result is complete": ["ended:1"],
    "a fit ended, the study not yet told": ["tell:1"],
    "while the report is written": ["report:1"],
    "during a takeover: a stopped trial failed, not yet enqueued again": ["ckpt:2", "release:1"],
}


def kill_stragglers(token: str) -> None:
    """Every process that still holds the token (a fit that was starting as the others died), killed too."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if f"SWEEP_KILL_TOKEN={token}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                    os.kill(int(entry.name), signal.SIGKILL)
            except OSError:
                pass


def sweep(args: list[str], cwd: Path, kill: str | None, storage: str | None) -> subprocess.CompletedProcess:
    environment = env()
    if storage:
        environment["MNIST_LIT_SWEEP_STORAGE"] = storage
    token = uuid.uuid4().hex
    if kill:
        environment.update(SWEEP_KILL=kill, SWEEP_KILL_TOKEN=token)
        environment["PYTHONPATH"] = os.pathsep.join([KILLS, environment["PYTHONPATH"]])
    try:
        return subprocess.run(
            [sys.executable, "-m", "mnist_lit", *args], cwd=cwd, env=environment, capture_output=True, text=True,
            timeout=150,
        )  # fmt: skip
    finally:
        if kill:
            time.sleep(0.2)
            kill_stragglers(token)


def check_invariants(root: Path, url: str | None, log: str) -> None:
    from optuna.trial import TrialState

    trials = study(root, url)
    counted = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED) or "error" in t.user_attrs]
    # the trials asked for, each finished
    assert len(counted) == TRIALS, [(t.number, t.state.name, t.user_attrs) for t in trials]
    assert all(t.state == TrialState.COMPLETE for t in counted), log
    # each folder one setting, and a finished trial's folder its own (no two finished trials in one folder)
    folders: dict[int, dict] = {}
    for trial in trials:
        if trial.params:
            folder = trial.user_attrs.get("folder", trial.number)
            assert folders.setdefault(folder, trial.params) == trial.params, trial.number
    table = [(t.number, t.state.name, t.user_attrs.get("folder"), t.system_attrs.get("retry_history")) for t in trials]
    assert len({t.user_attrs.get("folder", t.number) for t in counted}) == TRIALS, (table, log)
    # no setting run twice
    settings = [tuple(sorted(t.params.items())) for t in counted]
    assert len(set(settings)) == TRIALS, settings
    # every stopped trial (failed, not counted, not one too many) resumed by exactly one later trial
    stopped = [t for t in trials if t.state == TrialState.FAIL and t not in counted and "surplus" not in t.user_attrs]
    for trial in stopped:
        heirs = [t for t in trials if (t.system_attrs.get("retry_history") or [None])[-1] == trial.number]
        assert len(heirs) == 1, (trial.number, [t.number for t in heirs], log)
    # nothing left running or waiting
    assert not [t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    # every finished trial's value and steps are its own fit's: its folder's config, result and last checkpoint
    for trial in counted:
        folder = root / "trials" / str(trial.user_attrs.get("folder", trial.number))
        config = yaml.safe_load((folder / "config.yaml").read_text())
        assert config["data"]["batch_size"] == trial.params["data.batch_size"]
        assert config["model"]["optimizer"]["init_args"]["lr"] == trial.params["model.optimizer.init_args.lr"]
        checkpoint = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)
        steps = 2 * math.ceil(TRAIN / trial.params["data.batch_size"])
        assert checkpoint["global_step"] == steps == trial.user_attrs["steps"], trial.number
        result = yaml.safe_load((folder / "result.json").read_text())
        assert trial.value == result["value"], trial.number
    assert (root / "best.yaml").is_file()


def kill_and_resume(tmp_path: Path, mnist_dir: Path, kills: list[str], storage: str | None = None) -> None:
    root = tmp_path / "sweep"
    args = sweep_args(root, mnist_dir, "--checkpoint.every_n_train_steps", "3", "--sweep.workers", "2",
                      "--sweep.heartbeat_interval", "1", "--sweep.grace_period", "3", trials=TRIALS)  # fmt: skip
    log = ""
    for kill in kills:
        result = sweep(args, tmp_path, kill, storage)
        log += f"--- killed at {kill}\n{result.stderr}"
        assert result.returncode == -signal.SIGKILL, f"{kill} never came: {result.returncode}\n{log}"
    result = sweep(args, tmp_path, None, storage)
    log += f"--- run to the end\n{result.stderr}"
    assert result.returncode == 0, log
    assert "Traceback" not in log, log
    url = storage.replace("postgresql://", "postgresql+psycopg://") if storage else None
    check_invariants(root, url, log)


@pytest.mark.slow  # ten sweeps killed and resumed: about 3 minutes
@pytest.mark.parametrize("instant", list(INSTANTS))
def test_a_sweep_killed_at_any_instant_ends_with_the_trials_asked_each_once(tmp_path, mnist_dir, instant):
    kill_and_resume(tmp_path, mnist_dir, INSTANTS[instant])


@pytest.mark.slow  # four sweeps on PostgreSQL: about a minute
@pytest.mark.parametrize(
    "instant",
    ["a trial handed out, its heartbeat not yet recorded", "mid-trial, after a checkpoint",
     "a fit ended, the study not yet told", "during a takeover: a stopped trial failed, not yet enqueued again"],
)  # fmt: skip
def test_a_sweep_on_postgresql_killed_at_any_instant_ends_the_same(tmp_path, mnist_dir, postgres, instant):
    kill_and_resume(tmp_path, mnist_dir, INSTANTS[instant], postgres)
