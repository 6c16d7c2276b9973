"""The GPU check: the default 10-epoch fit + test on one GPU, and the guide's own loop beside it.

    python tests/benchmarks/gpu_check.py [--data_dir ../shared/mnist] [--epochs 10]

Prints, for each side, the wall time of the whole job, the time per epoch and the test accuracy:
  fit (gpu.yaml)    python -m mnist_lit fit --config configs/gpu.yaml: the dataset resident on the GPU
  fit (pinned)      the same with --data.data_on_device false: pinned host batches, non-blocking copies
  guide loop        the guide's code as written (torchvision, per-sample transforms, 4 workers, pinned memory)
Time per epoch is (E-epoch run - 1-epoch run) / (E - 1), so start-up and the final test cancel out.
On one H100 the whole script takes a few minutes. `--accelerator cpu --epochs 2` runs the same on a CPU, to
check the script itself.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fit import ROOT, torchvision_layout


def timed(command: list[str], cwd: str) -> tuple[float, str]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"failed: {' '.join(command)}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return elapsed, done.stdout + done.stderr


def fit_and_test(extra: list[str], epochs: int, data_dir: str, scratch: str) -> tuple[float, float]:
    """Wall time of fit(epochs) + test, and the test accuracy."""
    root = tempfile.mkdtemp(dir=scratch)
    fit = [sys.executable, "-m", "mnist_lit", "fit", "--data.data_dir", data_dir, *extra]
    fit += ["--trainer.max_epochs", str(epochs), "--trainer.enable_progress_bar", "false"]
    fit_time, _ = timed(fit, root)
    test = [sys.executable, "-m", "mnist_lit", "test", "--ckpt_path", "last", "--data.data_dir", data_dir, *extra]
    test_time, output = timed([*test, "--trainer.enable_progress_bar", "false"], root)
    accuracy = float(re.search(r"test/acc\s+([\d.]+)", output)[1])
    return fit_time + test_time, accuracy


def guide(epochs: int, tv_dir: str, device: str, scratch: str) -> tuple[float, float]:
    command = [
        sys.executable,
        str(Path(__file__).with_name("fit.py")),
        "--run",
        "guide",
        "--epochs",
        str(epochs),
        "--data_dir",
        tv_dir,
        "--workdir",
        tempfile.mkdtemp(dir=scratch),
        "--device",
        device,
    ]
    elapsed, output = timed(command, scratch)
    return elapsed, float(re.search(r"test accuracy ([\d.]+)", output)[1])


def main() -> None:
    default_data = ROOT.parent / "shared" / "mnist"
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=str(default_data if default_data.is_dir() else "~/.torch/datasets/mnist"))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--accelerator", default="gpu", choices=["gpu", "cpu"])
    args = parser.parse_args()
    data_dir = str(Path(args.data_dir).expanduser())
    gpu = args.accelerator == "gpu"
    sides = {
        "fit (gpu.yaml)": ["--config", str(ROOT / "configs" / ("gpu.yaml" if gpu else "cpu.yaml"))],
        "fit (pinned)": ["--config", str(ROOT / "configs" / ("gpu.yaml" if gpu else "cpu.yaml")),
                         "--data.data_on_device", "false"],
    }  # fmt: skip
    if gpu:
        import torch

        print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as scratch:
        tv_dir = torchvision_layout(data_dir, os.path.join(scratch, "tv"))
        rows = []
        for name, extra in sides.items():
            one, _ = fit_and_test(extra, 1, data_dir, scratch)
            full, accuracy = fit_and_test(extra, args.epochs, data_dir, scratch)
            rows.append((name, full, (full - one) / (args.epochs - 1), accuracy))
            print(f"{name}: {full:.1f} s, test accuracy {accuracy:.4f}", flush=True)
        device = "cuda" if gpu else "cpu"
        one, _ = guide(1, tv_dir, device, scratch)
        full, accuracy = guide(args.epochs, tv_dir, device, scratch)
        rows.append(("guide loop", full, (full - one) / (args.epochs - 1), accuracy))
    print(f"\n{'side':16s} {'wall (s)':>9s} {'s/epoch':>8s} {'test acc':>9s}   ({args.epochs} epochs + test)")
    for name, wall, per_epoch, accuracy in rows:
        print(f"{name:16s} {wall:9.1f} {per_epoch:8.2f} {accuracy:9.4f}")


if __name__ == "__main__":
    main()
