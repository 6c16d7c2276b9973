"""Running the CLI as a user does: the environment, the options every synthetic run needs, what a user error looks
like."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


# Options every CLI run on synthetic data needs: the files are not MNIST's, and they are small.
SYNTHETIC = ["--data.verify_checksums", "false", "--data.val_size", "64", "--data.test_batch_size", "50"]


# the harness that stops a run at a chosen moment: `python KILLPOINTS... MOMENT N fit ARGS`
KILLPOINTS = [str(ROOT / "tests" / "helpers" / "killpoints.py")]
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def printed_metrics(stdout: str) -> dict[str, float]:
    """The values in Lightning's results table."""
    return {m[1]: float(m[2]) for m in re.finditer(r"^\W*(test/\w+|val/\w+)\s+([-\d.e]+)", stdout, re.M)}


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


def assert_clean_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    """A user error: non-zero exit, one line on stderr naming the problem, no traceback."""
    assert result.returncode not in (0, None), result.stdout + result.stderr
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[-1], lines[-1]
