"""A sweep killed anywhere: every process of it SIGKILLed at one instant (tests/helpers/sweepkill), then the same
command again, until it ends. Whatever the instant, the study it leaves holds exactly the trials asked for, each
folder one chain of one setting, no setting run twice, every stopped trial resumed exactly once, and every finished
trial's value its own fit's."""

from __future__ import annotations

import math
import os
import re
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
from helpers.disk import fill_up, small_filesystem
from helpers.sweep import assert_same_weights, env, periodic, run, study, sweep_args, wait_for

pytest.importorskip("optuna", reason="the sweep extra is not installed: pip install -e '.[sweep]'")

TRIALS = 3
TRAIN = 640 - 64  # the synthetic training images less the validation ones
KILLS = str(ROOT / "tests" / "helpers" / "sweepkill")

# What each kill is (sweepkill's MOMENT:N, N counting in the process where the moment happens)
INSTANTS = {
    "look:1": "before the first trial",
    "asked:2": "a trial handed out, its heartbeat and owner not yet recorded",
    "started:2": "a trial owned, its folder not yet made",
    "config:1": "a trial's config written, its fit not started",
    "ckpt:2": "mid-trial, after a checkpoint",
    "release:1": "during a takeover: a stopped trial failed, not yet enqueued again",
    "result:1": "after a validation's value, before its checkpoint",
    "ended:1": "after a trial's last checkpoint, before its result is complete",
    "tell:1": "a fit ended, the study not yet told",
    "report:1": "while the report is written",
}
# Chains: the kills of successive runs of the same command, the invariants checked after each, then a run to the end.
# Each kill of a chain comes in the state the ones before it left (a takeover only after a trial was stopped).
CHAINS = {
    "the first trials": ["look:1", "asked:2", "started:2", "config:1"],
    "mid-trial and the takeover": ["ckpt:2", "release:1", "result:1"],
    "a trial's end and the report": ["ended:1", "tell:1", "report:1"],
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


def check_invariants(root: Path, url: str | None, log: str, ended: bool) -> None:
    """What must hold after any run, killed or not (ended: the run went to the end)."""
    from optuna.trial import TrialState

    if not (root / "sweep.json").exists() and url is None:
        return  # killed before the study was made
    trials = study(root, url)
    counted = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED) or "error" in t.user_attrs]
    # the trials asked for, each finished (at most that many before the end)
    assert len(counted) == TRIALS if ended else len(counted) <= TRIALS, [(t.number, t.state.name) for t in trials]
    assert all(t.state == TrialState.COMPLETE for t in counted), log
    # each folder one setting, and a finished trial's folder its own (no two finished trials in one folder)
    folders: dict[int, dict] = {}
    for trial in trials:
        if trial.params:
            folder = trial.user_attrs.get("folder", trial.number)
            assert folders.setdefault(folder, trial.params) == trial.params, trial.number
    table = [(t.number, t.state.name, t.user_attrs.get("folder"), t.system_attrs.get("retry_history")) for t in trials]
    assert len({t.user_attrs.get("folder", t.number) for t in counted}) == len(counted), (table, log)
    # no setting run twice
    settings = [tuple(sorted(t.params.items())) for t in counted]
    assert len(set(settings)) == len(counted), settings
    # every stopped trial (failed, not counted, not one too many) resumed by exactly one later trial
    stopped = [t for t in trials if t.state == TrialState.FAIL and t not in counted and "surplus" not in t.user_attrs]
    for trial in stopped:
        heirs = [t for t in trials if (t.system_attrs.get("retry_history") or [None])[-1] == trial.number]
        assert len(heirs) == 1 if ended else len(heirs) <= 1, (trial.number, [t.number for t in heirs], log)
    if not ended:
        return
    # nothing left running or waiting
    assert not [t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    # every finished trial's value and steps are its own fit's: its folder's config, result and last checkpoint
    for trial in counted:
        folder = root / "trials" / str(trial.user_attrs.get("folder", trial.number))
        config = yaml.safe_load((folder / "config.yaml").read_text())
        assert config["data"]["batch_size"] == trial.params["data.batch_size"]
        assert config["model"]["optimizer"]["init_args"]["lr"] == trial.params["model.optimizer.init_args.lr"]
        checkpoint = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)
        steps = math.ceil(TRAIN / trial.params["data.batch_size"])  # one epoch
        assert checkpoint["global_step"] == steps == trial.user_attrs["steps"], trial.number
        result = yaml.safe_load((folder / "result.json").read_text())
        assert trial.value == result["value"], trial.number
    assert (root / "best.yaml").is_file()


def kill_and_resume(tmp_path: Path, mnist_dir: Path, kills: list[str], storage: str | None = None) -> None:
    root = tmp_path / "sweep"
    one_epoch = ["--trainer.max_epochs", "1", "--checkpoint.every_n_train_steps", "3"]
    args = sweep_args(root, mnist_dir, *one_epoch, "--sweep.workers", "2", "--sweep.heartbeat_interval", "1",
                      "--sweep.grace_period", "3", trials=TRIALS)  # fmt: skip
    url = storage.replace("postgresql://", "postgresql+psycopg://") if storage else None
    log = ""
    for kill in [*kills, None]:
        result = sweep(args, tmp_path, kill, storage)
        log += f"--- {f'killed {INSTANTS[kill]} ({kill})' if kill else 'run to the end'}\n{result.stderr}"
        if kill:
            assert result.returncode == -signal.SIGKILL, f"{kill} never came: {result.returncode}\n{log}"
        else:
            assert result.returncode == 0, log
        assert "Traceback" not in log, log
        check_invariants(root, url, log, ended=kill is None)
    # a trial stopped mid-way and resumed ends bit for bit where an uninterrupted fit of its config does
    resumed = [t for t in study(root, url) if t.user_attrs.get("folder", t.number) != t.number]
    if resumed:
        folder = root / "trials" / str(resumed[0].user_attrs["folder"])
        fit = run(["fit", "--config", str(folder / "config.yaml"), "--trainer.default_root_dir", "whole"], tmp_path)
        assert fit.returncode == 0, fit.stderr
        assert_same_weights(folder / "checkpoints" / "last.ckpt", tmp_path / "whole" / "checkpoints" / "last.ckpt")


@pytest.mark.slow  # three chains of kills, each then run to the end: about 3 minutes
@pytest.mark.parametrize("chain", list(CHAINS))
def test_a_sweep_killed_at_any_instant_ends_with_the_trials_asked_each_once(tmp_path, mnist_dir, chain):
    kill_and_resume(tmp_path, mnist_dir, CHAINS[chain])


@pytest.mark.slow  # about a minute
def test_a_sweep_on_postgresql_killed_at_any_instant_ends_the_same(tmp_path, mnist_dir, postgres):
    kill_and_resume(tmp_path, mnist_dir, ["asked:2", "ckpt:2", "release:1", "tell:1"], postgres)


@pytest.mark.slow  # about 40 s
def test_a_trial_stopped_by_a_full_disk_is_resumed_once_when_there_is_room_again(tmp_path, mnist_dir):
    """A full disk is the machine's, not the trial's: the sweep stops in one line with the trial stopped (not
    failed), and the same command, once there is room, resumes it and ends as an uninterrupted sweep would."""
    with small_filesystem(tmp_path / "disk", "16m") as disk:
        root = disk / "sweep"
        args = sweep_args(root, mnist_dir, "--trainer.max_epochs", "1", "--checkpoint.every_n_train_steps", "3",
                          trials=TRIALS)  # fmt: skip
        proc = subprocess.Popen(
            [sys.executable, "-m", "mnist_lit", *args], cwd=tmp_path, env=env(), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            wait_for(lambda: periodic(root / "trials" / "0"), 120, "trial 0's first checkpoint", (proc,))
            fill_up(disk)  # the disk full from here on
            _, err = proc.communicate(timeout=120)
        finally:
            proc.kill()
        lines = [line for line in err.splitlines() if line.strip()]
        assert proc.returncode not in (0, None) and "Traceback" not in err, err
        assert lines[-1].startswith("error: ") and re.search("No space left on device|disk is full", lines[-1]), err
        (disk / "ballast").unlink()  # room again
        result = sweep(args, tmp_path, None, None)
        assert result.returncode == 0, result.stderr
        assert "(in trials/0, taken over)" in result.stderr, result.stderr
        check_invariants(root, None, err + result.stderr, ended=True)
