"""The fixtures the tests share: tiny synthetic MNIST files, one trained run, the real files when present, and the CLI
run in this process. What tests import (running the CLI, data, images, checkpoints) is in helpers/."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch  # noqa: F401  (see below)
import pytest
from helpers.cli import QUIET, SYNTHETIC, run_cli
from helpers.mnist import REAL_MNIST, write_mnist

# Lightning gives its loggers a handler on the stderr of the moment it is first imported. Imported here, that is
# pytest's session-long stream; imported inside a test, it would be that test's capsys stream, closed after it.


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
