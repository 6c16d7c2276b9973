"""`sweep`: Optuna trials as ordinary fits; refusals before any trial, resume after kills, workers taken over,
a study shared through a real PostgreSQL server."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.cli import ROOT, SYNTHETIC, assert_clean_error, printed_metrics
from helpers.sweep import (
    SHORT,
    SPACE,
    assert_same_weights,
    children,
    counted,
    periodic,
    run,
    snapshot,
    start,
    study,
    sweep_args,
    wait_for,
)

pytest.importorskip("optuna", reason="the sweep extra is not installed: pip install -e '.[sweep]'")


# --- default suite: refusals, cheap ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("space", "needle"),
    [
        ({"model.optimizer.init_args.lrr": [0.1]}, "model.optimizer.init_args.lrr: not an option of fit"),
        ({"modle.optimizer.lr": [0.1]}, "modle is not an option group"),
        ({"data.batch_size": {"low": 64, "high": 32}}, "the range 64 to 32 is empty"),
        ({"data.batch_size": []}, "an empty list of choices"),
        ({"data.batch_size": [64, "big"]}, "data.batch_size: big is refused by fit: --data.batch_size"),
        ({"model.optimizer.momentum": {"low": 0.5, "high": 1.5}}, "1.5 is refused by fit"),
        ({"model.optimizer.lr": {"low": 0, "high": 1, "log": True}}, "a log range must start above 0"),
        ({"data.batch_size": 64}, "neither a list of choices nor a range"),
        ({"trainer.default_root_dir": ["a", "b"]}, "the sweep sets this option itself"),
        ({}, "--sweep.space is empty"),
    ],
)
def test_a_bad_space_is_refused_before_any_trial(tmp_path, mnist_dir, run_main, space, needle):
    root = tmp_path / "sweep"
    status, _, err = run_main(*sweep_args(root, mnist_dir, space=space), cwd=tmp_path)
    assert_clean_error(subprocess.CompletedProcess([], status, "", err), needle)
    assert not root.exists()  # nothing written: no study, no trial folder


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--sweep.trials", "0"], "--sweep.trials: 0 is out of range"),
        (["--sweep.workers", "two"], "--sweep.workers"),
        (["--data.val_size", "0"], "--sweep.metric val/acc needs a validation set"),
        (["--ckpt_path", "last"], "--ckpt_path: a sweep resumes its trials itself"),
        (["--report"], "no sweep in"),
        (["--sweep.storage", "nosuchdb://x"], "--sweep.storage: cannot open the study"),
        # fit's own checks, on fit's parse path, before any trial (they once failed every trial instead)
        (["--trainer.accumulate_grad_batches", "0"], "--trainer.accumulate_grad_batches: 0 is out of range"),
        (["--seed_everything", "-5"], "--seed_everything: -5 is out of range"),
        (["--model.optimizer.momentum", "-1"], "--model.optimizer"),
    ],
)
def test_bad_sweep_options_are_refused_in_one_line(tmp_path, mnist_dir, run_main, extra, needle):
    root = tmp_path / "sweep"
    status, _, err = run_main(*sweep_args(root, mnist_dir, *extra), cwd=tmp_path)
    assert_clean_error(subprocess.CompletedProcess([], status, "", err), needle)


def test_help_and_print_config(tmp_path, mnist_dir, run_main):
    import yaml

    status, out, _ = run_main("sweep", "--help", cwd=tmp_path)
    assert status == 0 and "--sweep.workers" in out and "--sweep.storage" in out and "MNIST_LIT_SWEEP_STORAGE" in out
    status, out, err = run_main(*sweep_args(tmp_path / "sweep", mnist_dir, "--print_config"), cwd=tmp_path)
    assert status == 0, err
    config = yaml.safe_load(out)  # every trial's base config and the sweep's, a file for --config
    assert config["sweep"]["space"] == SPACE and config["trainer"]["max_epochs"] == 2
    assert config["data"]["val_size"] == 64 and not (tmp_path / "sweep").exists()


def test_the_shipped_sweep_config_parses_and_its_space_is_valid(tmp_path, mnist_dir, run_main):
    import yaml

    from mnist_lit.sweep.command import parse_fit
    from mnist_lit.sweep.space import Space

    config = ROOT / "configs" / "sweep.yaml"
    status, out, err = run_main("sweep", "--config", str(config), "--print_config", cwd=tmp_path)
    assert status == 0, err
    printed = yaml.safe_load(out)
    sweep = printed.pop("sweep")
    assert sweep["trials"] == 16 and sweep["workers"] == 2 and len(sweep["space"]) == 3
    Space(sweep["space"], printed).validate(parse_fit, tmp_path, sweep["metric"])  # raises on a bad key or value


@pytest.mark.slow  # a whole run or several: in the slow suite, so the default one stays under 4 minutes
def test_a_second_sweep_with_another_space_is_refused_and_touches_nothing(tmp_path, mnist_dir, run_main):
    root = tmp_path / "sweep"
    first = run(sweep_args(root, mnist_dir, *SHORT, trials=1), cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "best: trial 0" in first.stdout and (root / "best.yaml").is_file()
    before = snapshot(root)
    other = {"model.optimizer.init_args.momentum": [0.5, 0.9]}
    status, _, err = run_main(*sweep_args(root, mnist_dir, *SHORT, space=other, trials=1), cwd=tmp_path)
    message = f"{root} holds a sweep started with another space"
    assert_clean_error(subprocess.CompletedProcess([], status, "", err), message)
    assert snapshot(root) == before
    # one root, one study: another study's trials would be numbered into this one's folders
    status, _, err = run_main(*sweep_args(root, mnist_dir, *SHORT, "--sweep.study_name", "other", trials=1),
                              cwd=tmp_path)  # fmt: skip
    assert_clean_error(subprocess.CompletedProcess([], status, "", err), "holds the sweep of the study 'mnist_lit'")
    # ... and this study is this root's: another root on its storage is refused, and left as it was (none)
    elsewhere = tmp_path / "elsewhere"
    status, _, err = run_main(
        *sweep_args(elsewhere, mnist_dir, *SHORT, "--sweep.storage", f"sqlite:///{root / 'sweep.db'}", trials=1),
        cwd=tmp_path,
    )
    assert_clean_error(subprocess.CompletedProcess([], status, "", err), f"holds the trials of the sweep in {root}")
    assert not elsewhere.exists()
    assert {k: v for k, v in snapshot(root).items() if not k.endswith(("-wal", "-shm"))} == before  # SQLite's own
    # the same command again: the sweep is finished; the answer is printed again
    status, out, err = run_main(*sweep_args(root, mnist_dir, *SHORT, "--report", trials=1), cwd=tmp_path)
    assert status == 0 and "trials/0" in out and "complete" in out, err


# --- slow: whole sweeps, faults ---------------------------------------------------------------------------------


@pytest.mark.slow  # about 40 s: six trials on two workers, then a fit of best.yaml
def test_a_sweep_ends_with_a_table_best_yaml_and_figures_that_reproduce(tmp_path, mnist_dir):
    root = tmp_path / "sweep"
    result = run(sweep_args(root, mnist_dir, "--sweep.workers", "2"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    trials = study(root)
    assert len(counted(trials)) == 6 == len(trials)  # none failed, none repeated
    rows = [line for line in result.stdout.splitlines() if line.split()[:1] and line.split()[0].isdigit()]
    assert len(rows) == 6 and all(f"trials/{t.number}" in rows[t.number] for t in trials)
    for name in ("best.yaml", "history.png", "slices.png"):
        assert (root / name).is_file(), name
    # a ranking of the parameters from 6 trials would rank noise: said, not drawn
    completed = sum(t.value is not None and t.state.name == "COMPLETE" for t in trials)
    assert not (root / "importances.png").exists()
    assert f"no importances.png yet ({completed} trials completed; drawn from 8)" in result.stdout
    best = max((t for t in trials if t.value is not None), key=lambda t: t.value)
    assert f"best: trial {best.number}, val/acc {best.value:.4f}" in result.stdout
    # best.yaml in a new root: the best trial's run again, weights and metric exactly
    new = tmp_path / "again"
    fit = run(["fit", "--config", str(root / "best.yaml"), "--trainer.default_root_dir", str(new)], cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr
    assert_same_weights(root / "trials" / str(best.number) / "checkpoints" / "last.ckpt", new / "checkpoints/last.ckpt")
    checked = run(
        ["validate", "--ckpt_path", "last", "--trainer.default_root_dir", str(new), "--data.data_dir", str(mnist_dir),
         *SYNTHETIC], cwd=tmp_path,
    )  # fmt: skip
    assert printed_metrics(checked.stdout)["val/acc"] == pytest.approx(best.value, abs=1e-6)


@pytest.mark.slow  # about 35 s
def test_sigterm_stops_every_trial_at_a_checkpoint_and_the_same_command_resumes_them(tmp_path, mnist_dir):
    root = tmp_path / "sweep"
    args = sweep_args(root, mnist_dir, "--trainer.max_epochs", "4", "--checkpoint.every_n_train_steps", "3", trials=2)
    proc = start([*args, "--sweep.workers", "2"], tmp_path)
    try:
        folders = [root / "trials" / "0", root / "trials" / "1"]
        wait_for(lambda: all(periodic(f) for f in folders), 120, "both trials' first checkpoints", (proc,))
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert "SIGTERM: sweep stopped" in err.splitlines()[-1]
    assert all(t.state.name in ("FAIL", "WAITING") for t in study(root))  # none counted yet: both enqueued again
    assert all((f / "checkpoints" / "last.ckpt").is_file() for f in folders)  # saved at the signal
    second = run([*args, "--sweep.workers", "2"], cwd=tmp_path)  # two workers never take the same stopped trial
    assert second.returncode == 0, second.stderr
    assert second.stderr.count("resuming trial") == 2 and "starting trial" not in second.stderr
    assert "in use by another fit" not in second.stderr
    trials = study(root)
    assert len(counted(trials)) == 2 and sorted(t.user_attrs["folder"] for t in counted(trials)) == [0, 1]


@pytest.mark.slow  # about 30 s each
@pytest.mark.parametrize("how", ["killed", "cut off"])
def test_a_lost_worker_s_trial_is_taken_over_by_another(tmp_path, mnist_dir, how):
    """killed: kill -9 of a worker on this machine, noticed by its process id at once. cut off: a worker frozen
    (SIGSTOP, as a machine that hangs or drops off the network) and its fit ended, noticed only by its stale
    heartbeat, as a worker on another machine would be."""
    root = tmp_path / "sweep"
    args = sweep_args(root, mnist_dir, "--trainer.max_epochs", "4", "--checkpoint.every_n_train_steps", "3", trials=3)
    args += ["--sweep.heartbeat_interval", "1", "--sweep.grace_period", "4"]
    first = start(args, tmp_path)
    try:
        wait_for(lambda: (root / "sweep.json").exists(), 60, "the first worker's study", (first,))
        second = start(args, tmp_path)
        try:
            wait_for(lambda: periodic(root / "trials" / "1"), 120, "the second trial's checkpoint", (first, second))
            # kill the worker running trial 1, whichever it is
            owner = int(next(t for t in study(root) if t.number == 1).user_attrs["worker"].rpartition(":")[2])
            victim, survivor = (first, second) if owner == first.pid else (second, first)
            if how == "killed":
                victim.kill()  # its fit dies with it
            else:
                fits = children(victim.pid)
                victim.send_signal(signal.SIGSTOP)
                for fit in fits:
                    os.kill(fit, signal.SIGKILL)
            _, err = survivor.communicate(timeout=180)
        finally:
            second.kill()
    finally:
        first.kill()
    assert survivor.returncode == 0, err
    assert "(in trials/1, taken over)" in err
    trials = study(root)
    assert len(counted(trials)) == 3
    folders = sorted(t.user_attrs["folder"] for t in counted(trials))
    assert len(set(folders)) == 3 and 1 in folders
    assert next(t for t in trials if t.number == 1).state.name == "FAIL"  # stopped, then resumed as another number


# --- slow: a real PostgreSQL server ---------------------------------------------------------------------------------


@pytest.mark.slow  # about 40 s
def test_two_workers_started_separately_share_one_study_in_postgresql(tmp_path, mnist_dir, postgres, monkeypatch):
    root = tmp_path / "sweep"
    monkeypatch.setenv("MNIST_LIT_SWEEP_STORAGE", postgres)  # as a user keeps a password off the command line
    args = sweep_args(root, mnist_dir, trials=4)
    workers = [start(args, tmp_path), start(args, tmp_path)]
    try:
        results = [proc.communicate(timeout=240) for proc in workers]
    finally:
        for proc in workers:
            proc.kill()
    for proc, (_, err) in zip(workers, results, strict=True):
        assert proc.returncode == 0, err
    assert not (root / "sweep.db").exists()  # the study is in PostgreSQL
    trials = study(root, postgres.replace("postgresql://", "postgresql+psycopg://"))
    assert len(trials) == 4 == len(counted(trials))
    numbers = [t.number for t in trials]
    assert sorted(numbers) == [0, 1, 2, 3]
    assert sorted(t.user_attrs["folder"] for t in trials) == numbers  # every trial recorded, and run, once
    starts = "".join(err for _, err in results)
    assert all(starts.count(f"starting trial {n}:") == 1 for n in numbers)
    assert len({t.user_attrs["worker"] for t in trials}) == 2  # both workers ran trials


@pytest.mark.slow  # a sweep and two reports: about 40 s
def test_a_study_from_elsewhere_names_no_folder_outside_the_root_and_its_text_reaches_the_screen_escaped(
    tmp_path, mnist_dir
):
    import sqlite3

    root = tmp_path / "sweep"
    result = run(sweep_args(root, mnist_dir, *SHORT, trials=2), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "config.yaml").write_text("# not the sweep's\n")
    (root / "best.yaml").unlink()
    with contextlib.closing(sqlite3.connect(root / "sweep.db")) as db, db:  # as anyone with the file can
        db.execute(
            "UPDATE trial_user_attributes SET value_json = ? WHERE key = 'folder'", (json.dumps("../../outside"),)
        )
    report = run(sweep_args(root, mnist_dir, *SHORT, "--report", trials=2), cwd=tmp_path)
    assert report.returncode == 1 and "not the number of this or an earlier trial" in report.stderr, report.stderr
    assert not (root / "best.yaml").exists()
    forged = "\x1b[2J\nbest: trial 7, val/acc 1.0000"
    with contextlib.closing(sqlite3.connect(root / "sweep.db")) as db, db:
        db.execute("UPDATE trial_user_attributes SET value_json = '0' WHERE key = 'folder'")
        db.execute("UPDATE trials SET state = 'FAIL' WHERE number = 1")
        trial_id = db.execute("SELECT trial_id FROM trials WHERE number = 1").fetchone()[0]
        db.execute(
            "INSERT INTO trial_user_attributes (trial_id, key, value_json) VALUES (?, 'error', ?)",
            (trial_id, json.dumps(forged)),
        )
    report = run(sweep_args(root, mnist_dir, *SHORT, "--report", trials=2), cwd=tmp_path)
    assert "\x1b" not in report.stdout and "\\x1b[2J\\x0abest: trial 7" in report.stdout, report.stdout
    assert not any(line.startswith("best: trial 7") for line in report.stdout.splitlines())


def test_a_restarted_sweep_continues_the_search_instead_of_replaying_it():
    """One TPESampler seeded once proposed the same settings each time a sweep started (after a crash, trial 5
    repeated trial 0's setting exactly), and on two machines at once. Seeded by each trial's number, a restart
    proposes new settings, and the same seed still proposes the same ones for the same trials."""
    import optuna

    from mnist_lit.sweep.sampler import TrialSeededSampler

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = {"lr": optuna.distributions.FloatDistribution(1e-3, 1.0, log=True),
             "batch_size": optuna.distributions.CategoricalDistribution([32, 64, 128, 256])}  # fmt: skip

    def ask(study: optuna.Study, n: int) -> list[dict]:
        return [study.ask(space).params for _ in range(n)]

    storage = optuna.storages.InMemoryStorage()
    first = ask(optuna.create_study(study_name="s", storage=storage, sampler=TrialSeededSampler(1)), 3)
    restarted = ask(optuna.load_study(study_name="s", storage=storage, sampler=TrialSeededSampler(1)), 3)
    assert not [p for p in restarted if p in first], (first, restarted)
    again = ask(optuna.create_study(sampler=TrialSeededSampler(1)), 3)
    assert again == first  # the seed still decides the proposals, trial by trial
    assert ask(optuna.create_study(sampler=TrialSeededSampler(2)), 3) != first


def test_a_stopped_trial_is_enqueued_again_once_however_many_workers_find_it():
    """Two workers found the same dead trial at a restart and each enqueued it: trial 0 was resumed twice, in one
    folder, and the sweep ended with half its settings. retry leaves a trial already in a retry history alone."""
    import optuna
    from optuna.trial import TrialState

    from mnist_lit.sweep.study import retry

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study()
    trial = study.ask({"lr": optuna.distributions.FloatDistribution(0.01, 0.1)})
    study.tell(trial, state=TrialState.FAIL)
    stopped = study.trials[0]
    retry(study, stopped)
    retry(study, stopped)  # the second worker, a moment later
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert len(waiting) == 1 and waiting[0].params == stopped.params
    resumed = study.ask()  # the retry runs, and is stopped in turn: it is enqueued again, once
    study.tell(resumed, state=TrialState.FAIL)
    retry(study, study.trials[resumed.number])
    retry(study, study.trials[resumed.number])
    assert len(study.get_trials(states=(TrialState.WAITING,))) == 1


def test_a_running_study_can_be_watched_live_with_optuna_dashboard(tmp_path):
    """The README's way to watch a sweep: optuna-dashboard on the root's sweep.db, on loopback; its page and its
    API answer with the study's trials while the study is open."""
    pytest.importorskip("optuna_dashboard", reason="optuna-dashboard is not installed: pip install -e '.[sweep]'")
    import urllib.request

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{tmp_path / 'sweep.db'}"
    study = optuna.create_study(study_name="mnist", storage=url, direction="maximize")
    for lr in (0.01, 0.05):
        trial = study.ask({"model.optimizer.init_args.lr": optuna.distributions.FloatDistribution(0.001, 0.1)})
        study.tell(trial, lr * 10)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [str(Path(sys.executable).with_name("optuna-dashboard")), url, "--host", "127.0.0.1", "--port", str(port)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline, studies = time.monotonic() + 60, None
        while time.monotonic() < deadline and studies is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as answer:
                    studies = json.load(answer)["study_summaries"]
            except OSError:
                assert server.poll() is None, server.stderr.read()
                time.sleep(0.5)
        assert [s["study_name"] for s in studies] == ["mnist"], studies
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{studies[0]['study_id']}", timeout=5) as a:
            trials = json.load(a)["trials"]
        assert sorted(t["values"][0] for t in trials) == [0.1, 0.5]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/dashboard/", timeout=5) as page:
            assert page.status == 200 and "<html" in page.read().decode().lower()
    finally:
        server.terminate()
        server.wait(timeout=20)
