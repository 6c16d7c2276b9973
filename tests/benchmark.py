"""Per-epoch cost of the default `fit` against hand-written loops, measured from outside.

Each side runs as whole processes for 1 and for 3 epochs; (3-epoch time - 1-epoch time) / 2 is its cost per
epoch, with start-up, data loading and the final test cancelled out. Sides alternate A B C A B C so that a
slow spell on this shared machine hits all of them alike. Prints per-epoch seconds and the ratios.

    python tests/benchmark.py [--data_dir ../shared/mnist] [--rounds 3]
    python tests/benchmark.py --recipe [--seeds 1,2,3]   # configs/fast.yaml against the default, fit + test

Sides:
  fit      python -m mnist_lit fit, defaults (55k train + 5k val each epoch, progress bar, TensorBoard,
           checkpoint every 10 steps)
  fit60k   the same with --data.val_size 0 (all 60k, no validation), as the loops below train
  plain    the guide's recipe as a plain loop fed from one pre-normalised tensor in memory (NCHW), 2 threads,
           no checkpoints: the strictest baseline
  plain_ckpt  the same, saving model, optimiser and losses every 10 batches as the guide does
  guide    the guide's loop as written: torchvision MNIST, per-sample ToTensor + Normalize, DataLoader with
           4 workers and pinned memory, saves every 10 batches
"""

from __future__ import annotations

import argparse
import gzip
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_loop(kind: str, epochs: int, data_dir: str, workdir: str, device: str = "cpu") -> float:
    """One side's whole job in this process: train `epochs` epochs, then test once; returns the accuracy."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(1)
    os.chdir(workdir)
    from guide import Net  # tests/guide.py: the guide's model, verbatim

    model = Net().to(device)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.5)
    if kind.startswith("plain"):
        from mnist_lit.datasets import find_files
        from mnist_lit.idx import load_split

        files = find_files(Path(data_dir))
        x, y = load_split(files, train=True, verify=True)
        test_x, test_y = load_split(files, train=False, verify=True)

        def batches():
            perm = torch.randperm(len(x))
            for i in range(0, len(x), 64):
                index = perm[i : i + 64]
                yield x[index], y[index]

        test_batches = list(zip(test_x.split(1000), test_y.split(1000), strict=True))
    else:
        from torch.utils.data import DataLoader
        from torchvision import datasets, transforms

        transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
        train_data = datasets.MNIST(data_dir, train=True, transform=transform)
        test_data = datasets.MNIST(data_dir, train=False, transform=transform)
        loader = DataLoader(train_data, batch_size=64, shuffle=True, num_workers=4, pin_memory=True)

        def batches():
            yield from loader

        test_batches = DataLoader(test_data, batch_size=64, num_workers=4, pin_memory=True)
    train_losses = []
    for _ in range(epochs):
        model.train()
        for i, (data, target) in enumerate(batches()):
            data = data.to(device=device, non_blocking=True)
            target = target.to(device=device, non_blocking=True)
            optimiser.zero_grad()
            loss = F.nll_loss(model(data), target)
            loss.backward()
            train_losses.append(loss.item())
            optimiser.step()
            if i % 10 == 0 and kind != "plain":
                torch.save(model.state_dict(), "model.pth")
                torch.save(optimiser.state_dict(), "optimiser.pth")
                torch.save(train_losses, "train_losses.pth")
    model.eval()
    correct = 0
    with torch.inference_mode():
        for data, target in test_batches:
            data, target = data.to(device), target.to(device)
            correct += model(data).argmax(1).eq(target).sum().item()
    print(f"{kind}: test accuracy {correct / 10000:.4f}")
    return correct / 10000


def command(side: str, epochs: int, data_dir: str, torchvision_dir: str, workdir: str) -> list[str]:
    if side in ("fit", "fit60k"):
        cmd = [sys.executable, "-m", "mnist_lit", "fit", "--data.data_dir", data_dir]
        cmd += ["--trainer.max_epochs", str(epochs), "--trainer.default_root_dir", workdir]
        return cmd + (["--data.val_size", "0"] if side == "fit60k" else [])
    source = data_dir if side.startswith("plain") else torchvision_dir
    return [
        sys.executable,
        __file__,
        "--run",
        side,
        "--epochs",
        str(epochs),
        "--data_dir",
        source,
        "--workdir",
        workdir,
    ]


def torchvision_layout(data_dir: str, into: str) -> str:
    """torchvision's MNIST wants MNIST/raw/ with the decompressed files; build it once in a temp folder."""
    raw = Path(into) / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        source = Path(data_dir) / name
        if source.exists():
            shutil.copy(source, raw / name)
        else:
            with gzip.open(f"{source}.gz") as f:
                (raw / name).write_bytes(f.read())
    return into


def recipe_benchmark(data_dir: str, seeds: list[int], env: dict[str, str]) -> None:
    """configs/fast.yaml against the default recipe: `fit` then `test`, whole processes, alternated per seed."""
    fit_times: dict[str, list[float]] = {"default": [], "fast": []}
    accuracies: dict[str, list[float]] = {"default": [], "fast": []}
    with tempfile.TemporaryDirectory() as scratch:
        for i, seed in enumerate(seeds):
            for side in ("default", "fast") if i % 2 == 0 else ("fast", "default"):
                root = tempfile.mkdtemp(dir=scratch)
                common = ["--data.data_dir", data_dir, "--trainer.default_root_dir", root]
                fit = [sys.executable, "-m", "mnist_lit", "fit", *(["--config", str(ROOT / "configs" / "fast.yaml")]
                       if side == "fast" else []), *common, "--seed_everything", str(seed)]  # fmt: skip
                start = time.perf_counter()
                done = subprocess.run(fit, env=env, cwd=root, capture_output=True, text=True)
                elapsed = time.perf_counter() - start
                if done.returncode:
                    sys.exit(f"{side} fit failed:\n{done.stderr[-3000:]}")
                test = [sys.executable, "-m", "mnist_lit", "test", *common, "--ckpt_path", "last"]
                tested = subprocess.run(test, env=env, cwd=root, capture_output=True, text=True)
                found = re.search(r"test/acc\s+([\d.]+)", tested.stdout)
                if tested.returncode or not found:
                    sys.exit(f"{side} test failed:\n{tested.stderr[-3000:]}")
                fit_times[side].append(elapsed)
                accuracies[side].append(float(found[1]))
                print(
                    f"seed {seed} {side:8s} fit {elapsed:6.1f} s   test accuracy {100 * float(found[1]):.2f}%",
                    flush=True,
                )
                shutil.rmtree(root)
    print("\nmean over seeds " + ",".join(map(str, seeds)))
    for side in ("default", "fast"):
        print(f"  {side:8s} test accuracy {100 * statistics.mean(accuracies[side]):.2f}%   fit "
              f"{statistics.mean(fit_times[side]):6.1f} s")  # fmt: skip
    ratios = [f / d for f, d in zip(fit_times["fast"], fit_times["default"], strict=True)]
    ratio = statistics.mean(fit_times["fast"]) / statistics.mean(fit_times["default"])
    print(f"  fast / default fit wall time: {ratio:.2f}x   (per seed: {' '.join(f'{r:.2f}' for r in ratios)})")


def main() -> None:
    default_data = ROOT.parent / "shared" / "mnist"
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=str(default_data if default_data.is_dir() else "~/.torch/datasets/mnist"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sides", default="fit,fit60k,plain,plain_ckpt,guide")
    parser.add_argument("--recipe", action="store_true", help="configs/fast.yaml against the default: fit + test")
    parser.add_argument("--seeds", default="1,2,3", help="with --recipe: the seeds, each run by both sides")
    parser.add_argument("--run", help=argparse.SUPPRESS)
    parser.add_argument("--epochs", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        run_loop(args.run, args.epochs, args.data_dir, args.workdir, args.device)
        return
    data_dir = str(Path(args.data_dir).expanduser())
    sides = args.sides.split(",")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    if args.recipe:
        recipe_benchmark(data_dir, [int(s) for s in args.seeds.split(",")], env)
        return
    times: dict[tuple[str, int], list[float]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        tv_dir = torchvision_layout(data_dir, os.path.join(scratch, "tv")) if "guide" in sides else ""
        for round_ in range(args.rounds):
            for side in sides:
                for epochs in (1, 3):
                    workdir = tempfile.mkdtemp(dir=scratch)
                    start = time.perf_counter()
                    done = subprocess.run(
                        command(side, epochs, data_dir, tv_dir, workdir),
                        env=env,
                        cwd=workdir,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT,
                        text=True,
                    )
                    elapsed = time.perf_counter() - start
                    if done.returncode:
                        sys.exit(f"{side} failed:\n{done.stdout[-3000:]}")
                    times.setdefault((side, epochs), []).append(elapsed)
                    print(f"round {round_ + 1} {side:10s} {epochs} epoch(s): {elapsed:6.1f} s", flush=True)
                    shutil.rmtree(workdir)
    # Per round: each side's (3-epoch - 1-epoch) / 2, and the ratios between sides measured minutes apart. The
    # median over rounds of those ratios is robust to this machine's slow spells, which hit a whole round.
    rounds = range(args.rounds)
    per_epoch = {side: [(times[(side, 3)][r] - times[(side, 1)][r]) / 2 for r in rounds] for side in sides}
    print("\nper epoch, s: (3-epoch run - 1-epoch run) / 2 in each round; median over rounds")
    for side in sides:
        values = " ".join(f"{v:5.2f}" for v in per_epoch[side])
        print(f"  {side:10s} {statistics.median(per_epoch[side]):5.2f}   (rounds: {values})")
    print("ratios per epoch: median over rounds of each round's ratio")
    for side, other in (("fit", "plain"), ("fit", "plain_ckpt"), ("fit60k", "plain"), ("guide", "fit")):
        if side in per_epoch and other in per_epoch:
            ratios = [a / b for a, b in zip(per_epoch[side], per_epoch[other], strict=True)]
            values = " ".join(f"{v:.2f}" for v in ratios)
            print(f"  {side} / {other}: {statistics.median(ratios):.2f}x   (rounds: {values})")


if __name__ == "__main__":
    main()
