"""Time to accuracy: what a user waits for a model good enough to use, for each shipped recipe.

For each config and seed, `python -m mnist_lit fit` then `test --ckpt_path last`, as a user runs them, with one
callback added to fit (EveryEpochTest below): after each training epoch it measures the test accuracy, its own time
left out, and notes the training time when the accuracy first reached 99.0% and 99.5%. Sides alternate per seed
(A B C, then C B A ...), so that a slow spell on a shared machine hits all of them alike. Prints a table whose unit
is the default recipe's mean fit time in the same run, and the per-config means.

    python tests/benchmarks/time_to_accuracy.py [--data_dir ../shared/mnist] [--seeds 1,2,3]
        [--configs default,fast,net99,bn99,bn995,convnet]   # names in configs/ (default: the guide's recipe, no config)

The fit time is the process's wall time (start-up and data loading included, as a user waits for them) less the
callback's test passes (not the rest of its cost: here the default's fit read 53 s with it, 45-48 s without);
the crossing times count from the start of training (after start-up and data loading).
An epoch is the callback's grain: a crossing is reported at the end of the first epoch that reached it. The
callback draws no random numbers and leaves the model as it found it: a fit with it ends on the same weights, bit
for bit, as one without (checked on the synthetic files).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

ROOT = Path(__file__).resolve().parents[2]
BARS = (0.990, 0.995)
OUT = "TIME_TO_ACCURACY_OUT"  # where the callback writes its curve (JSON lines), set by the benchmark


class EveryEpochTest(Callback):
    """The test set's accuracy after every training epoch, with the training time it took to get there (its own
    test passes left out). Evaluation only: no random numbers drawn, the model put back in training mode."""

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.start, self.testing = time.perf_counter(), 0.0
        datamodule = trainer.datamodule
        datamodule.setup("test")
        self.loader = datamodule.test_dataloader()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        began = time.perf_counter()
        trained = began - self.start - self.testing  # the earlier test passes left out
        pl_module.eval()
        right = total = 0
        with torch.no_grad():
            for images, labels in self.loader:
                images, labels = images.to(pl_module.device), labels.to(pl_module.device)
                right += int((pl_module(images).argmax(1) == labels).sum())
                total += len(labels)
        pl_module.train()
        self.testing += time.perf_counter() - began
        point = {"epoch": trainer.current_epoch + 1, "seconds": trained, "accuracy": right / total,
                 "testing": self.testing}  # fmt: skip
        with open(os.environ[OUT], "a") as out:
            out.write(json.dumps(point) + "\n")


def run(config: str, seed: int, data_dir: str, scratch: str) -> dict:
    from fit import fit_then_test  # tests/benchmarks/fit.py; here, not above: the fits import this module

    root = tempfile.mkdtemp(dir=scratch)
    curve = Path(root) / "curve.jsonl"
    path = os.pathsep.join([str(ROOT), str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, OUT: str(curve), "PYTHONPATH": path}
    chosen = [] if config == "default" else ["--config", str(ROOT / "configs" / f"{config}.yaml")]
    common = ["--data.data_dir", data_dir, "--trainer.default_root_dir", root, "--trainer.enable_progress_bar", "false"]
    fit = [*chosen, *common, "--seed_everything", str(seed), "--trainer.callbacks+=time_to_accuracy.EveryEpochTest"]
    wall, accuracy = fit_then_test(config, fit, common, env, root)
    points = [json.loads(line) for line in curve.read_text().splitlines()]
    crossed = {bar: next((p["seconds"] for p in points if p["accuracy"] >= bar), None) for bar in BARS}
    return {"fit": wall - points[-1]["testing"], "accuracy": accuracy, "crossed": crossed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", default=str(ROOT.parent / "shared" / "mnist"))
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--configs", default="default,fast,net99,bn99,bn995,convnet")
    args = parser.parse_args()
    configs, seeds = args.configs.split(","), [int(s) for s in args.seeds.split(",")]
    if "default" not in configs:
        configs.insert(0, "default")  # the unit
    results: dict[str, list[dict]] = {c: [] for c in configs}
    print(f"{os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        for i, seed in enumerate(seeds):
            for config in configs if i % 2 == 0 else configs[::-1]:
                result = run(config, seed, str(Path(args.data_dir).expanduser()), scratch)
                results[config].append(result)
                at = "  ".join(f"{100 * b:.1f}% at {t:.1f} s" if t is not None else f"{100 * b:.1f}% -"
                               for b, t in result["crossed"].items())  # fmt: skip
                print(f"seed {seed} {config:8s} fit {result['fit']:6.1f} s  test {100 * result['accuracy']:.2f}%  {at}",
                      flush=True)  # fmt: skip
    unit = statistics.mean(r["fit"] for r in results["default"])
    print(f"\nmeans over seeds {args.seeds}; unit: the default recipe's fit, {unit:.1f} s")
    print(f"{'config':8s} {'fit':>8s} {'x default':>10s} {'test acc':>9s} " + " ".join(f"{f'{100 * b:.1f}% at':>16s}"
          for b in BARS))  # fmt: skip
    for config, runs in results.items():
        fit = statistics.mean(r["fit"] for r in runs)
        cells = []
        for bar in BARS:
            times = [r["crossed"][bar] for r in runs]
            reached = [t for t in times if t is not None]
            cell = f"{statistics.mean(reached):.1f} s {statistics.mean(reached) / unit:.2f}x" if reached else "-"
            cells.append(f"{cell}{'' if len(reached) in (0, len(times)) else f' ({len(reached)}/{len(times)})'}")
        accuracy = 100 * statistics.mean(r["accuracy"] for r in runs)
        print(f"{config:8s} {fit:7.1f}s {fit / unit:9.2f}x {accuracy:8.2f}% " + " ".join(f"{c:>16s}" for c in cells))


if __name__ == "__main__":
    main()
