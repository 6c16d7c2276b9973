"""Sweeps as the tests run them: their options, the process, the study they leave, waiting on their files."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from helpers.cli import QUIET, SYNTHETIC, cli_env

SHORT = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2"]  # a trial in a few seconds


SPACE = {"model.optimizer.init_args.lr": {"low": 0.01, "high": 0.3, "log": True}, "data.batch_size": [32, 64]}


def env() -> dict[str, str]:
    # One thread per fit: the trials' numbers must match a plain fit's bit for bit (same thread count), and the
    # machine's cores are shared with whatever else runs.
    return {**cli_env(), "OMP_NUM_THREADS": "1"}


def sweep_args(root: Path, data: Path, *extra: str, space: dict | None = None, trials: int = 6) -> list[str]:
    return [
        "sweep", "--sweep.space", json.dumps(SPACE if space is None else space), "--sweep.trials", str(trials),
        "--data.data_dir", str(data), *SYNTHETIC, *QUIET, "--trainer.max_epochs", "2",
        "--trainer.default_root_dir", str(root), *extra,
    ]  # fmt: skip


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "mnist_lit", *args], cwd=cwd, env=env(), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def run(args: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mnist_lit", *args], cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout
    )


def study(root: Path, url: str | None = None) -> list:
    import optuna

    storage = optuna.storages.RDBStorage(url or f"sqlite:///{root / 'sweep.db'}")
    return optuna.load_study(study_name="mnist_lit", storage=storage).get_trials()


def counted(trials: list) -> list:
    from mnist_lit.sweep.study import counted as counts

    return [t for t in trials if counts(t)]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


def assert_same_weights(a: Path, b: Path) -> None:
    left, right = weights(a), weights(b)
    assert left.keys() == right.keys()
    for key in left:
        assert torch.equal(left[key], right[key]), key


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def wait_for(condition, timeout: float, what: str, procs: tuple = ()) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        for proc in procs:
            assert proc.poll() is None, f"{what}: the sweep ended first: {proc.communicate()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def periodic(folder: Path) -> list[Path]:
    return list((folder / "checkpoints").glob("epoch=*-step=*.ckpt"))


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found
