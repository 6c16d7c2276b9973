"""Never lose a run: kills at any moment, Ctrl-C, and resumes that end bit for bit where an uninterrupted run does."""

from __future__ import annotations

import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers.checkpoints import assert_same_run, fit_args
from helpers.cli import KILLPOINTS, QUIET, SYNTHETIC, cli_env, run_cli

from mnist_lit.checkpoints.files import load_checkpoint, newest_checkpoint


@pytest.fixture(scope="module")
def reference(tmp_path_factory, mnist_dir):
    root = tmp_path_factory.mktemp("uninterrupted")
    result = run_cli(*fit_args(mnist_dir), cwd=root)
    assert result.returncode == 0, result.stderr[-2000:]
    return root


@pytest.mark.slow  # a whole run or several: in the slow suite, so the default one stays under 4 minutes
def test_killed_anywhere_and_resumed_ends_bit_for_bit_like_an_uninterrupted_run(tmp_path, mnist_dir, reference):
    # each entry: where the process kills itself; each run resumes the one before
    plan = [
        ("step", 5),  # mid-epoch, mid-step: last.ckpt is from step 3
        ("write", 2),  # halfway through writing a checkpoint file: the torn file is a .part, last.ckpt intact
        ("rename", 3),  # a complete new file not yet renamed over the old one
        ("link", 2),  # the copy that becomes last.ckpt complete, not yet renamed
        ("step", 20),  # resumed where an epoch ends (step 18), killed in the next epoch
        ("step", 26),
    ]
    for i, (moment, n) in enumerate(plan):
        resume = ["--ckpt_path", "last"] if i else []
        result = run_cli(moment, str(n), *fit_args(mnist_dir), *resume, cwd=tmp_path, script=KILLPOINTS)
        assert result.returncode == -signal.SIGKILL, (moment, n, result.stderr[-2000:])
        # what `--ckpt_path last` resumes from (last.ckpt, or the periodic file written just before it) is whole
        newest = newest_checkpoint(tmp_path / "checkpoints")
        assert newest is not None, (moment, n)
        load_checkpoint(newest)
    result = run_cli(*fit_args(mnist_dir), "--ckpt_path", "last", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert_same_run(tmp_path, reference)


@pytest.mark.slow  # a soak test on top of the planned kills above: in `pytest -m slow`, which CI runs too
def test_kills_from_outside_at_unplanned_moments_lose_nothing(tmp_path, mnist_dir, reference):
    checkpoints = tmp_path / "checkpoints"
    for delay in (0.0, 0.15, 0.3):
        resume = ["--ckpt_path", "last"] if newest_checkpoint(checkpoints) else []
        process = subprocess.Popen(
            [sys.executable, "-m", "mnist_lit", *fit_args(mnist_dir), *resume], cwd=tmp_path, env=cli_env(),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        start = time.monotonic()
        # the first run: as soon as its first checkpoint file appears; later ones: a while into training
        while time.monotonic() - start < 120 and process.poll() is None:
            if (not resume and any(checkpoints.glob("epoch=*.ckpt"))) or (resume and time.monotonic() - start > 6):
                break
            time.sleep(0.01)
        time.sleep(delay)
        process.kill()
        process.wait()
        torch.load(newest_checkpoint(checkpoints), weights_only=True)
    result = run_cli(*fit_args(mnist_dir), "--ckpt_path", "last", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert_same_run(tmp_path, reference)


def start_fit(cwd: Path, *options: str) -> subprocess.Popen:
    """`python -m mnist_lit OPTIONS` with Ctrl-C working as in a terminal (a background shell may ignore it)."""
    return subprocess.Popen(
        [sys.executable, "-m", "mnist_lit", *options],
        cwd=cwd,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def wait_for_handler(pid: int, sig: signal.Signals) -> None:
    """Until the process catches sig (Linux's /proc/PID/status lists the signals a process has handlers for)."""
    start = time.monotonic()
    while time.monotonic() - start < 60:
        status = Path(f"/proc/{pid}/status").read_text()
        caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
        if caught & (1 << (sig - 1)):
            return
        time.sleep(0.01)


def wait_for(pattern: str, folder: Path) -> None:
    start = time.monotonic()
    while not list(folder.glob(pattern)) and time.monotonic() - start < 120:
        time.sleep(0.01)


@pytest.mark.slow  # whole runs: in the slow suite, so the default one stays under 4 minutes
def test_ctrl_c_saves_a_resumable_checkpoint_and_exits_cleanly(tmp_path, mnist_dir, reference):
    process = start_fit(tmp_path, *fit_args(mnist_dir))
    wait_for("checkpoints/last.ckpt", tmp_path)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGINT, stderr[-2000:]
    assert "Traceback" not in stderr
    assert "SIGINT: stopped at step" in stderr
    step = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 0 < step < 27
    # the hint is the command that resumes this run, typed as shown in the folder it was started in
    hint = shlex.split(re.search(r"resume with `([^`]*)`", stderr)[1])
    assert hint == ["python", "-m", "mnist_lit", *fit_args(mnist_dir), "--ckpt_path", "last"], hint
    result = subprocess.run([sys.executable, *hint[1:]], cwd=tmp_path, env=cli_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert_same_run(tmp_path, reference)


@pytest.mark.slow  # whole runs: in the slow suite, so the default one stays under 4 minutes
def test_ctrl_c_without_last_ckpt_saves_a_periodic_file_and_says_which(tmp_path, mnist_dir):
    process = start_fit(tmp_path, *fit_args(mnist_dir), "--checkpoint.save_last", "false")
    wait_for("checkpoints/*.ckpt", tmp_path)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGINT and "Traceback" not in stderr, stderr[-2000:]
    (saved,) = (tmp_path / "checkpoints").glob("*.ckpt")
    step = torch.load(saved, weights_only=True)["global_step"]
    assert f"stopped at step {step} and saved {saved}" in stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_before_training_starts_is_one_line_and_writes_nothing(tmp_path, mnist_dir, sig):
    process = start_fit(tmp_path, *fit_args(mnist_dir))
    wait_for_handler(process.pid, signal.SIGTERM)  # installed first thing; torch and Lightning still importing
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + sig and "Traceback" not in stderr, stderr[-2000:]
    assert stderr.strip().splitlines() == [f"{sig.name}: stopped at once; nothing new was saved"]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # whole runs: in the slow suite, so the default one stays under 4 minutes
def test_sigterm_during_the_sanity_check_is_a_failure_status_not_success(tmp_path, mnist_dir):
    result = run_cli("sanity-term", "0", *fit_args(mnist_dir), cwd=tmp_path, script=KILLPOINTS)
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "SIGTERM: stopped at once; nothing new was saved"
    assert not list(tmp_path.rglob("*.ckpt")) and not (tmp_path / "lightning_logs").exists()


@pytest.mark.parametrize(
    "stop",
    [  # both in the slow suite (whole runs); test_ctrl_c_saves_... keeps a bit-exact resume in the default one
        pytest.param(["--trainer.max_steps", "13"], marks=pytest.mark.slow),
        pytest.param(["--trainer.max_time", "00:00:00:02"], marks=pytest.mark.slow),
    ],
)
def test_a_run_ended_by_a_limit_mid_epoch_resumes_exactly(tmp_path, mnist_dir, reference, stop):
    """max_steps or max_time stop a run in the middle of an epoch (step 13 of 27 lies in epoch 1, batch 4 of 9):
    the rest of that epoch is trained on resume, and the run ends where an uninterrupted one does."""
    slow = ["slow", "150"] if "--trainer.max_time" in stop else ["slow", "0"]  # 27 steps: 4 s, past the limit
    result = run_cli(*slow, *fit_args(mnist_dir), *stop, cwd=tmp_path, script=KILLPOINTS)
    assert result.returncode == 0, result.stderr[-2000:]
    step = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 0 < step < 27
    if "--trainer.max_time" in stop:
        assert f"stopped by --trainer.max_time at step {step}" in result.stderr
    result = run_cli(*fit_args(mnist_dir), "--ckpt_path", "last", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert_same_run(tmp_path, reference)


@pytest.mark.slow  # a whole run or several: in the slow suite, so the default one stays under 4 minutes
def test_more_epochs_from_a_finished_run_equal_one_longer_run(tmp_path, mnist_dir, reference):
    """last.ckpt written at the end of fit (step 18, between the every-3-step saves... and off the grid of 10)
    resumes as exactly as one written mid-run."""
    shorter = [*fit_args(mnist_dir, epochs=2)]
    shorter[shorter.index("3", shorter.index("--checkpoint.every_n_train_steps"))] = "4"
    assert run_cli(*shorter, cwd=tmp_path).returncode == 0
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 18
    result = run_cli(*fit_args(mnist_dir), "--ckpt_path", "last", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert_same_run(tmp_path, reference)


@pytest.mark.slow  # a whole run or several: in the slow suite, so the default one stays under 4 minutes
def test_a_step_limit_at_an_epochs_end_resumes_with_the_next_epoch(tmp_path, mnist_dir, reference):
    # with max_steps, Lightning 2.6 alone resumes a checkpoint taken between two epochs into a skipped epoch
    assert run_cli(*fit_args(mnist_dir), "--trainer.max_steps", "9", cwd=tmp_path).returncode == 0
    result = run_cli(*fit_args(mnist_dir), "--trainer.max_steps", "27", "--ckpt_path", "last", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert_same_run(tmp_path, reference)


@pytest.mark.slow  # three runs
def test_ctrl_c_under_gradient_accumulation_stops_at_a_step_and_resumes_exactly(tmp_path, mnist_dir):
    accumulate = ["--trainer.accumulate_grad_batches", "2"]
    whole, run = tmp_path / "whole", tmp_path / "run"
    whole.mkdir(), run.mkdir()
    assert run_cli(*fit_args(mnist_dir), *accumulate, cwd=whole).returncode == 0
    # 5 steps an epoch (batches 2, 4, 6, 8 and the last, 9); batch 10, epoch 1's first, only sums its gradients:
    # the stop waits for batch 11, step 6
    result = run_cli("batch-int", "10", *fit_args(mnist_dir), *accumulate, cwd=run, script=KILLPOINTS)
    assert result.returncode == 128 + signal.SIGINT, result.stderr[-2000:]
    assert "SIGINT: stopped at step 6 and saved" in result.stderr
    result = run_cli(*fit_args(mnist_dir), *accumulate, "--ckpt_path", "last", cwd=run)
    assert result.returncode == 0, result.stderr[-2000:]
    assert_same_run(run, whole)


@pytest.mark.slow  # whole runs: in the slow suite, so the default one stays under 4 minutes
def test_ctrl_c_in_the_last_validation_keeps_the_finished_run_and_says_so(tmp_path, mnist_dir):
    result = run_cli("val-int", "3", *fit_args(mnist_dir), cwd=tmp_path, script=KILLPOINTS)  # epoch 2 of 3 validates
    assert result.returncode == 128 + signal.SIGINT and "Traceback" not in result.stderr, result.stderr[-2000:]
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert f"SIGINT: came as training ended at step 27; the final weights are in {last}" in result.stderr
    assert torch.load(last, weights_only=True)["callbacks"]["TrainingCurves"]["val"][:, 0].tolist() == [9, 18, 27]


@pytest.mark.slow  # guards a workaround inside Lightning's loops: a Lightning upgrade fails it in CI's slow suite
def test_a_checkpoint_taken_after_an_epochs_last_batch_resumes_exactly(tmp_path, mnist_dir, reference):
    """mnist_lit waits for an epoch's end to save there; a ModelCheckpoint of the user's own (or an older mnist_lit)
    saves right after the last batch. Lightning 2.6 alone resumes such a file into a miscounted epoch."""
    theirs = ["--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.dirpath", str(tmp_path / "theirs"),
              "--trainer.callbacks.every_n_train_steps", "9",
              "--trainer.callbacks.save_on_train_epoch_end", "false"]  # fmt: skip
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    assert run_cli(*fit_args(mnist_dir, epochs=1), *theirs, cwd=first).returncode == 0
    saved = tmp_path / "theirs" / "epoch=0-step=9.ckpt"
    progress = torch.load(saved, weights_only=True)["loops"]["fit_loop"]["epoch_loop.batch_progress"]
    assert progress["is_last_batch"] and progress["total"]["completed"] == 8  # saved inside the last batch's end
    result = run_cli(*fit_args(mnist_dir), "--ckpt_path", str(saved), cwd=second)
    assert result.returncode == 0, result.stderr[-2000:]
    assert_same_run(second, reference)


# ReduceLROnPlateau on val/loss in 'max' mode, patience 0: the rate drops after every epoch's validation but the
# first, so a resume that skipped or missed one validation, or one step of the schedule, ends elsewhere.
PLATEAU = ["--model.lr_scheduler", "torch.optim.lr_scheduler.ReduceLROnPlateau",
           "--model.lr_scheduler.mode", "max", "--model.lr_scheduler.patience", "0"]  # fmt: skip


@pytest.mark.slow  # a whole run or several: in the slow suite, so the default one stays under 4 minutes
def test_stops_around_an_epochs_end_resume_with_its_validation_and_its_plateau_step(tmp_path, mnist_dir):
    """Step 9 ends epoch 0 and is due a checkpoint: it is taken after the epoch's validation and schedule step (at
    epoch 1's start), never before them, so whichever way a run stops there, the resume skips neither."""
    whole, run = tmp_path / "whole", tmp_path / "run"
    whole.mkdir(), run.mkdir()
    fit = [*fit_args(mnist_dir), *PLATEAU]
    assert run_cli(*fit, cwd=whole).returncode == 0
    # Ctrl-C in epoch 0's validation: the validation ends, then the run stops at epoch 1's start with a checkpoint
    result = run_cli("val-int", "1", *fit, cwd=run, script=KILLPOINTS)
    assert result.returncode == 128 + signal.SIGINT, result.stderr[-2000:]
    assert f"SIGINT: stopped at step 9 and saved {run / 'checkpoints' / 'last.ckpt'}" in result.stderr
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1  # one epoch done
    # killed inside epoch 1's validation: the resume retrains the end of epoch 1 and validates it again
    result = run_cli("val", "1", *fit, "--ckpt_path", "last", cwd=run, script=KILLPOINTS)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    assert 9 < load_checkpoint(newest_checkpoint(run / "checkpoints"))["global_step"] < 18
    # a run that ends with epoch 1, then one more epoch
    assert run_cli(*fit_args(mnist_dir, epochs=2), *PLATEAU, "--ckpt_path", "last", cwd=run).returncode == 0
    assert run_cli(*fit, "--ckpt_path", "last", cwd=run).returncode == 0
    assert_same_run(run, whole)
    x, y = (torch.load(root / "checkpoints" / "last.ckpt", weights_only=True) for root in (run, whole))
    assert x["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(0.01 * 0.1**2)  # after epochs 1 and 2
    assert x["lr_schedulers"] == y["lr_schedulers"]
    val = x["callbacks"]["TrainingCurves"]["val"]
    assert val[:, 0].tolist() == [9, 18, 27] and torch.equal(val, y["callbacks"]["TrainingCurves"]["val"])


@pytest.mark.slow
def test_a_run_with_early_stopping_killed_and_resumed_stops_where_an_uninterrupted_one_does(tmp_path, mnist_dir):
    # patience 1 and an improvement no epoch reaches: validation at the end of epoch 1 stops the run at step 18
    early = ["--trainer.callbacks+=EarlyStopping", "--trainer.callbacks.monitor", "val/loss",
             "--trainer.callbacks.min_delta", "10", "--trainer.callbacks.patience", "1"]  # fmt: skip
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    whole.mkdir(), stopped.mkdir()
    result = run_cli(*fit_args(mnist_dir, epochs=6), *early, cwd=whole)
    assert result.returncode == 0, result.stderr[-2000:]
    assert torch.load(whole / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 18
    killed = run_cli("step", "14", *fit_args(mnist_dir, epochs=6), *early, cwd=stopped, script=KILLPOINTS)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    result = run_cli(*fit_args(mnist_dir, epochs=6), *early, "--ckpt_path", "last", cwd=stopped)
    assert result.returncode == 0, result.stderr[-2000:]
    assert_same_run(stopped, whole)


def test_a_run_resumed_mid_epoch_shows_its_epoch_and_the_batches_it_will_run(tmp_path, mnist_dir, run_main):
    fit = ["fit", "--data.data_dir", str(mnist_dir), *SYNTHETIC, "--trainer.enable_model_summary", "false"]
    assert run_main(*fit, "--trainer.max_steps", "4", "--trainer.enable_progress_bar", "false", cwd=tmp_path)[0] == 0
    status, out, err = run_main(*fit, "--trainer.max_steps", "8", "--ckpt_path", "last", cwd=tmp_path)
    assert status == 0, err
    drawn = out.replace("\r", "\n").splitlines()  # Lightning's training bar goes to stdout
    # Lightning starts no epoch on a mid-epoch resume: the bar is named and sized all the same (4 done, 4 to go)
    bars = [line for line in drawn if "|" in line]
    assert bars[-1].startswith("Epoch 0: 100%") and "8/8" in bars[-1], bars[-3:]


@pytest.mark.slow  # three runs
def test_a_run_with_shifted_images_killed_and_resumed_ends_bit_for_bit_like_an_uninterrupted_one(tmp_path, mnist_dir):
    """--data.shift draws its offsets from the random stream the checkpoint saves: a resume draws the same ones."""
    shift = [*fit_args(mnist_dir, epochs=2), "--data.shift", "2"]
    (tmp_path / "whole").mkdir()
    assert run_cli(*shift, cwd=tmp_path / "whole").returncode == 0
    (tmp_path / "killed").mkdir()
    killed = run_cli("step", "11", *shift, cwd=tmp_path / "killed", script=KILLPOINTS)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = run_cli(*shift, "--ckpt_path", "last", cwd=tmp_path / "killed")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_run(tmp_path / "whole", tmp_path / "killed")
    (tmp_path / "plain").mkdir()  # and the shift does move the run
    assert run_cli(*fit_args(mnist_dir, epochs=2), cwd=tmp_path / "plain").returncode == 0
    plain = torch.load(tmp_path / "plain" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    shifted = torch.load(tmp_path / "whole" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert not torch.equal(plain["net.fc2.weight"], shifted["net.fc2.weight"])


def test_a_resumed_fit_goes_on_logging_in_its_runs_folder(tmp_path, mnist_dir, run_main):
    """One run, one line in TensorBoard: a resume writes to the version folder its checkpoint records, while that
    folder is there; a run whose folder is gone gets a new one."""
    fit = ["fit", "--data.data_dir", str(mnist_dir), *SYNTHETIC, *QUIET, "--trainer.max_epochs"]
    assert run_main(*fit, "1", cwd=tmp_path)[0] == 0
    assert run_main(*fit, "2", "--ckpt_path", "last", cwd=tmp_path)[0] == 0
    logs = tmp_path / "lightning_logs"
    assert [p.name for p in logs.iterdir()] == ["version_0"]
    assert len(list((logs / "version_0").glob("events.out.tfevents.*"))) == 2  # the run's, then the resume's
    assert "max_epochs: 2\n" in (logs / "version_0" / "config.yaml").read_text()  # the resume's, once it trained
    shutil.rmtree(logs / "version_0")
    assert run_main(*fit, "3", "--ckpt_path", "last", cwd=tmp_path)[0] == 0
    assert [p.name for p in logs.iterdir()] == ["version_0"] and (logs / "version_0" / "config.yaml").is_file()
