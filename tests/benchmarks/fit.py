"""Per-epoch cost of `fit` against hand-written loops of the same recipe.

Each side runs as its own process for --epochs epochs (default 4) and times each epoch (the loop around an
epoch; for fit, Lightning's fit loop's advance, patched here: nothing is added per step). A run's time is the
median of its epochs after the first (warm-up); start-up, data loading and the final test are left out. Sides
alternate A B C A B C so that a slow spell on this shared machine hits all of them alike. Prints per-epoch
seconds and, per side, the median over rounds of its ratio to the first side.

    python tests/benchmarks/fit.py [--data_dir ../shared/mnist] [--rounds 3] [--sides best,fit60k,...]
    python tests/benchmarks/fit.py --recipe [--seeds 1,2,3]   # configs/fast.yaml against the default, fit + test
    python tests/benchmarks/fit.py --loaders                  # mnist_lit's in-memory loader against DataLoader
    python tests/benchmarks/fit.py --interleaved [--epochs 6] [--chunk 100]
        [--sides fit60k,-ckpt,-bar,-curves,bare,lightning] [-- FIT OPTIONS]
                           # one fit process, its steps by chunks against the best loop's in the same process
                           # (interleaved_benchmark below); sides: fit60k and fit60k without checkpoints, bar, curves,
                           # all three (bare), or any callback and logger (lightning: Lightning's loop alone)

Sides (default: best, fit60k and fit60k with each piece of per-step work turned off in turn):
  best       the best hand-written loop of the recipe: all 60k images as one normalised tensor in memory,
             channels_last, fused SGD, batch 64, 2 threads, nothing else (no checkpoints, no logging)
  fit60k     python -m mnist_lit fit --data.val_size 0, as shipped: all 60k, no validation, progress bar,
             TensorBoard, a checkpoint every 10 steps (digest, writer thread, last.ckpt copy)
  -bar -log -ckpt   fit60k without the progress bar / the logger / checkpoints (--trainer.* switches)
  -digest    fit60k with checkpoints written unsealed (the digest replaced by a constant; benchmark only)
  -thread    fit60k with checkpoint files written on the training thread (no writer thread; benchmark only)
  -write     fit60k with checkpoints collected, sealed and serialised, but not written (benchmark only)
  -copy      fit60k without the second copy of each checkpoint as last.ckpt (benchmark only)
  tqdm       fit60k with Lightning's own TQDMProgressBar (redrawn every batch) in place of mnist_lit's
  nice       fit60k with the writer thread at the lowest priority (nice 19; benchmark only)
  bf16       fit60k under bf16 autocast (--trainer.precision bf16-mixed)
  bare       fit60k with bar, logger and checkpoints all off: Lightning's loop and hooks alone
  fit        python -m mnist_lit fit, defaults (55k train + 5k val each epoch)
  plain      the guide's recipe as a plain loop fed from one normalised tensor in memory (NCHW, the
             guide's per-parameter SGD), no checkpoints
  plain_ckpt the same, saving model, optimiser and losses every 10 batches as the guide does
  SIDE+NAME=VALUE   a side with an environment variable set, e.g. fit60k+OMP_NUM_THREADS=1
  guide      the guide's loop as written: torchvision MNIST, per-sample ToTensor + Normalize, DataLoader with
             4 workers and pinned memory, saves every 10 batches
"""

from __future__ import annotations

import argparse
import atexit
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

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))  # helpers.guide: the guide's model


def run_loop(kind: str, epochs: int, data_dir: str, workdir: str, device: str = "cpu") -> float:
    """One side's whole job in this process: train `epochs` epochs, then test once; returns the accuracy."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(1)
    os.chdir(workdir)
    from helpers.guide import Net  # the guide's model, verbatim

    model = Net().to(device)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.5)
    if kind == "best":
        from mnist_lit.model import Net as FlatNet  # the guide's Net with torch.flatten: takes channels_last

        torch.manual_seed(1)
        model = FlatNet().to(device, memory_format=torch.channels_last)
        optimiser = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.5, fused=True)
    if kind in ("best", "plain", "plain_ckpt"):
        from mnist_lit.datasets.catalog import find_files
        from mnist_lit.datasets.idx import load_split

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
    epoch_times = []
    for _ in range(epochs):
        started = time.perf_counter()
        model.train()
        for i, (data, target) in enumerate(batches()):
            data = data.to(device=device, non_blocking=True)
            if kind == "best":
                data = data.contiguous(memory_format=torch.channels_last)
            target = target.to(device=device, non_blocking=True)
            optimiser.zero_grad()
            loss = F.nll_loss(model(data), target)
            loss.backward()
            if kind != "best":
                train_losses.append(loss.item())
            optimiser.step()
            if i % 10 == 0 and kind not in ("plain", "best"):
                torch.save(model.state_dict(), "model.pth")
                torch.save(optimiser.state_dict(), "optimiser.pth")
                torch.save(train_losses, "train_losses.pth")
        epoch_times.append(time.perf_counter() - started)
    print("EPOCHS " + " ".join(f"{s:.4f}" for s in epoch_times), flush=True)
    model.eval()
    correct = 0
    with torch.inference_mode():
        for data, target in test_batches:
            data, target = data.to(device), target.to(device)
            correct += model(data).argmax(1).eq(target).sum().item()
    print(f"{kind}: test accuracy {correct / 10000:.4f}")
    return correct / 10000


FIT_SWITCHES = {
    "fit": [],
    "fit60k": ["--data.val_size", "0"],
    "-bar": ["--data.val_size", "0", "--trainer.enable_progress_bar", "false"],
    "-log": ["--data.val_size", "0", "--trainer.logger", "false"],
    "-ckpt": ["--data.val_size", "0", "--trainer.enable_checkpointing", "false"],
    "-digest": ["--data.val_size", "0"],
    "-thread": ["--data.val_size", "0"],
    "nice": ["--data.val_size", "0"],
    "-write": ["--data.val_size", "0"],
    "-copy": ["--data.val_size", "0"],
    "bf16": ["--data.val_size", "0", "--trainer.precision", "bf16-mixed"],
    "tqdm": ["--data.val_size", "0", "--trainer.callbacks", "TQDMProgressBar"],  # Lightning's bar, every batch
    "bare": ["--data.val_size", "0", "--trainer.enable_progress_bar", "false", "--trainer.logger", "false",
             "--trainer.enable_checkpointing", "false"],
}  # fmt: skip


def command(side: str, epochs: int, data_dir: str, torchvision_dir: str, workdir: str) -> list[str]:
    side = side.partition("+")[0].partition("@")[0]  # fit60k@before: the same side on another checkout (--before)
    if side in FIT_SWITCHES:
        cmd = [sys.executable, __file__, "--fit", side, "--", "fit", "--data.data_dir", data_dir]
        cmd += ["--trainer.max_epochs", str(epochs), "--trainer.default_root_dir", workdir]
        return cmd + FIT_SWITCHES[side]
    source = data_dir if side in ("best", "plain", "plain_ckpt") else torchvision_dir
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


def side_env(side: str, env: dict[str, str], before: str | None) -> dict[str, str]:
    """A side's environment: SIDE+NAME=VALUE+... sets variables (fit60k+GOMP_SPINCOUNT=10000); SIDE@before runs
    on the checkout --before names."""
    name, *assignments = side.split("+")
    env = {**env, **dict(a.split("=", 1) for a in assignments)}
    return {**env, "PYTHONPATH": before or ""} if name.endswith("@before") else env


def run_fit(side: str, args: list[str]) -> None:
    """python -m mnist_lit with args, in this process, with the side's piece of checkpoint work taken out."""
    from concurrent.futures import Future

    if side in ("-digest", "-thread", "nice", "-write", "-copy"):
        from mnist_lit.checkpoints import io as checkpoint_io
    if side == "nice":  # the writer thread at the lowest priority: it takes the cores only when training leaves one
        import threading
        from concurrent.futures import ThreadPoolExecutor

        def lowest() -> None:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)

        def submit(self: checkpoint_io.AtomicCheckpointIO, fn: object, *args: object) -> Future:
            self._raise_error()
            if self._writer is None:
                self._writer = ThreadPoolExecutor(1, "checkpoint-writer", initializer=lowest)
            return self._writer.submit(self._run, fn, *args)

        checkpoint_io.AtomicCheckpointIO._submit = submit  # type: ignore[method-assign]
    if side == "-write":  # the writer thread idle: saves serialised and dropped (benchmark only)
        checkpoint_io.write_atomically = lambda path, data: None  # type: ignore[assignment]
    if side == "-copy":  # no second copy as last.ckpt (benchmark only)
        checkpoint_io.AtomicCheckpointIO.copy = lambda self, source, target: None  # type: ignore[method-assign]
    if side == "-digest":
        checkpoint_io.digest = lambda checkpoint: "0" * 64  # type: ignore[assignment]
    if side == "-thread":

        def inline(self: checkpoint_io.AtomicCheckpointIO, fn: object, *args: object) -> Future:
            self._raise_error()
            self._run(fn, *args)
            done: Future = Future()
            done.set_result(None)
            return done

        checkpoint_io.AtomicCheckpointIO._submit = inline  # type: ignore[method-assign]
    from lightning.pytorch.loops.fit_loop import _FitLoop

    advance, epoch_times = _FitLoop.advance, []

    def timed_advance(self: _FitLoop) -> None:  # one epoch: timed per epoch, nothing added per step
        started = time.perf_counter()
        advance(self)
        epoch_times.append(time.perf_counter() - started)

    _FitLoop.advance = timed_advance  # type: ignore[method-assign]
    atexit.register(lambda: print("EPOCHS " + " ".join(f"{s:.4f}" for s in epoch_times), flush=True))
    from mnist_lit.__main__ import main as mnist_lit

    sys.argv = ["mnist_lit", *args]
    mnist_lit()


INTERLEAVED_SIDES = "fit60k,-ckpt,-bar,-curves,bare,lightning"


def interleaved_benchmark(data_dir: str, epochs: int, chunk: int, sides: list[str], extra: list[str]) -> None:
    """One `fit --data.val_size 0` process, as shipped, whose steps are timed in chunks of `chunk`, each followed by
    `chunk` steps of the best hand-written loop in the same process (its own model and optimiser, the same data and
    threads): a slow spell hits both sides of a pair alike. Between chunks the fit's callbacks change to the next
    side's (a benchmark seam: the trainer's callback list, edited between steps)."""
    import torch
    import torch.nn.functional as F
    from lightning.pytorch import Callback, Trainer

    from mnist_lit.__main__ import run
    from mnist_lit.checkpoints.callback import Checkpoint
    from mnist_lit.cli import lightning as cli
    from mnist_lit.datasets.catalog import find_files
    from mnist_lit.datasets.idx import load_split
    from mnist_lit.model import Net as FlatNet
    from mnist_lit.report import ProgressBar, TrainingCurves

    # lightning: Lightning's loop alone, around the same LitMNIST and loader: no callback but this benchmark's, no
    # logger (the floor any fit with Lightning's automatic optimisation stands on)
    without = {"fit60k": (), "-ckpt": (Checkpoint,), "-bar": (ProgressBar,), "-curves": (TrainingCurves,),
               "bare": (Checkpoint, ProgressBar, TrainingCurves), "lightning": (Callback,)}  # fmt: skip
    if unknown := [side for side in sides if side not in without]:
        sys.exit(f"--interleaved sides are {', '.join(without)}, not {', '.join(unknown)}")
    x, y = load_split(find_files(Path(data_dir)), train=True, verify=False)
    torch.manual_seed(2)
    model = FlatNet().to(memory_format=torch.channels_last)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.5, fused=True)
    order: list[torch.Tensor] = []

    def best_loop() -> float:
        started = time.perf_counter()
        for _ in range(chunk):
            if not order or order[-1].numel() == 0:
                order[:] = list(torch.randperm(len(x)).split(64))[::-1]
            index = order.pop()
            data, target = x[index].contiguous(memory_format=torch.channels_last), y[index]
            optimiser.zero_grad()
            F.nll_loss(model(data), target).backward()
            optimiser.step()
        return time.perf_counter() - started

    pairs: dict[str, list[tuple[float, float]]] = {side: [] for side in sides}
    by_position: dict[int, list[float]] = {k: [] for k in range(10)}  # fit60k's steps, by global_step % 10

    class Interleave(Callback):
        def __init__(self) -> None:
            self.started, self.step_started, self.steps, self.turn, self.all = 0.0, 0.0, 0, 0, None
            self.loggers: list | None = None

        def on_train_batch_start(self, trainer: Trainer, *args: object) -> None:
            now = time.perf_counter()
            if self.steps % chunk == 0:
                self.started = now
            elif sides[self.turn % len(sides)] == "fit60k" and self.steps > 3 * chunk:
                by_position[trainer.global_step % 10].append(now - self.step_started)
            self.step_started = now

        def on_train_batch_end(self, trainer: Trainer, *args: object) -> None:
            self.steps += 1
            if self.steps % chunk:
                return
            fit = time.perf_counter() - self.started
            if self.steps > 3 * chunk:  # after a warm-up
                pairs[sides[self.turn % len(sides)]].append((fit, best_loop()))
            self.all = self.all or list(trainer.callbacks)
            self.loggers = self.loggers if self.loggers is not None else list(trainer.loggers)
            self.turn += 1
            side = sides[self.turn % len(sides)]
            trainer.callbacks[:] = [c for c in self.all if c is self or not isinstance(c, without[side])]
            trainer.loggers = [] if side == "lightning" else self.loggers

    instantiate = cli.MNISTCLI.instantiate_trainer

    def with_interleave(self: cli.MNISTCLI, **kwargs: object) -> Trainer:
        trainer = instantiate(self, **kwargs)
        trainer.callbacks.insert(0, Interleave())
        return trainer

    cli.MNISTCLI.instantiate_trainer = with_interleave  # type: ignore[method-assign]
    with tempfile.TemporaryDirectory() as root:
        run(["fit", "--data.data_dir", data_dir, "--data.val_size", "0", "--trainer.max_epochs", str(epochs),
                  "--trainer.default_root_dir", root, *extra])  # fmt: skip
    print(f"\nms per step, median over chunks of {chunk} steps; x best: median of each chunk's ratio to the best loop's"
          " chunk right after it")  # fmt: skip
    best = statistics.median(b for side in sides for _, b in pairs[side]) / chunk * 1e3
    print(f"  {'best':10s} {best:6.3f}")
    for side in sides:
        ratios = [f / b for f, b in pairs[side]]
        fit = statistics.median(f for f, _ in pairs[side]) / chunk * 1e3
        print(f"  {side:10s} {fit:6.3f}   x best {statistics.median(ratios):.3f}   ({len(ratios)} chunks)")
    if by_position[0]:  # the step that saves ends at a global step that divides by 10
        steps = " ".join(f"{statistics.median(by_position[k]) * 1e3:.2f}" for k in range(10))
        print(f"fit60k's steps, ms (median), from the one ending on a save (every 10 steps) to the 9th after: {steps}")


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


def loader_benchmark(data_dir: str, rounds: int) -> None:
    """One epoch of batches (60k images, batch 64, shuffled) from mnist_lit's in-memory BatchLoader against torch's
    DataLoader over a TensorDataset, the library way to batch tensors in memory; no training, one thread."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from mnist_lit.datasets.batches import BatchLoader, EpochBatches
    from mnist_lit.datasets.catalog import find_files
    from mnist_lit.datasets.idx import load_split

    torch.set_num_threads(1)
    x, y = load_split(find_files(Path(data_dir)), train=True, verify=False)
    loaders = {
        "BatchLoader": lambda: BatchLoader(x, y, EpochBatches(len(x), 64, shuffle=True, seed=1)),
        "DataLoader(TensorDataset)": lambda: DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True),
    }
    times: dict[str, list[float]] = {name: [] for name in loaders}
    for _ in range(rounds):
        for name, make in loaders.items():
            start = time.perf_counter()
            for _batch in make():
                pass
            times[name].append(time.perf_counter() - start)
    for name, values in times.items():
        per_batch = statistics.median(values) / 938 * 1e3
        print(f"  {name:26s} {statistics.median(values):6.3f} s an epoch, {per_batch:.3f} ms a batch (median)")


def fit_then_test(
    side: str, fit_args: list[str], common: list[str], env: dict[str, str], root: str
) -> tuple[float, float]:
    """`fit FIT_ARGS` then `test COMMON --ckpt_path last`, whole processes in root as a user runs them: the fit's
    wall time and the test accuracy (the benchmark ends, naming side, if either fails)."""
    fit = [sys.executable, "-m", "mnist_lit", "fit", *fit_args]
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
    return elapsed, float(found[1])


def recipe_benchmark(data_dir: str, seeds: list[int], env: dict[str, str]) -> None:
    """configs/fast.yaml against the default recipe: `fit` then `test`, whole processes, alternated per seed."""
    fit_times: dict[str, list[float]] = {"default": [], "fast": []}
    accuracies: dict[str, list[float]] = {"default": [], "fast": []}
    with tempfile.TemporaryDirectory() as scratch:
        for i, seed in enumerate(seeds):
            for side in ("default", "fast") if i % 2 == 0 else ("fast", "default"):
                root = tempfile.mkdtemp(dir=scratch)
                common = ["--data.data_dir", data_dir, "--trainer.default_root_dir", root]
                config = ["--config", str(ROOT / "configs" / "fast.yaml")] if side == "fast" else []
                elapsed, accuracy = fit_then_test(side, [*config, *common, "--seed_everything", str(seed)], common,
                                                  env, root)  # fmt: skip
                fit_times[side].append(elapsed)
                accuracies[side].append(accuracy)
                print(f"seed {seed} {side:8s} fit {elapsed:6.1f} s   test accuracy {100 * accuracy:.2f}%", flush=True)
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
    parser.add_argument("--sides", default="best,fit60k,-bar,-log,-ckpt,-digest,-thread,bare")
    parser.add_argument("--recipe", action="store_true", help="configs/fast.yaml against the default: fit + test")
    parser.add_argument("--seeds", default="1,2,3", help="with --recipe: the seeds, each run by both sides")
    parser.add_argument("--run", help=argparse.SUPPRESS)
    parser.add_argument("--epochs", type=int, help="epochs per run (default 4)")
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--loaders", action="store_true", help="the in-memory loader against DataLoader")
    parser.add_argument("--fit", help=argparse.SUPPRESS)
    parser.add_argument("--before", help="another checkout of mnist_lit, for sides named SIDE@before")
    parser.add_argument("--interleaved", action="store_true", help="fit and the best loop in one process, by chunks")
    parser.add_argument("--chunk", type=int, default=100, help="with --interleaved: steps per chunk")
    if "--fit" in sys.argv:  # a fit side: the rest of the line is mnist_lit's
        at = sys.argv.index("--")
        run_fit(sys.argv[sys.argv.index("--fit") + 1], sys.argv[at + 1 :])
        return
    extra = sys.argv[sys.argv.index("--") + 1 :] if "--" in sys.argv else []
    args = parser.parse_args(sys.argv[1 : sys.argv.index("--")] if "--" in sys.argv else None)
    if args.interleaved:
        sides = args.sides.split(",") if "--sides" in sys.argv else INTERLEAVED_SIDES.split(",")
        interleaved_benchmark(str(Path(args.data_dir).expanduser()), args.epochs or 6, args.chunk, sides, extra)
        return
    if args.run:
        run_loop(args.run, args.epochs, args.data_dir, args.workdir, args.device)
        return
    data_dir = str(Path(args.data_dir).expanduser())
    sides = args.sides.split(",")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    if args.loaders:
        loader_benchmark(data_dir, args.rounds)
        return
    if args.recipe:
        recipe_benchmark(data_dir, [int(s) for s in args.seeds.split(",")], env)
        return
    # Each side's processes time their own epochs (the loop around each epoch, Lightning's fit loop's advance):
    # start-up, data loading and the final test are left out, and the first epoch (warm-up) too. Per round a side's
    # time is the median of its later epochs; sides alternate A B C A B C, so that a slow spell on this shared
    # machine hits all of them alike, and the ratio to the first side is taken per round, then its median.
    per_epoch: dict[str, list[float]] = {side: [] for side in sides}
    with tempfile.TemporaryDirectory() as scratch:
        tv_dir = torchvision_layout(data_dir, os.path.join(scratch, "tv")) if "guide" in sides else ""
        for round_ in range(args.rounds):
            for side in sides:
                workdir = tempfile.mkdtemp(dir=scratch)
                done = subprocess.run(
                    command(side, args.epochs or 4, data_dir, tv_dir, workdir),
                    env=side_env(side, env, args.before),
                    cwd=workdir,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
                found = re.findall(r"^EPOCHS (.*)$", done.stdout, re.M)
                if done.returncode or not found:
                    sys.exit(f"{side} failed:\n{done.stdout[-3000:]}")
                epochs = [float(s) for s in found[-1].split()]
                per_epoch[side].append(statistics.median(epochs[1:]))
                shown = " ".join(f"{s:5.2f}" for s in epochs)
                print(f"round {round_ + 1} {side:14s} epochs: {shown} s", flush=True)
                shutil.rmtree(workdir)
    print("\nper epoch, s: median of each run's epochs after the first; median over rounds")
    for side in sides:
        values = " ".join(f"{v:5.2f}" for v in per_epoch[side])
        print(f"  {side:14s} {statistics.median(per_epoch[side]):5.2f}   (rounds: {values})")
    first = sides[0]
    print(f"ratios per epoch to {first}: median over rounds of each round's ratio")
    for side in sides[1:]:
        ratios = [a / b for a, b in zip(per_epoch[side], per_epoch[first], strict=True)]
        values = " ".join(f"{v:.2f}" for v in ratios)
        print(f"  {side:14s} / {first}: {statistics.median(ratios):.2f}x   (rounds: {values})")
    if "fit60k" in sides:
        print("what each piece costs per epoch: fit60k minus the side without it, median over rounds, s")
        for side in sides:
            if side.startswith("-") or side == "bare":
                saved = [a - b for a, b in zip(per_epoch["fit60k"], per_epoch[side], strict=True)]
                print(
                    f"  {side:10s} {statistics.median(saved):+5.2f}   (rounds: {' '.join(f'{v:+.2f}' for v in saved)})"
                )


if __name__ == "__main__":
    main()
