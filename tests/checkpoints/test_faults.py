"""Real faults: a full disk, two runs in one folder, bit rot, and signals and deaths under DDP."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers.cli import KILLPOINTS, QUIET, SYNTHETIC, assert_clean_error, cli_env, run_cli
from helpers.disk import fill, small_filesystem

from mnist_lit.checkpoints.files import DIGEST_KEY, load_checkpoint
from mnist_lit.errors import CheckpointError


def fit_args(data: Path, *extra: str) -> list[str]:
    return ["fit", "--data.data_dir", str(data), *SYNTHETIC, *QUIET, "--checkpoint.every_n_train_steps", "3", *extra]


@pytest.fixture(scope="module")
def trained(trained_run):
    """A finished 2-epoch run (18 steps): checkpoints/last.ckpt and the periodic file of step 18 (conftest's)."""
    return trained_run


# --- a full disk ------------------------------------------------------------------------------------------------


@pytest.mark.slow  # whole runs: in the slow suite, so the default one stays under 4 minutes
@pytest.mark.parametrize("save_last", ["true", "false"])
def test_a_full_disk_ends_the_run_in_one_line_and_keeps_every_earlier_checkpoint(
    tmp_path, mnist_dir, trained, save_last
):
    size = (trained / "checkpoints" / "last.ckpt").stat().st_size
    with small_filesystem(tmp_path / "disk", "4m") as disk:
        # room for the files kept at a time (2 with last.ckpt, 1 without) and half of the next one's temporary
        fill(disk, int(size * (2.5 if save_last == "true" else 1.5)))
        result = run_cli(
            *fit_args(mnist_dir, "--trainer.max_epochs", "2", "--checkpoint.dirpath", str(disk / "ckpts")),
            "--checkpoint.save_last", save_last, cwd=tmp_path,
        )  # fmt: skip
        assert_clean_error(result, "could not write checkpoint", str(disk / "ckpts"), "No space left on device")
        kept = sorted((disk / "ckpts").glob("*.ckpt"))
        assert kept, "the only checkpoint was deleted"
        assert not list((disk / "ckpts").glob("*.part"))
        for path in kept:
            assert load_checkpoint(path)["global_step"] == 3  # intact: its digest matches
        assert f"the checkpoints written before it are intact (newest: {disk / 'ckpts'}" in result.stderr


# --- two runs in one folder -------------------------------------------------------------------------------------
@pytest.mark.slow  # whole runs: in the slow suite, so the default one stays under 4 minutes
def test_two_fits_started_together_in_one_folder_one_runs_and_one_refuses_at_once(tmp_path, mnist_dir):
    command = [sys.executable, "-m", "mnist_lit", *fit_args(mnist_dir, "--trainer.max_epochs", "6")]
    runs = [
        subprocess.Popen(
            command, cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    results = [(run.pid, *run.communicate(timeout=300), run.returncode) for run in runs]
    outcomes = sorted(results, key=lambda r: r[3])
    (winner_pid, _, _, winner_status), (_, _, refused_err, refused_status) = outcomes
    assert winner_status == 0 and refused_status != 0, results
    refusal = refused_err.strip().splitlines()[-1]
    assert refusal.startswith("error: ") and "Traceback" not in refused_err
    # refused by the lock while the other runs, or (had it started after the other ended) by its last.ckpt
    assert f"is in use by another fit (PID {winner_pid})" in refusal or "holds an earlier run" in refusal, refusal
    versions = list((tmp_path / "lightning_logs").iterdir())
    assert len(versions) == 1  # the refused run left no log folder
    assert load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 54
    assert not (tmp_path / "checkpoints" / ".lock").exists()  # released at the end


@pytest.mark.slow  # a fit slowed down to outlast two more commands
def test_test_of_a_running_fits_last_checkpoint_is_allowed_while_a_second_fit_is_refused(tmp_path, mnist_dir):
    fit = subprocess.Popen(
        [sys.executable, *KILLPOINTS, "slow", "300", *fit_args(mnist_dir, "--trainer.max_epochs", "20")],
        cwd=tmp_path, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        start = time.monotonic()
        while not (tmp_path / "checkpoints" / "last.ckpt").exists() and time.monotonic() - start < 120:
            time.sleep(0.05)
        second = run_cli(*fit_args(mnist_dir), "--ckpt_path", "last", cwd=tmp_path)
        assert_clean_error(second, f"{tmp_path / 'checkpoints'} is in use by another fit (PID {fit.pid})")
        tested = run_cli("test", "--ckpt_path", "last", "--data.data_dir", str(mnist_dir), *SYNTHETIC, *QUIET,
                         cwd=tmp_path)  # fmt: skip
        assert tested.returncode == 0, tested.stderr[-2000:]
        assert fit.poll() is None, "the fit ended before the checks ran: slow it down"
    finally:
        fit.kill()
        fit.wait()
    # the OS released the killed holder's lock: the run resumes
    resumed = run_cli(*fit_args(mnist_dir, "--trainer.max_epochs", "20"), "--ckpt_path", "last", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]


# --- bit rot ----------------------------------------------------------------------------------------------------


def flip(path: Path, tensor: torch.Tensor, count: int = 64) -> None:
    """Flip `count` bytes of one tensor's data where it lies in the file, as bit rot would."""
    data = bytearray(path.read_bytes())
    raw = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    at = data.find(raw[:256])
    assert at >= 0 and data.find(raw[:256], at + 1) < 0
    for i in range(at + 16, at + 16 + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.slow  # a whole run or several: in the slow suite, so the default one stays under 4 minutes
def test_bit_rot_in_the_weights_is_refused_and_the_intact_copy_named(tmp_path, mnist_dir, trained):
    root = tmp_path / "run"
    shutil.copytree(trained, root)
    last = root / "checkpoints" / "last.ckpt"
    (periodic,) = (root / "checkpoints").glob("epoch=*.ckpt")
    assert os.stat(last).st_ino != os.stat(periodic).st_ino  # two files: damage to one spares the other
    flip(last, torch.load(last, weights_only=True)["state_dict"]["net.fc1.weight"])
    result = run_cli("test", "--ckpt_path", "last", "--data.data_dir", str(mnist_dir), *SYNTHETIC, *QUIET, cwd=root)
    assert_clean_error(
        result,
        f"{last} is damaged: its contents do not match the checksum written with it",
        f"the newest intact checkpoint beside it is {periodic}",
    )
    assert not (root / "lightning_logs" / "version_2").exists()  # a failed test leaves no log folder
    result = run_cli("test", "--ckpt_path", str(periodic), "--data.data_dir", str(mnist_dir), *SYNTHETIC, *QUIET,
                     cwd=root)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.slow  # whole runs: in the slow suite, so the default one stays under 4 minutes
def test_bit_rot_in_the_momentum_buffers_is_refused_on_resume(tmp_path, mnist_dir, trained):
    root = tmp_path / "run"
    shutil.copytree(trained, root)
    last = root / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=True)["optimizer_states"][0]["state"]
    flip(last, max(state.values(), key=lambda s: s["momentum_buffer"].numel())["momentum_buffer"])
    result = run_cli(*fit_args(mnist_dir, "--trainer.max_epochs", "3"), "--ckpt_path", "last", cwd=root)
    assert_clean_error(result, "is damaged", "the newest intact checkpoint beside it is")


def test_a_checkpoint_of_ours_without_its_digest_is_refused_and_one_from_elsewhere_loads(tmp_path, trained):
    # Damage that hits the digest's own key must not pass the file off as one that never had a digest.
    checkpoint = torch.load(trained / "checkpoints" / "last.ckpt", weights_only=True)
    del checkpoint[DIGEST_KEY]
    torch.save(checkpoint, tmp_path / "stripped.ckpt")
    with pytest.raises(CheckpointError, match="written by mnist_lit but carries no checksum"):
        load_checkpoint(tmp_path / "stripped.ckpt")
    # A plain Lightning checkpoint of the same Net, written by other code: nothing to check it against, it loads.
    plain = {k: checkpoint[k] for k in ("state_dict", "pytorch-lightning_version", "epoch", "global_step")}
    torch.save(plain, tmp_path / "plain.ckpt")
    assert load_checkpoint(tmp_path / "plain.ckpt")["global_step"] == 18


# --- DDP: a process that dies or is signalled takes the others down, in one line each ---------------------------

DDP = ["--trainer.strategy", "ddp", "--trainer.accelerator", "cpu", "--trainer.devices", "2"]


def run_ddp(tmp_path: Path, data: Path, moment: str, n: int, *extra: str) -> subprocess.CompletedProcess:
    start = time.monotonic()
    result = run_cli(moment, str(n), *fit_args(data, *DDP, "--trainer.max_epochs", "3", *extra), cwd=tmp_path,
                     script=KILLPOINTS, timeout=180)  # fmt: skip
    result.elapsed = time.monotonic() - start
    return result


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(("error:", "SIGTERM", "SIGINT"))]


@pytest.mark.slow
def test_ddp_sigterm_to_one_process_during_the_sanity_check_ends_every_process_without_hanging(tmp_path, mnist_dir):
    result = run_ddp(tmp_path, mnist_dir, "sanity-term", 1)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.elapsed < 120
    assert 1 <= len(error_lines(result.stderr)) <= 2, result.stderr[-3000:]


@pytest.mark.slow
def test_ddp_a_process_killed_mid_training_ends_the_other_in_one_line(tmp_path, mnist_dir):
    result = run_ddp(tmp_path, mnist_dir, "rank1-kill", 5)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "another process of this DDP run stopped" in result.stderr, result.stderr[-3000:]
    assert len(error_lines(result.stderr)) == 1


@pytest.mark.slow
def test_ddp_ctrl_c_of_one_process_stops_both_at_one_batch_with_a_checkpoint(tmp_path, mnist_dir):
    result = run_ddp(tmp_path, mnist_dir, "rank1-int", 5)
    assert result.returncode == 128 + signal.SIGINT, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 5


def test_signal_handling_still_replaces_lightnings_own(tmp_path):
    """mnist_lit switches off Lightning's SIGTERM handler through a private attribute: fail loudly if it goes."""
    from lightning.pytorch import Trainer

    trainer = Trainer(default_root_dir=tmp_path, logger=False, enable_checkpointing=False)
    assert callable(trainer._signal_connector.register_signal_handlers)


@pytest.mark.slow
def test_ddp_a_full_disk_ends_every_process_in_one_line_each(tmp_path, mnist_dir, trained):
    size = (trained / "checkpoints" / "last.ckpt").stat().st_size
    with small_filesystem(tmp_path / "disk", "4m") as disk:
        fill(disk, int(size * 2.5))
        start = time.monotonic()
        result = run_cli(*fit_args(mnist_dir, *DDP, "--trainer.max_epochs", "3", "--checkpoint.dirpath",
                                   str(disk / "ckpts")), cwd=tmp_path, timeout=180)  # fmt: skip
        assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
        assert time.monotonic() - start < 120
        lines = error_lines(result.stderr)
        assert any("No space left on device" in line for line in lines) and len(lines) <= 2, result.stderr[-3000:]
        assert load_checkpoint(disk / "ckpts" / "last.ckpt")["global_step"] == 3
