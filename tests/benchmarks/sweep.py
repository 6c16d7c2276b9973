"""Sweep configs/sweep.yaml on the real MNIST files, then test its best trial on the 10k test set (not a test).

    python tests/benchmarks/sweep.py [--data_dir ../shared/mnist] [--trials 16] [--workers 2] [--epochs 2]

Prints the sweep's table, the sweep's wall time and the best trial's test accuracy (its own last.ckpt, tested as
`test --ckpt_path last` in its folder). The root is a new temporary folder unless --root is given (then run it
again to resume).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", default=str(ROOT.parent / "shared" / "mnist"))
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--root", help="the sweep's folder (default: a new temporary one)")
    options = parser.parse_args()
    root = Path(options.root or tempfile.mkdtemp(prefix="mnist_lit_sweep_benchmark"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    data = ["--data.data_dir", options.data_dir]
    command = [
        sys.executable, "-m", "mnist_lit", "sweep", "--config", str(ROOT / "configs" / "sweep.yaml"), *data,
        "--sweep.trials", str(options.trials), "--sweep.workers", str(options.workers),
        "--trainer.max_epochs", str(options.epochs), "--trainer.default_root_dir", str(root),
    ]  # fmt: skip
    started = time.monotonic()
    sweep = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.monotonic() - started
    print(sweep.stdout)
    if sweep.returncode != 0:
        sys.exit(f"the sweep failed:\n{sweep.stderr}")
    best = re.search(r"^best: trial (\d+), (\S+) ([\d.]+)", sweep.stdout, re.M)
    header = (root / "best.yaml").read_text().splitlines()[0]
    folder = root / re.search(r", in (\S+):", header)[1]  # best.yaml's first line names the trial's folder
    tested = subprocess.run(
        [sys.executable, "-m", "mnist_lit", "test", "--ckpt_path", "last", "--trainer.default_root_dir", str(folder),
         "--trainer.enable_progress_bar", "false", *data],
        env=env, capture_output=True, text=True, cwd=folder,
    )  # fmt: skip
    accuracy = re.search(r"test/acc\s+([\d.]+)", tested.stdout)
    if accuracy is None:
        sys.exit(f"testing {folder} failed:\n{tested.stderr}")
    print(header)
    print(
        f"sweep: {options.trials} trials of {options.epochs} epochs, {options.workers} workers, {wall:.0f} s wall time"
        f" (root {root})"
    )
    print(f"best trial {best[1] if best else '?'} ({folder.name}): {best[2] if best else ''} {best[3] if best else ''},"
          f" test accuracy {100 * float(accuracy[1]):.2f}%")  # fmt: skip


if __name__ == "__main__":
    main()
