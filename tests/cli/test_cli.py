"""The command line as a user runs it: subprocesses, a fit -> test round trip, resume, defaults, errors."""

from __future__ import annotations

import gc
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers.cli import QUIET, SYNTHETIC, assert_clean_error, printed_metrics, run_cli
from helpers.mnist import guide_evaluation

from mnist_lit.cli.cores import BusyWatch, busy_elsewhere, cores, share_cores


def fit_args(data: Path, *extra: str) -> list[str]:
    return ["fit", "--data.data_dir", str(data), *SYNTHETIC, *QUIET, "--trainer.max_epochs", "1", *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mnist_dir):
    """A finished 1-epoch run on synthetic data, shared by the tests that only read it."""
    root = tmp_path_factory.mktemp("run")
    result = run_cli(*fit_args(mnist_dir, "--model.lr", "0.1", "--trainer.max_epochs", "2"), cwd=root)
    assert result.returncode == 0, result.stderr[-2000:]
    return root


@pytest.mark.slow  # a whole run: in the slow suite (tests/datasets/test_mnist.py does it on the real files too)
def test_fit_then_test_in_another_process_uses_the_trained_weights(trained, mnist_dir, monkeypatch):
    monkeypatch.setenv("PYTHONWARNINGS", "default::UserWarning")  # what users see of Lightning's warnings
    result = run_cli("test", "--ckpt_path", "last", "--data.data_dir", str(mnist_dir), *SYNTHETIC, *QUIET, cwd=trained)
    assert result.returncode == 0, result.stderr[-2000:]
    printed = printed_metrics(result.stdout)
    # the guide's own model and test code on the checkpoint's weights give the numbers printed
    acc, loss = guide_evaluation(trained / "checkpoints" / "last.ckpt", mnist_dir, verify=False)
    assert printed["test/acc"] == pytest.approx(acc, abs=1e-6)
    assert printed["test/loss"] == pytest.approx(loss, rel=1e-5)
    assert acc > 0.8  # trained: random weights score 0.1
    assert {f"test/acc_{d}" for d in range(10)} <= printed.keys()
    assert "Be aware" not in result.stderr  # no nag about the fit-only curves callback


@pytest.mark.slow  # shares a whole run with the test above
def test_checkpoints_and_logs_go_where_the_readme_says(trained):
    names = {p.name for p in (trained / "checkpoints").iterdir()}
    assert names == {"last.ckpt", "epoch=1-step=10.ckpt"}  # every 10 steps, and last.ckpt at the end
    assert torch.load(trained / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 18
    version = trained / "lightning_logs" / "version_0"
    assert (version / "config.yaml").is_file() and list(version.glob("events.out.tfevents.*"))


@pytest.mark.slow  # a whole run or several: in the slow suite, so the default one stays under 4 minutes
def test_without_last_ckpt_the_final_weights_are_a_periodic_file_that_test_last_finds(tmp_path, mnist_dir):
    # 9 steps, saves every 4: steps 4 and 8 are periodic, step 9 is the end of training
    fit = fit_args(mnist_dir, "--checkpoint.save_last", "false")
    result = run_cli(*fit, "--checkpoint.every_n_train_steps", "4", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert [p.name for p in (tmp_path / "checkpoints").glob("*.ckpt")] == ["epoch=1-step=9.ckpt"]
    result = run_cli("test", "--ckpt_path", "last", "--data.data_dir", str(mnist_dir), *SYNTHETIC, *QUIET, cwd=tmp_path)
    assert result.returncode == 0 and "epoch=1-step=9.ckpt" in result.stdout + result.stderr, result.stderr[-2000:]


@pytest.mark.slow  # a whole run or several: in the slow suite, so the default one stays under 4 minutes
def test_resume_continues_the_step_counter(tmp_path, mnist_dir):
    assert run_cli(*fit_args(mnist_dir), cwd=tmp_path).returncode == 0
    result = run_cli(*fit_args(mnist_dir, "--ckpt_path", "last", "--trainer.max_epochs", "2"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert (checkpoint["global_step"], checkpoint["epoch"]) == (
        18,
        2,
    )  # the end-of-fit checkpoint counts the finished epoch
    assert "Restored all states from the checkpoint" in result.stdout + result.stderr


def test_no_checkpoint_is_a_clear_error(tmp_path, mnist_dir, run_main):
    status, _, err = run_main("test", "--ckpt_path", "last", "--data.data_dir", str(mnist_dir), cwd=tmp_path)
    result = subprocess.CompletedProcess([], status, "", err)
    assert_clean_error(result, "no checkpoint to load", str(tmp_path / "checkpoints" / "last.ckpt"))
    for command in ("fit", "validate", "predict"):
        status, _, err = run_main(command, "--ckpt_path", "last", "--data.data_dir", str(mnist_dir), cwd=tmp_path)
        assert status != 0 and err.startswith("error: no checkpoint") and str(tmp_path / "checkpoints") in err
    # a relative root is named by its full path, the one that was looked in
    status, _, err = run_main("test", "--ckpt_path", "last", "--trainer.default_root_dir", "runs/a", cwd=tmp_path)
    assert status != 0 and str(tmp_path / "runs" / "a" / "checkpoints" / "last.ckpt") in err
    assert list(tmp_path.iterdir()) == []


def test_a_new_fit_refuses_to_overwrite_an_earlier_run(trained_run, mnist_dir, run_main, tmp_path):
    run = shutil.copytree(trained_run, tmp_path / "run")
    before = (run / "checkpoints" / "last.ckpt").read_bytes()
    status, _, err = run_main(*fit_args(mnist_dir), cwd=run)
    assert_clean_error(subprocess.CompletedProcess([], status, "", err), "holds an earlier run", "--ckpt_path last")
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == before


@pytest.mark.slow  # a whole run or several: in the slow suite, so the default one stays under 4 minutes
def test_with_logging_off_the_users_own_files_in_the_root_are_kept(tmp_path, mnist_dir, run_main):
    """Without a logger the run's folder is the root itself: nothing already there may be replaced."""
    off = ["--trainer.logger", "false"]
    (tmp_path / "config.yaml").write_text("# my own config\n")
    assert run_main(*fit_args(mnist_dir, *off), cwd=tmp_path)[0] == 0
    (tmp_path / "confusion.png").write_bytes(b"my own figure")
    again = ["test", "--ckpt_path", "last", "--data.data_dir", str(mnist_dir), *SYNTHETIC, *QUIET, *off]
    for _ in range(2):
        status, _, err = run_main(*again, cwd=tmp_path)
        assert status == 0, err[-2000:]
    assert (tmp_path / "config.yaml").read_text() == "# my own config\n"
    assert (tmp_path / "confusion.png").read_bytes() == b"my own figure"
    assert (tmp_path / "confusion-1.png").is_file() and (tmp_path / "confusion-2.png").is_file()


def test_print_config_shows_the_guides_defaults(tmp_path, run_main):
    status, config, err = run_main("fit", "--print_config", cwd=tmp_path)
    assert status == 0, err
    for line in (
        "seed_everything: 1",
        "max_epochs: 10",
        "class_path: torch.optim.SGD",  # the guide's optimizer, fused (same numbers, faster)
        "lr: 0.01",
        "momentum: 0.5",
        "fused: true",
        "lr_scheduler: null",
        "batch_size: 64",
        "test_batch_size: 1000",
        "val_size: 5000",
        "every_n_train_steps: 10",
        "data_dir: ~/.torch/datasets/mnist",
    ):
        assert line in config, line


@pytest.mark.slow  # a whole run or several: in the slow suite, so the default one stays under 4 minutes
def test_overrides_and_config_files_stack(tmp_path):
    (tmp_path / "a.yaml").write_text(
        "model:\n  optimizer:\n    init_args:\n      momentum: 0.8\ndata:\n  batch_size: 32\n"
    )
    result = run_cli("fit", "--config", "a.yaml", "--model.optimizer.lr", "0.05", "--print_config", cwd=tmp_path)
    assert "lr: 0.05" in result.stdout and "momentum: 0.8" in result.stdout and "batch_size: 32" in result.stdout
    # --model.lr and --model.momentum, the options before the optimizer was one, still mean SGD's
    result = run_cli("fit", "--model.lr", "0.03", "--model.momentum=0.7", "--print_config", cwd=tmp_path)
    assert "lr: 0.03" in result.stdout and "momentum: 0.7" in result.stdout, result.stderr


def test_help_lists_the_options_with_their_docs(tmp_path, run_main):
    status, shown, _ = run_main("fit", "--help", cwd=tmp_path)
    assert status == 0
    assert "--model.optimizer" in shown and "the guide's SGD, lr 0.01, momentum 0.5" in shown
    assert "--checkpoint.every_n_train_steps" in shown
    assert "export" in run_cli("--help", cwd=tmp_path).stdout  # the top-level help, as python -m prints it


# The command as `python -m mnist_lit` runs it, saying at exit how Python's cycle collector was left
COLLECTOR = (
    "import atexit, gc, sys\n"
    "atexit.register(lambda: print('collector', gc.isenabled(), gc.get_freeze_count(), file=sys.stderr))\n"
    "from mnist_lit.__main__ import main\n"
    "main()\n"
)


def test_start_up_imports_are_frozen_out_of_the_collectors_passes_and_it_runs_after(tmp_path):
    result = run_cli("fit", "--help", cwd=tmp_path, script=["-c", COLLECTOR])
    assert result.returncode == 0 and "--model.optimizer" in result.stdout, result.stderr[-2000:]
    enabled, frozen = re.search(r"^collector (\w+) (\d+)$", result.stderr, re.M).groups()
    assert enabled == "True"  # on again for everything the command builds after its imports
    assert int(frozen) > 100_000  # torch's, Lightning's and the command line's objects: hundreds of thousands


def test_a_process_that_imported_torch_before_is_not_frozen():
    # A test (or a sweep) calling main in a process of its own: what it built so far is not start-up's alone, and
    # freezing it would keep its garbage for good
    from mnist_lit.__main__ import _import_uncollected

    frozen = gc.get_freeze_count()
    _import_uncollected()
    assert gc.isenabled() and gc.get_freeze_count() == frozen


def test_checkpointing_can_be_switched_off_and_the_run_says_so(tmp_path, mnist_dir, run_main):
    for off in (["--trainer.enable_checkpointing", "false"], ["--checkpoint.save_last", "false",
                                                              "--checkpoint.save_top_k", "0"]):  # fmt: skip
        root = tmp_path / off[0].rpartition(".")[2]
        root.mkdir()
        status, _, err = run_main(*fit_args(mnist_dir, *off), cwd=root)
        assert status == 0, err[-2000:]
        assert not list(root.glob("checkpoints/*.ckpt"))
        assert "note: this fit saves no checkpoint" in err  # not a silent loss of the run's work


def test_progress_bar_shows_loss_and_throughput(tmp_path, mnist_dir, run_main):
    args = ["fit", "--data.data_dir", str(mnist_dir), *SYNTHETIC, "--trainer.max_epochs", "1"]
    status, out, err = run_main(*args, cwd=tmp_path)
    assert status == 0, err[-2000:]
    assert re.search(r"Epoch 0: 100%.*loss=[\d.]+.*img/s=\d+", out + err), (out + err)[-2000:]


def test_processes_share_the_cores_unless_omp_num_threads_says_otherwise(monkeypatch):
    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0))
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        share_cores(processes=1, workers=0)
        assert torch.get_num_threads() == cores
        share_cores(processes=3, workers=0)
        assert torch.get_num_threads() == max(1, cores // 3)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(cores)
        share_cores(processes=2, workers=0)
        assert torch.get_num_threads() == cores
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(len(cores()) < 2, reason="one core: no thread to give up")
def test_a_busy_machine_gets_one_thread_fewer_per_busy_core_said_in_one_line(monkeypatch, capsys):
    """Two processes that each run a thread per core slow each other many times over (fit beside a busy process
    here: 3,500 images/s with two threads, 10,000 with one). A resume keeps its run's count: bit for bit."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before, share = torch.get_num_threads(), len(cores())
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        assert busy_elsewhere(cores()) > 0.6
        share_cores(processes=1, workers=0)
        assert torch.get_num_threads() == share - 1
        note = capsys.readouterr().err.strip().splitlines()
        assert (
            len(note) == 1
            and note[0].startswith("note: other processes keep")
            and f"OMP_NUM_THREADS={share - 1}" in note[0]
        )
        share_cores(processes=1, workers=0, recorded=share)  # a resume of a run that trained with every core
        assert torch.get_num_threads() == share and "this resume keeps its run's" in capsys.readouterr().err
    finally:
        burner.kill()
        burner.wait()
        torch.set_num_threads(before)
    share_cores(processes=1, workers=0)  # idle again: every core
    assert torch.get_num_threads() == share and capsys.readouterr().err == ""
    torch.set_num_threads(before)


@pytest.mark.skipif(len(cores()) < 2, reason="one core: no thread to give up")
def test_a_fit_that_another_process_starts_beside_goes_on_with_fewer_threads(monkeypatch):
    """Two fits started together each found the other idle at its start (both loading), then ran 2 threads each on
    2 cores: 28 s each for 1,000 steps here, against 15 s once each went on with one thread."""
    from types import SimpleNamespace

    before, printed = torch.get_num_threads(), []
    module = SimpleNamespace(print=lambda *a, **k: printed.append(" ".join(map(str, a))))
    watch = BusyWatch(every=0.3)
    torch.set_num_threads(len(cores()))
    watch.on_train_start(SimpleNamespace(world_size=1), module)
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.6)
        watch.on_train_batch_end(SimpleNamespace(world_size=1), module)
        assert torch.get_num_threads() == len(cores()) - 1, printed
        assert len(printed) == 1 and printed[0].startswith("note: other processes now keep")
        fixed = BusyWatch(every=0.3)
        fixed.fixed = True  # OMP_NUM_THREADS, or a resume that keeps its run's count
        torch.set_num_threads(len(cores()))
        fixed.on_train_start(SimpleNamespace(world_size=1), module)
        time.sleep(0.6)
        fixed.on_train_batch_end(SimpleNamespace(world_size=1), module)
        assert torch.get_num_threads() == len(cores()) and len(printed) == 1
    finally:
        burner.kill()
        burner.wait()
        torch.set_num_threads(before)
