"""The README, read as a newcomer reads it: every command in it parses, the runnable ones run in order in one
folder from the state the set-up line leaves (slow), the code tour points at what it names, and the first screen
stays short."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers.cli import ROOT, SYNTHETIC, cli_env

README = ROOT / "README.md"
LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")
MAX_FIRST_SCREEN_LINES = 150  # lines outside <details> folds

# The README's bash lines that the in-order run does not run, by a piece of the line, and why. Each entry must
# still match a line (a stale one fails), and every line that is not run must match one (nothing skipped silently).
NOT_RUN = {
    "python3 -m venv": "the set-up: the tests run in this environment, already installed",
    ". .venv/bin/activate": "the set-up: the tests run in this environment, already installed",
    "pip install": "installs packages: the tests run in this environment, already installed",
    "python -m pytest": "the suite itself",
    "python -m mnist_lit serve": "a server runs until stopped: tests/test_serve.py starts and stops one",
    "curl ": "needs a running server: tests/test_serve.py posts the same request",
    '{"digit":7': "the answer curl prints, not a command",
    "configs/gpu.yaml": "needs a GPU: tests/benchmarks/gpu_check.py is the check to run on one",
    "configs/ddp.yaml": "needs 4 GPUs, or two nodes",
    "torchrun ": "needs torchrun on two nodes: tests/test_nodes.py runs it in network namespaces",
    "srun ": "needs SLURM: tests/test_slurm.py runs the README's script on a SLURM cluster it starts",
    "sbatch ": "needs SLURM: tests/test_slurm.py submits the README's scripts to a SLURM cluster it starts",
    "sudo ": "sets up PostgreSQL: needs root and a database machine (tests/sweep/test_sweep.py starts its own server)",
    "export MNIST_LIT_SWEEP_STORAGE": "names a PostgreSQL server on another machine",
    "/shared/sweeps": "a sweep stored in that PostgreSQL server, on a shared disk",
    "optuna-dashboard": "not installed here: a web server that runs until stopped",
}
# Files a command writes that a later one reads, and what stands in for them where that command is only parsed
PRODUCED = {"runs/sweep/best.yaml": "a sweep's best trial: a complete fit config"}
# The user's own network class that the README's my_nets.MyNet names
MY_NETS = """from torch import nn


class MyNet(nn.Module):
    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Flatten(), nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, x):
        return self.layers(x)
"""


@dataclass
class Command:
    line: str  # as the README has it, continuation lines joined
    section: str  # the heading or fold it stands under
    env: dict[str, str] = field(default_factory=dict)  # VAR=value words before the command
    program: str = ""  # the first word after them
    args: list[str] | None = None  # what follows `-m mnist_lit`; None for another program's line
    redirect: str | None = None  # the file after ` > `

    @property
    def subcommand(self) -> str | None:
        return self.args[0] if self.args else None

    def option(self, name: str) -> str | None:
        """The last value the line gives an option (the one that wins)."""
        words = self.args or []
        values = [words[i + 1] for i in range(len(words) - 1) if words[i] == name]
        return values[-1] if values else None


def readme_commands() -> list[Command]:
    """Every command of every bash block of the README, in order; `a && b` is two commands."""
    readme = README.read_text()
    commands = []
    for block in re.finditer(r"```bash\n(.*?)```", readme, re.S):
        before = re.sub(r"```.*?```", "", readme[: block.start()], flags=re.S)
        titles = re.findall(r"^#+ (.+)$|<summary>(?:<a id=\"[^\"]*\"></a>)?<b>(.+?)</b></summary>", before, re.M)
        section = next((a or b for a, b in reversed(titles)), "")
        for line in block[1].replace("\\\n", " ").splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            for part in re.sub(r"\s+#\s.*$", "", line).split(" && "):
                commands.append(parse(part.strip(), section))
    return commands


def parse(line: str, section: str) -> Command:
    command = Command(line=line, section=section)
    text, redirect, target = line.partition(" > ")
    if redirect:
        command.redirect = target.strip()
    try:
        words = shlex.split(text)
    except ValueError:  # another program's line (curl's JSON, say)
        return command
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
        name, _, value = words.pop(0).partition("=")
        command.env[name] = value
    command.program = words[0] if words else ""
    for i in range(len(words) - 1):
        if words[i : i + 2] == ["-m", "mnist_lit"]:
            command.args = words[i + 2 :]
            break
    return command


def not_run_reason(command: Command) -> str | None:
    return next((why for piece, why in NOT_RUN.items() if piece in command.line), None)


def ours(command: Command) -> bool:
    """A `python -m mnist_lit ...` line: one this project answers for."""
    return command.args is not None and command.program not in ("torchrun", "srun")


# --- fast: what the README says, checked without training --------------------------------------------------------


def test_the_first_screen_is_short_and_every_fold_is_closed():
    outside, depth = 0, 0
    for line in README.read_text().splitlines():
        opened, closed = line.count("<details"), line.count("</details>")
        if depth == 0 and not opened and not closed:
            outside += 1
        depth += opened - closed
        assert depth >= 0, f"a </details> without its <details>: {line}"
    assert depth == 0, "a <details> fold is never closed"
    assert outside <= MAX_FIRST_SCREEN_LINES, f"{outside} README lines outside <details> folds (at most 150)"


def test_every_line_is_run_or_listed_as_not_run():
    commands = readme_commands()
    for command in commands:
        assert ours(command) or not_run_reason(command), f"not run, and not listed in NOT_RUN: {command.line}"
    for piece in NOT_RUN:
        assert any(piece in command.line for command in commands), f"NOT_RUN names a line no longer there: {piece}"


def test_the_commands_start_from_the_setup_run_and_no_new_fit_lands_on_an_earlier_run():
    """The newcomer's first hour: the set-up line trains a run in the current folder, so the first command after it
    must use that run, and every new fit (no --ckpt_path) needs a root no earlier fit has used: a fit refuses one."""
    commands = [c for c in readme_commands() if ours(c) and not not_run_reason(c)]
    assert commands[0].args == ["fit"], commands[0].line  # the set-up line's fit
    assert commands[1].subcommand != "fit" or commands[1].option("--ckpt_path"), commands[1].line
    roots: dict[str, str] = {}  # a printed config file -> the root it names
    used: list[str] = []
    for command in commands:
        root = command.option("--trainer.default_root_dir")
        if root is None and (config := command.option("--config")) in roots:
            root = roots[config]
        root = root or "."
        if command.redirect and "--print_config" in command.args:
            roots[command.redirect] = root
        if command.subcommand == "fit" and not {"--print_config", "--help"} & set(command.args):
            if command.option("--ckpt_path") is None:
                assert root not in used, f"a new fit where an earlier run is (it is refused): {command.line}"
            used.append(root)
    assert any(c.subcommand == "export" for c in commands)
    assert any("--config configs/fast.yaml" in c.line for c in commands)


def test_every_mnist_lit_line_parses(trained_run, tmp_path, run_main, monkeypatch):
    """Every `python -m mnist_lit` line in the README, torchrun's and srun's included, in order in a copy of a
    trained run: Lightning's subcommands and sweep with --print_config (nothing runs), export and serve as far as
    looking for the checkpoint, in a folder without one."""
    folder = tmp_path / "newcomer"
    shutil.copytree(trained_run, folder)
    shutil.copytree(ROOT / "configs", folder / "configs")
    (folder / "my_nets.py").write_text(MY_NETS)
    (tmp_path / "empty").mkdir()
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, "my_nets", raising=False)
    failures = []
    for command in readme_commands():
        if command.args is None:
            continue
        for name, value in command.env.items():
            monkeypatch.setenv(name, value)
        for produced in PRODUCED:
            if command.option("--config") == produced and not (folder / produced).exists():
                status, out, err = run_main("fit", "--print_config", cwd=folder)
                (folder / produced).parent.mkdir(parents=True, exist_ok=True)
                (folder / produced).write_text(out)
        if command.subcommand in ("export", "serve"):
            status, out, err = run_main(*command.args, cwd=tmp_path / "empty")
            last = (err.strip().splitlines() or [""])[-1]
            about_arguments = any(word in last for word in ("unrecognized", "did you mean", "usage", "invalid"))
            if not (status != 0 and last.startswith("error: ") and "checkpoint" in last and not about_arguments):
                failures.append(f"{command.line}\n  {status}: {err[-1500:]}")
        else:
            extra = [] if {"--print_config", "--help"} & set(command.args) else ["--print_config"]
            status, out, err = run_main(*command.args, *extra, cwd=folder)
            if status != 0:
                failures.append(f"{command.line}\n  {status}: {err[-1500:]}")
            elif command.redirect:
                (folder / command.redirect).write_text(out)
        for name in command.env:
            monkeypatch.delenv(name)
    assert not failures, "README lines that do not parse:\n" + "\n".join(failures)


TOUR = re.compile(r"`(?:\w+\.)?(\w+)` \(`(mnist_lit/[\w/]+\.py):(\d+)`\)")


def test_the_code_tour_points_at_what_it_names():
    """Each `name` (`mnist_lit/file.py:N`) of the README: line N of that file defines name. When code moves, this
    fails: re-point the README."""
    references = TOUR.findall(README.read_text())
    assert len(references) >= 10, references
    for name, path, number in references:
        lines = (ROOT / path).read_text().splitlines()
        line = lines[int(number) - 1] if int(number) <= len(lines) else ""
        assert re.match(rf"\s*(def|class) {name}\b", line), f"{path}:{number} is not where {name} is: {line!r}"


# --- slow: the commands, run in order in one folder --------------------------------------------------------------


def as_run_here(command: Command, data: Path) -> str:
    """The line with this interpreter, and on a Lightning subcommand or a sweep the synthetic data appended (after
    what the line gives, config files included, so that it wins), before any redirection."""
    words = [sys.executable, "-m", "mnist_lit", *command.args]
    if command.subcommand in (*LIGHTNING_SUBCOMMANDS, "sweep") and "--help" not in words:  # a sweep's trials are fits
        words += ["--data.data_dir", str(data), *SYNTHETIC]
    if command.subcommand == "sweep":
        words += ["--sweep.trials", "2"]  # the configured 16 trials would take minutes: two show that it runs
    env = [f"{name}={shlex.quote(value)}" for name, value in command.env.items()]
    return " ".join([*env, shlex.join(words)]) + (f" > {command.redirect}" if command.redirect else "")


@pytest.mark.slow  # some 30 whole runs (synthetic data): several minutes
def test_the_readmes_commands_run_in_order_in_one_folder(tmp_path, mnist_dir):
    from helpers.images import digit, image_folder

    shutil.copytree(ROOT / "configs", tmp_path / "configs")  # a fresh clone has them
    (tmp_path / "my_digits").mkdir()  # "a folder of your digit images"
    digit().save(tmp_path / "my_digits" / "seven.png")
    (tmp_path / "scans").mkdir()
    digit(84).convert("RGB").save(tmp_path / "scans" / "seven.jpg")
    image_folder(tmp_path / "my_labelled_digits", per_class=20)  # one folder per class
    (tmp_path / "my_nets.py").write_text(MY_NETS)
    skipped = []
    for command in readme_commands():
        if reason := not_run_reason(command):
            skipped.append(f"{command.line}: {reason}")
            continue
        assert ours(command), command.line
        result = subprocess.run(
            as_run_here(command, mnist_dir), shell=True, cwd=tmp_path, env=cli_env(), capture_output=True, text=True,
            timeout=600,
        )  # fmt: skip
        assert result.returncode == 0, f"[{command.section}] {command.line}\n{result.stderr[-3000:]}"
        assert "Traceback" not in result.stderr, f"{command.line}\n{result.stderr[-3000:]}"
    print("not run:\n" + "\n".join(skipped))
    assert (tmp_path / "model.onnx").is_file() and (tmp_path / "runs" / "fast" / "checkpoints" / "last.ckpt").is_file()
    for root in ("tuned", "scratch", "fashion", "runs/best", "runs/ddp2cpu"):
        assert (tmp_path / root / "checkpoints" / "last.ckpt").is_file(), root
