"""The README's "Using it" commands, run as a newcomer runs them: in order, in one folder, every one must succeed."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, SYNTHETIC, cli_env

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")


def using_it_commands() -> list[str]:
    """Every command line of the bash blocks in the README's "Using it" section (up to the next "## " title)."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Using it") :]
    section = section[: section.index("\n## ", 1)]
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        lines += [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return lines


def as_run_here(line: str, data: Path) -> str:
    """The line with this interpreter, and on a Lightning subcommand the synthetic data appended (after what the
    line gives, config files included, so that it wins), before any redirection."""
    command = line.partition("  #")[0]
    command, redirect, target = command.strip().partition(" > ")
    words = shlex.split(command)
    assert words[:3] == ["python", "-m", "mnist_lit"], line
    words[0] = sys.executable
    if words[3] in (*LIGHTNING_SUBCOMMANDS, "sweep") and "--help" not in words:  # a sweep's trials are fits
        words += ["--data.data_dir", str(data), *SYNTHETIC]
    if words[3] == "sweep":
        words += ["--sweep.trials", "2"]  # the configured 16 trials would take minutes: two show that it runs
    return shlex.join(words) + (f" > {target.strip()}" if redirect else "")


def test_the_readme_lists_the_commands_this_test_runs():
    commands = using_it_commands()
    assert commands[0].startswith("python -m mnist_lit fit ") and any(" export " in c for c in commands)
    assert any("--config configs/fast.yaml" in c for c in commands)


@pytest.mark.slow  # a dozen whole runs (synthetic data): about two minutes
def test_the_using_it_commands_run_in_order_in_one_folder(tmp_path, mnist_dir):
    from test_predict import digit

    shutil.copytree(ROOT / "configs", tmp_path / "configs")  # a fresh clone has them
    (tmp_path / "my_digits").mkdir()  # "a folder of your digit images"
    digit().save(tmp_path / "my_digits" / "seven.png")
    for line in using_it_commands():
        if "serve" in shlex.split(line, comments=True)[:4]:  # a server runs until stopped: test_serve.py checks it
            continue
        result = subprocess.run(
            as_run_here(line, mnist_dir), shell=True, cwd=tmp_path, env=cli_env(), capture_output=True, text=True,
            timeout=600,
        )  # fmt: skip
        assert result.returncode == 0, f"{line}\n{result.stderr[-3000:]}"
        assert "Traceback" not in result.stderr, f"{line}\n{result.stderr[-3000:]}"
    assert (tmp_path / "model.onnx").is_file() and (tmp_path / "runs" / "fast" / "checkpoints" / "last.ckpt").is_file()
