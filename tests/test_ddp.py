"""Several processes (DDP on CPU): exact metrics, disjoint shards, one writer, resume with another world size."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers.cli import QUIET, ROOT, SYNTHETIC, printed_metrics, run_cli
from helpers.mnist import write_mnist

DDP = ["--trainer.strategy", "ddp", "--trainer.accelerator", "cpu"]
PROBE = [str(ROOT / "tests" / "helpers" / "ddp_probe.py")]


@pytest.fixture(scope="module")
def big_mnist(tmp_path_factory):
    # 6400 training images after the 64 held out: 50 steps per epoch for 2 processes of 64, 100 for one
    return write_mnist(tmp_path_factory.mktemp("big"), train=6464, test=200)


@pytest.mark.slow  # a whole run or several: in the slow suite, so the default one stays under 4 minutes
def test_ddp_test_metrics_equal_a_single_process_exactly(tmp_path, mnist_dir, run_main):
    fit = ["fit", "--data.data_dir", str(mnist_dir), *SYNTHETIC, *QUIET, "--trainer.max_epochs", "1"]
    assert run_main(*fit, "--model.lr", "0.05", cwd=tmp_path)[0] == 0
    test = ["test", "--ckpt_path", "last", "--data.data_dir", str(mnist_dir), *SYNTHETIC, *QUIET]
    status, single, _ = run_main(*test, cwd=tmp_path)
    three = run_cli(*test, *DDP, "--trainer.devices", "3", cwd=tmp_path)  # 200 test images: 67 + 67 + 66
    assert status == 0 and three.returncode == 0, three.stderr[-3000:]
    one, many = printed_metrics(single), printed_metrics(three.stdout)
    assert one.keys() == many.keys() and {"test/acc", "test/loss"} <= one.keys()
    for key in one:
        assert many[key] == pytest.approx(one[key], abs=1e-6), key
    assert 0.1 < one["test/acc"] < 1  # a real, imperfect model: every image counts


@pytest.mark.slow  # two DDP runs (the default suite starts DDP in test_nodes.py)
def test_ddp_fit_shards_are_disjoint_one_process_writes_and_one_process_resumes(tmp_path, big_mnist):
    probe = tmp_path / "probe"
    fit = ["fit", "--data.data_dir", str(big_mnist), *SYNTHETIC, *QUIET, "--trainer.log_every_n_steps", "10"]
    result = run_cli(str(probe), *fit, *DDP, "--trainer.devices", "2", "--trainer.max_epochs", "3", cwd=tmp_path,
                     script=PROBE)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 150  # batch_size is per process: 2 x 64 images per step
    # the two processes' shards are disjoint and together cover the training set, anew each epoch
    passes = {r: [line.split() for line in (probe / f"indices-rank{r}.txt").read_text().splitlines()] for r in (0, 1)}
    for epoch in range(3):
        shards = [[int(i) for i in passes[r][epoch][1:]] for r in (0, 1)]
        assert len(shards[0]) == len(shards[1]) == 3200
        assert not set(shards[0]) & set(shards[1]) and len(set(shards[0]) | set(shards[1])) == 6400
    assert passes[0][0] != passes[0][1]
    # the processes share the cores rather than each taking them all
    cores = len(os.sched_getaffinity(0))
    assert [int((probe / f"threads-rank{r}.txt").read_text()) for r in (0, 1)] == [max(1, cores // 2)] * 2
    # only rank 0 wrote checkpoint files
    assert not (probe / "writes-rank1.txt").exists() and (probe / "writes-rank0.txt").read_text()
    # one process resumes the two-process run
    result = run_cli(*fit, "--ckpt_path", "last", "--trainer.max_epochs", "4", "--trainer.accelerator", "cpu",
                     cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 250


@pytest.mark.slow  # two more DDP runs
def test_mid_epoch_resume_with_another_number_of_processes_finishes_the_epoch(tmp_path, big_mnist):
    fit = ["fit", "--data.data_dir", str(big_mnist), *SYNTHETIC, *QUIET, "--trainer.accelerator", "cpu"]
    stopped = run_cli(*fit, *DDP, "--trainer.devices", "2", "--trainer.max_steps", "70", cwd=tmp_path)
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert (
        state["global_step"] == 70 and state["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["seen"] == 20 * 64
    )
    resumed = run_cli(*fit, "--ckpt_path", "last", "--trainer.max_epochs", "3", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # epoch 1 ends after its 100 single-process batches (20 done by two processes, 80 now), then epoch 2
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 70 + 80 + 100


@pytest.mark.slow  # a whole run or several: in the slow suite, so the default one stays under 4 minutes
def test_every_config_parses_and_runs(tmp_path, mnist_dir, run_main):
    for config in sorted((ROOT / "configs").glob("*.yaml")):
        if config.name == "sweep.yaml":  # a sweep's config, not a fit's: test_sweep.py parses and checks it
            continue
        status, shown, err = run_main("fit", "--config", str(config), "--print_config", cwd=tmp_path)
        assert status == 0 and "trainer:" in shown, (config.name, err)
        root = tmp_path / config.stem
        root.mkdir()
        args = ["fit", "--config", str(config), "--data.data_dir", str(mnist_dir), *SYNTHETIC, *QUIET]
        args += ["--trainer.max_epochs", "1"]
        if config.stem == "gpu" and not torch.cuda.is_available():
            status, _, err = run_main(*args, cwd=root)
            assert status != 0 and err.startswith("error:") and "gpu" in err, err
            continue
        if "ddp" in config.read_text():
            result = run_cli(*args, cwd=root)  # DDP starts its processes from the command line: run as a user does
            status, err = result.returncode, result.stderr
        else:
            status, _, err = run_main(*args, cwd=root)
        assert status == 0, (config.name, err[-3000:])
        assert (root / "checkpoints" / "last.ckpt").is_file(), config.name


def test_write_mnist_makes_what_the_ddp_tests_count_on(big_mnist: Path):
    assert (big_mnist / "train-images-idx3-ubyte.gz").stat().st_size > 0
