"""The recipe as options: any optimizer and schedule, kept in the checkpoint, resumed exactly; options given on a
resume; messages and displays that tell the truth."""

from __future__ import annotations

import re
import signal
import subprocess
import sys

import pytest
import torch
from helpers.checkpoints import fit_args
from helpers.cli import KILLPOINTS, QUIET, SYNTHETIC, cli_env, run_cli
from helpers.images import digit

from mnist_lit.checkpoints.files import DIGEST_KEY, digest

ADAM_ONE_CYCLE = [
    "--model.optimizer", "Adam", "--model.optimizer.lr", "0.003",
    "--model.lr_scheduler", "OneCycleLR", "--model.lr_scheduler.max_lr", "0.01",
]  # fmt: skip


def data(mnist_dir) -> list[str]:
    return ["--data.data_dir", str(mnist_dir), *SYNTHETIC, *QUIET]


def last(root) -> dict:
    return torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)


def assert_tensors_equal(x, y, where: str = "") -> None:
    """Nested dicts/lists of tensors and plain values, equal bit for bit."""
    if isinstance(x, torch.Tensor):
        assert torch.equal(x, y), where
    elif isinstance(x, dict):
        assert x.keys() == y.keys(), where
        for key in x:
            assert_tensors_equal(x[key], y[key], f"{where}/{key}")
    elif isinstance(x, (list, tuple)):
        assert len(x) == len(y), where
        for i, (a, b) in enumerate(zip(x, y, strict=True)):
            assert_tensors_equal(a, b, f"{where}/{i}")
    else:
        assert x == y, where


@pytest.fixture(scope="module")
def adam_run(tmp_path_factory, mnist_dir):
    """An uninterrupted 3-epoch run (27 steps) with Adam and a OneCycleLR schedule."""
    root = tmp_path_factory.mktemp("adam")
    result = run_cli(*fit_args(mnist_dir), *ADAM_ONE_CYCLE, cwd=root)
    assert result.returncode == 0, result.stderr[-2000:]
    return root


@pytest.mark.slow  # five whole runs; test_resume.py covers the default recipe's exact resume (limits, Ctrl-C)
def test_adam_and_one_cycle_resume_bit_for_bit_after_a_kill_mid_epoch(tmp_path, mnist_dir, adam_run):
    killed = run_cli("step", "14", *fit_args(mnist_dir), *ADAM_ONE_CYCLE, cwd=tmp_path, script=KILLPOINTS)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert last(tmp_path)["global_step"] == 12  # mid-epoch 1: the schedule and Adam's moments are under way
    # the resume names no optimizer or schedule: the checkpoint holds them
    result = run_cli(*fit_args(mnist_dir), "--ckpt_path", "last", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    resumed, reference = last(tmp_path), last(adam_run)
    assert resumed["global_step"] == reference["global_step"] == 27
    for key in ("state_dict", "optimizer_states", "lr_schedulers"):
        assert_tensors_equal(resumed[key], reference[key], key)
    assert set(resumed["optimizer_states"][0]["state"][0]) >= {"exp_avg", "exp_avg_sq"}  # Adam's own state
    assert resumed["lr_schedulers"][0]["total_steps"] == 27  # the run's length, from the trainer


@pytest.mark.slow  # shares the Adam run above
def test_a_checkpoint_trained_with_them_tests_predicts_and_exports_with_no_extra_options(
    adam_run, mnist_dir, tmp_path, run_main
):
    hparams = last(adam_run)["hyper_parameters"]  # plain data: loadable with weights_only
    assert hparams["optimizer"]["class_path"] == "torch.optim.Adam"
    assert hparams["lr_scheduler"]["class_path"] == "torch.optim.lr_scheduler.OneCycleLR"
    status, out, err = run_main("test", "--ckpt_path", "last", *data(mnist_dir), cwd=adam_run)
    assert status == 0 and "test/acc" in out, err[-2000:]
    status, out, err = run_main("export", "--ckpt_path", "last", "--output", str(tmp_path / "m.pth"), cwd=adam_run)
    assert status == 0 and (tmp_path / "m.pth").is_file(), err
    # predict, its output redirected (not a terminal) with the progress bar on: result lines only on stdout
    digit().save(tmp_path / "seven.png")
    result = run_cli("predict", "--ckpt_path", "last", "--data.predict_path", str(tmp_path / "seven.png"), cwd=adam_run)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and re.fullmatch(rf"{re.escape(str(tmp_path / 'seven.png'))}\t\d\t[\d.]+", lines[0])
    assert "Predictions: " in result.stderr and "\r" not in result.stdout
    assert "Predicting" in result.stderr  # the bar is still there, on stderr


def test_print_config_shows_the_guides_sgd_and_no_schedule(tmp_path, run_main):
    status, out, err = run_main("fit", "--print_config", cwd=tmp_path)
    assert status == 0, err
    model = out[out.index("\nmodel:") : out.index("\ndata:")]
    assert "class_path: torch.optim.SGD" in model and "lr: 0.01" in model and "momentum: 0.5" in model
    assert "nesterov: false" in model and "lr_scheduler: null" in model


@pytest.mark.slow  # a whole run or several: in the slow suite, so the default one stays under 4 minutes
def test_new_optimizer_numbers_on_a_resume_apply_from_there_on_and_are_said(tmp_path, mnist_dir):
    fit = ["fit", *data(mnist_dir), "--trainer.log_every_n_steps", "1"]
    assert run_cli(*fit, "--trainer.max_epochs", "1", cwd=tmp_path).returncode == 0
    result = run_cli(*fit, "--trainer.max_epochs", "2", "--ckpt_path", "last", "--model.lr", "0.5",
                     "--model.optimizer.weight_decay", "0.001", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "optimizer: lr 0.01 -> 0.5, weight_decay 0.0 -> 0.001 from this resume on" in result.stderr
    checkpoint = last(tmp_path)
    group = checkpoint["optimizer_states"][0]["param_groups"][0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.5, 0.5, 0.001)
    assert checkpoint["hyper_parameters"]["optimizer"]["init_args"]["lr"] == 0.5
    # the run's one log folder, which the resume goes on writing to: one line in TensorBoard
    config = (tmp_path / "lightning_logs" / "version_0" / "config.yaml").read_text()
    assert re.search(r"lr: 0\.5\n", config) and "weight_decay: 0.001" in config  # the resumed run's truth
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "lightning_logs" / "version_0"))
    events.Reload()
    values = [e.value for e in events.Scalars("train/lr")]
    assert values[-9:] == [0.5] * 9 and values[:-9] == pytest.approx([0.01] * 9)  # the first epoch, then the resumed


def test_a_monitor_on_a_metric_never_logged_is_refused_before_anything_is_written(tmp_path, mnist_dir, run_main):
    early = ["--trainer.callbacks+=EarlyStopping", "--trainer.callbacks.monitor"]
    fit = ["fit", *data(mnist_dir), "--trainer.max_epochs", "1"]
    status, _, err = run_main(*fit, *early, "val_loss", cwd=tmp_path)
    assert status != 0 and "monitor 'val_loss' is not a metric this run logs" in err, err
    assert "train/loss, train/lr, val/loss, val/acc" in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # nothing the corrected command would call an earlier run
    status, _, err = run_main(*fit, *early, "val/loss", cwd=tmp_path)
    assert status == 0, err[-2000:]
    (tmp_path / "all").mkdir()  # a run of all the training images: no validation
    status, _, err = run_main(*fit, "--data.val_size", "0", *early, "val/loss", cwd=tmp_path / "all")
    assert status != 0 and "(this run has no validation)" in err, err


def test_a_missing_package_of_a_chosen_class_is_named(tmp_path, mnist_dir, run_main):
    pytest.importorskip("tqdm")
    try:
        import rich  # noqa: F401

        pytest.skip("rich is installed here")
    except ImportError:
        pass
    status, _, err = run_main("fit", *data(mnist_dir), "--trainer.callbacks+=RichProgressBar", cwd=tmp_path)
    assert status != 0 and len(err.strip().splitlines()) == 1, err
    assert "RichProgressBar" in err and "requires `rich`" in err and len(err) < 200, err


def loss_values(text: str) -> list[float]:
    return [float(v) for v in re.findall(r"\bloss=([\d.]+)", text)]


def test_the_loss_shown_under_gradient_accumulation_is_the_real_loss(tmp_path, mnist_dir, run_main):
    # A learning rate so small that the loss stays the untrained net's, about ln 10 = 2.3: not 2.3 / 3
    fit = ["fit", "--data.data_dir", str(mnist_dir), *SYNTHETIC, "--trainer.max_epochs", "1", "--model.lr", "1e-9"]
    fit += ["--trainer.accumulate_grad_batches", "3", "--trainer.log_every_n_steps", "1"]
    status, out, err = run_main(*fit, cwd=tmp_path)
    assert status == 0, err[-2000:]
    shown = loss_values(out + err)
    assert shown and all(2.0 < v < 2.6 for v in shown), shown
    curve = last(tmp_path)["callbacks"]["TrainingCurves"]["train"]
    assert curve[:, 0].tolist() == [1.0, 2.0, 3.0]  # one point per optimizer step (9 batches / 3)
    assert all(2.0 < v < 2.6 for v in curve[:, 1].tolist()), curve


def test_a_run_shorter_than_the_logging_interval_gets_curves_and_a_bar_that_ends_full(tmp_path, mnist_dir, run_main):
    fit = ["fit", "--data.data_dir", str(mnist_dir), *SYNTHETIC, "--trainer.max_steps", "4"]
    status, out, err = run_main(*fit, cwd=tmp_path)
    assert status == 0, err[-2000:]
    assert re.search(r"Epoch 0: 100%\|[^|]*\| 4/4 ", out + err), (out + err)[-1500:]
    assert (tmp_path / "lightning_logs" / "version_0" / "curves.png").is_file()
    assert last(tmp_path)["callbacks"]["TrainingCurves"]["train"].tolist()[-1][0] == 4


@pytest.mark.slow  # two CLI processes: in the slow suite, so the default one stays under 4 minutes
def test_help_into_a_pipe_closed_early_ends_quietly(tmp_path):
    for command in (["--help"], ["fit", "--help"]):
        process = subprocess.Popen([sys.executable, "-m", "mnist_lit", *command], cwd=tmp_path, env=cli_env(),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        process.stdout.close()  # what `| head -3` does once it has its lines
        _, err = process.communicate(timeout=120)
        assert "Traceback" not in err and "BrokenPipe" not in err, err


@pytest.mark.slow  # whole runs: in the slow suite, so the default one stays under 4 minutes
def test_a_checkpoint_from_before_the_optimizer_option_still_tests_and_resumes(tmp_path, mnist_dir, run_main):
    fit = ["fit", *data(mnist_dir), "--trainer.max_epochs", "1"]
    assert run_main(*fit, cwd=tmp_path)[0] == 0
    checkpoint = last(tmp_path)
    checkpoint["hyper_parameters"] = {"lr": 0.05, "momentum": 0.9, "channels_last": True}  # as written then
    checkpoint[DIGEST_KEY] = digest(checkpoint)
    torch.save(checkpoint, tmp_path / "checkpoints" / "last.ckpt")
    status, out, err = run_main("test", "--ckpt_path", "last", *data(mnist_dir), cwd=tmp_path)
    assert status == 0 and "test/acc" in out, err[-2000:]
    status, _, err = run_main(*fit, "--trainer.max_epochs", "2", "--ckpt_path", "last", cwd=tmp_path)
    assert status == 0, err[-2000:]
    init_args = last(tmp_path)["hyper_parameters"]["optimizer"]["init_args"]
    assert (init_args["lr"], init_args["momentum"]) == (0.05, 0.9)
