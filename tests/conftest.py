"""Shared fixtures: tiny synthetic MNIST files, the real ones when present, and running the CLI as a user does."""

from __future__ import annotations

import gzip
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import lightning.pytorch  # noqa: F401  (see below)
import pytest
import torch

# Lightning gives its loggers a handler on the stderr of the moment it is first imported. Imported here, that is
# pytest's session-long stream; imported inside a test, it would be that test's capsys stream, closed after it.

ROOT = Path(__file__).resolve().parents[1]
REAL_MNIST = ROOT.parent / "shared" / "mnist"
# Options every CLI run on synthetic data needs: the files are not MNIST's, and they are small.
SYNTHETIC = ["--data.verify_checksums", "false", "--data.val_size", "64", "--data.test_batch_size", "50"]
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def idx_bytes(tensor: torch.Tensor, magic: int) -> bytes:
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", size) for size in tensor.shape)
    return header + tensor.to(torch.uint8).numpy().tobytes()


def write_mnist(folder: Path, train: int = 640, test: int = 200, gz: bool = True, seed: int = 0) -> Path:
    """Four IDX files of random digits: each class is a bright bar at its own row, plus noise, so a model
    can learn them in a few steps and the files are tiny."""
    generator = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, count in (("train", train), ("t10k", test)):
        labels = torch.randint(0, 10, (count,), generator=generator)
        images = torch.randint(0, 60, (count, 28, 28), generator=generator)
        for i, label in enumerate(labels.tolist()):
            images[i, 4 + 2 * label : 6 + 2 * label, 4:24] = 250
        for name, payload in (
            (f"{prefix}-images-idx3-ubyte", idx_bytes(images, 2051)),
            (f"{prefix}-labels-idx1-ubyte", idx_bytes(labels, 2049)),
        ):
            if gz:
                (folder / f"{name}.gz").write_bytes(gzip.compress(payload))
            else:
                (folder / name).write_bytes(payload)
    return folder


@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_mnist(tmp_path_factory.mktemp("mnist"))


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, mnist_dir: Path) -> Path:
    """One finished run shared by the whole test session, never to be written to (copy it first): 2 epochs of 9
    steps on the synthetic files, a checkpoint every 3 steps: checkpoints/last.ckpt and epoch=2-step=18.ckpt."""
    root = tmp_path_factory.mktemp("trained-run")
    result = run_cli(
        "fit", "--data.data_dir", str(mnist_dir), *SYNTHETIC, *QUIET, "--checkpoint.every_n_train_steps", "3",
        "--trainer.max_epochs", "2", cwd=root,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return root


@pytest.fixture(scope="session")
def real_mnist() -> Path:
    """The real MNIST files: ../shared/mnist beside the project, else the default data folder, where fit finds them
    (directly in it, or in MNIST/raw/)."""
    from mnist_lit.datasets import DEFAULT_DATA_DIR, FILE_NAMES, find_files

    if (REAL_MNIST / "train-images-idx3-ubyte.gz").exists():
        return REAL_MNIST
    default = Path(DEFAULT_DATA_DIR).expanduser()
    if len(find_files(default)) == len(FILE_NAMES):
        return default
    pytest.skip(f"the real MNIST files are in neither {REAL_MNIST} nor {DEFAULT_DATA_DIR} (directly, or in MNIST/raw/)")


def printed_metrics(stdout: str) -> dict[str, float]:
    """The values in Lightning's results table."""
    return {m[1]: float(m[2]) for m in re.finditer(r"^\W*(test/\w+|val/\w+)\s+([-\d.e]+)", stdout, re.M)}


def guide_evaluation(checkpoint: Path, data_dir: Path, verify: bool) -> tuple[float, float]:
    """The guide's own Net, loaded (strictly) with a checkpoint's net.* weights, scored by the guide's own test
    code on the test set: (accuracy, summed NLL / N)."""
    from guide import Net, evaluate

    from mnist_lit.datasets.catalog import find_files
    from mnist_lit.datasets.idx import load_split

    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    net = Net()
    net.load_state_dict({k.removeprefix("net."): v for k, v in state.items()}, strict=True)
    images, labels = load_split(find_files(data_dir), train=False, verify=verify)
    return evaluate(net, zip(images.split(64), labels.split(64), strict=True), len(labels))


def cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PL_", "LOCAL_RANK", "MASTER_", "WORLD_SIZE"))}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("PYTHONWARNINGS", "ignore")  # a test that checks what users see sets its own
    return env


def run_cli(
    *args: str, cwd: Path, timeout: float = 300, script: list[str] | None = None
) -> subprocess.CompletedProcess:
    """`python -m mnist_lit ARGS` in cwd, as a user runs it (or `python SCRIPT... ARGS` for a test harness)."""
    command = [sys.executable, *(script or ["-m", "mnist_lit"]), *args]
    return subprocess.run(command, cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def run_main(monkeypatch, capsys):
    """`python -m mnist_lit ARGS` in this process (no start-up cost): returns (exit status, stdout, stderr)."""

    def run(*args: str, cwd: Path) -> tuple[int, str, str]:
        from mnist_lit.__main__ import run as main

        monkeypatch.chdir(cwd)
        monkeypatch.setattr("sys.argv", ["mnist_lit"])
        capsys.readouterr()
        status = 0
        try:
            main(list(args))
        except SystemExit as exit_:
            status = exit_.code if isinstance(exit_.code, int) else 1
            if isinstance(exit_.code, str):
                print(exit_.code, file=sys.stderr)
        out, err = capsys.readouterr()
        return status, out, err

    return run


def assert_clean_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    """A user error: non-zero exit, one line on stderr naming the problem, no traceback."""
    assert result.returncode not in (0, None), result.stdout + result.stderr
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[-1], lines[-1]
