"""What a run leaves to look at, as callbacks: the progress bar, curves after fit, the results table, confusion
matrix and mistakes after test (drawn by figures.py), predictions."""

from __future__ import annotations

import csv
import io
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm, convert_inf
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor

from mnist_lit.checkpoints import write_atomically
from mnist_lit.datasets import DATASETS, DEFAULT, Known, skipped_line
from mnist_lit.errors import DataError, printable
from mnist_lit.figures import confusion_figure, curves_figure, image_bytes, mistakes_figure, pyplot

MAX_MISTAKES_SHOWN = 100


def _dataset(trainer: Trainer) -> Known:
    """The dataset whose classes and normalisation the run's data has."""
    return DATASETS[getattr(trainer.datamodule, "dataset", DEFAULT)]


class ProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar with the step's loss and images/s, redrawn at most every `interval` seconds.

    Lightning's bar redraws after every batch: with it an epoch of fit took 11% longer here (3.11 s against
    2.80 s, medians of 3 rounds of `python tests/benchmarks/fit.py --sides best,fit60k,tqdm`). Hand-written
    throttle, not TQDMProgressBar(refresh_rate=N): that counts batches, and no one N suits every machine (N=50
    redraws every 2.5 s at 20 batches/s, 40 times a second at 2,000); a time interval redraws 4 times a second
    on both, and costs no measurable time (the benchmark's -bar side, the bar off, was no faster).

    How the numbers count (Lightning's conventions, kept): the bar names the epoch running, from 0 ("Epoch 9" is
    the tenth of --trainer.max_epochs 10); a checkpoint's name counts what is done, so the file saved after that
    tenth epoch is epoch=10-step=8600.ckpt (10 epochs, 8600 optimizer steps: where a resume starts). curves.png
    plots against steps done too; TensorBoard puts a step's numbers at the steps done before it (Lightning logs
    them before it counts the step), so the 8600th step's loss is at 8599 there.
    """

    def __init__(self, interval: float = 0.25) -> None:
        """
        Args:
            interval: Seconds between redraws of the training bar.
        """
        super().__init__()
        self.interval = interval
        self._drawn = 0.0
        self._live: dict[str, str] = {}
        self._start, self._images = time.monotonic(), 0

    @property
    def total_train_batches(self) -> int | float:
        """The batches this epoch will run: max_steps can end it early (Lightning counts it only without
        max_epochs), and with gradient accumulation a step takes several batches."""
        total = self.trainer.num_training_batches
        if self.trainer.max_steps > 0 and math.isfinite(total):
            # private-lightning[loops]: the batches an epoch resumed mid-way has already run
            done = self.trainer.fit_loop.epoch_loop.batch_progress.current.ready  # before a mid-epoch resume
            left = (self.trainer.max_steps - self.trainer.global_step) * self.trainer.accumulate_grad_batches
            total = min(total, done + left)
        return total

    def init_predict_tqdm(self) -> Tqdm:
        # predict's results are lines on stdout, to be piped or redirected: its bar goes to stderr
        return Tqdm(
            desc=self.predict_description, position=2 * self.process_position, disable=self.is_disabled,
            leave=True, dynamic_ncols=True, file=sys.stderr, smoothing=0, bar_format=self.BAR_FORMAT,
        )  # fmt: skip

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        return {**super().get_metrics(trainer, pl_module), **self._live}

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._start, self._images = time.monotonic(), 0
        # A run resumed mid-epoch goes on without an epoch start (Lightning counts that epoch as started): its bar
        # is named and sized here, or it would show "Training" and no total.
        bar = self.train_progress_bar
        if bar is not None and not bar.disable:
            bar.reset(total=convert_inf(self.total_train_batches))
            bar.set_description(f"Epoch {trainer.current_epoch}")

    def on_train_epoch_start(self, trainer: Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self._start, self._images = time.monotonic(), 0

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._images += len(batch[1])
        bar, now = self.train_progress_bar, time.monotonic()
        if bar is None or bar.disable or (now - self._drawn < self.interval and batch_idx + 1 != bar.total):
            return
        self._drawn = now
        bar.n = batch_idx + 1
        if isinstance(outputs, dict) and "loss" in outputs:
            self._live["loss"] = f"{step_loss(trainer, outputs).item():.3f}"
        self._live["img/s"] = f"{self._images / max(now - self._start, 1e-9):.0f}"
        bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
        bar.refresh()


def step_loss(trainer: Trainer, outputs: dict[str, Any]) -> Tensor:
    """The batch's loss as training_step returned it: under gradient accumulation Lightning hands callbacks the
    loss divided by accumulate_grad_batches (what it backpropagates)."""
    return outputs["loss"].detach() * trainer.accumulate_grad_batches


def _gather(trainer: Trainer, items: list) -> list:
    """Every process's items, on every process (evaluation shards are split across DDP processes)."""
    if trainer.world_size == 1:
        return items
    gathered: list[list] = [[] for _ in range(trainer.world_size)]
    torch.distributed.all_gather_object(gathered, items)
    return [item for part in gathered for item in part]


class TrainingCurves(Callback):
    """After fit: loss and accuracy curves as curves.png in the run's log directory.

    The history rides in the checkpoint, so the curves of a resumed run start at its first step. The x axis is
    the optimizer steps done (trainer.global_step), as in the checkpoints' names; TensorBoard's is one less.
    """

    def __init__(self) -> None:
        self.train: list[tuple[int, float]] = []
        self.val: list[tuple[int, float, float]] = []
        self._loss_sum: torch.Tensor | float = 0.0
        self._batches = 0
        self._step = 0
        self._trained = False  # whether this run trained a batch (a resumed finished run trains none)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._trained = False

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._step = trainer.global_step

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._trained = True
        if not isinstance(outputs, dict):
            return
        self._loss_sum = self._loss_sum + step_loss(trainer, outputs)  # no .item(): that would wait for a GPU
        self._batches += 1
        stepped, self._step = trainer.global_step != self._step, trainer.global_step  # not mid-accumulation
        every = trainer.log_every_n_steps or 50
        # ... and at the batch a limit or a stop ends the run on: the checkpoint saved there carries the point too
        stopping = trainer.should_stop or 0 <= trainer.max_steps <= trainer.global_step
        if (stepped and trainer.global_step % every == 0) or batch_idx + 1 == trainer.num_training_batches or stopping:
            self._add_point(trainer)

    def _add_point(self, trainer: Trainer) -> None:
        self.train.append((trainer.global_step, float(self._loss_sum) / self._batches))
        self._loss_sum, self._batches = 0.0, 0

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._batches:  # a run that ended between two points (max_steps shorter than the logging interval)
            self._add_point(trainer)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        metrics = trainer.callback_metrics
        if not trainer.sanity_checking and "val/loss" in metrics:
            self.val.append((trainer.global_step, metrics["val/loss"].item(), metrics["val/acc"].item()))

    def state_dict(self) -> dict[str, Any]:
        # as tensors: one object each to pickle, however long the run (a checkpoint is written every 10 steps)
        return {"train": torch.tensor(self.train).reshape(-1, 2), "val": torch.tensor(self.val).reshape(-1, 3)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # from a checkpoint: tensors of points, or the curves start afresh (they are a picture, not the run)
        train, val = (state_dict.get(k) if isinstance(state_dict, dict) else None for k in ("train", "val"))
        if not all(isinstance(t, Tensor) and t.dim() == 2 and t.shape[1] == n for t, n in ((train, 2), (val, 3))):
            return
        self.train = [(int(step), loss) for step, loss in train.tolist()]
        self.val = [(int(step), loss, acc) for step, loss, acc in val.tolist()]

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        log_dir = trainer.log_dir  # on every process: under DDP it is a collective call
        # Only a run that trained draws: a resumed run that had nothing left to train keeps the curves its earlier
        # folder holds, and its own version folder is discarded (no line may name it).
        if not self._trained or not self.train or log_dir is None or not trainer.is_global_zero:
            return
        fig = curves_figure(pyplot(), self.train, self.val)
        path = _output_path(trainer, log_dir, "curves.png")
        _save(fig, path)
        print(f"Training curves: {path}")


class ResultsTable(Callback):
    """After test or validate: the results table on stdout, in Lightning's layout, its numbers rounded.

    Lightning's own table prints each number as Python's repr of a float32 widened to a float64
    (0.9857000112533569): this table stands in for it. Accuracies (fractions of the images, named acc...) show 4
    decimals, a hundredth of a per cent, one image in 10,000; other numbers (the loss) 6 significant digits, what
    a float32 holds without noise. --verbose false prints neither table.
    """

    def __init__(self) -> None:
        self._verbose = False
        self._table: str | None = None

    def _take_over(self, loop: Any) -> None:
        # private-lightning[EvaluationLoop.verbose]: trainer.test/validate's verbose, read where the loop prints
        self._verbose, loop.verbose = loop.verbose, False

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING:  # not fit's validation, which prints no table
            self._take_over(trainer.validate_loop)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._take_over(trainer.test_loop)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING and self._verbose and trainer.is_global_zero:
            self._table = results_table(trainer.logged_metrics, "Validate")

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._verbose and trainer.is_global_zero:
            self._table = results_table(trainer.logged_metrics, "Test")

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # printed here, where Lightning prints its table: after the bar has closed (in its own on_test_end, which
        # may come after ours), so that no line lands in the middle of the bar's
        if self._table is not None:
            print(self._table)
        self._table = None


def rounded(name: str, value: float) -> str:
    """A result as the table shows it: an accuracy to 4 decimals, anything else to 6 significant digits."""
    return f"{value:.4f}" if name.rpartition("/")[2].startswith("acc") else f"{value:.6g}"


def results_table(metrics: dict[str, Any], stage: str) -> str:
    """Lightning's plain results table (a rule, "<Stage> metric" and the value's column, a rule, a row per
    metric in name order, a rule), with rounded numbers."""
    width = max(25, *(len(name) for name in metrics))
    line = "─"
    try:  # as Lightning's: a terminal that cannot show the box-drawing line gets dashes
        line.encode(sys.stdout.encoding or "utf-8")
    except UnicodeEncodeError:
        line = "-"
    rule = line * 2 * width
    rows = [
        f"{name:^{width}}{rounded(name, float(value)):^{width}}".rstrip()
        for name, value in sorted(metrics.items())
        if name not in ("epoch", "step")
    ]
    return "\n".join([rule, f"{stage + ' metric':^{width}}{'DataLoader 0':^{width}}".rstrip(), rule, *rows, rule])


class TestReport(Callback):
    """After test: confusion.png (the confusion matrix) and mistakes.png (misclassified test digits)."""

    def __init__(self) -> None:
        self.mistakes: list[tuple[Tensor, int, int]] = []
        self._lines = ""

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.mistakes = []

    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        images, labels = batch
        wrong = (outputs != labels).nonzero().flatten()
        room = MAX_MISTAKES_SHOWN - len(self.mistakes)
        for i in wrong[:room].tolist():
            self.mistakes.append((images[i, 0].float().cpu(), int(labels[i]), int(outputs[i])))

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        mistakes = _gather(trainer, self.mistakes)[:MAX_MISTAKES_SHOWN]
        log_dir = trainer.log_dir  # on every process: under DDP it is a collective call
        if not trainer.is_global_zero or log_dir is None:
            return
        confusion, known = pl_module.confusion, _dataset(trainer)
        plt = pyplot()
        paths = [_output_path(trainer, log_dir, name) for name in ("confusion.png", "mistakes.png")]
        _save(confusion_figure(plt, confusion, known.classes), paths[0])
        _save(mistakes_figure(plt, mistakes, int(confusion.sum() - confusion.trace()), known), paths[1])
        self._lines = f"Confusion matrix: {paths[0]}\nMisclassified images: {paths[1]}"

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # after the test bar has closed, as ResultsTable's table (see there)
        if self._lines:
            print(self._lines)
        self._lines = ""


def _output_path(trainer: Trainer, log_dir: str, name: str) -> str:
    """name in the run's log folder. Without a logger that is the user's own folder (the root): there a file
    already present is kept, and the new one gets a free name beside it (name-1, name-2, ...)."""
    path = os.path.join(log_dir, name)
    stem, extension = os.path.splitext(name)
    number = 0
    while trainer.logger is None and os.path.lexists(path):
        number += 1
        path = os.path.join(log_dir, f"{stem}-{number}{extension}")
    return path


def _save(fig: Any, path: str) -> None:
    write_file(path, image_bytes(fig, os.path.splitext(path)[1][1:]))


def write_file(path: str, data: bytes) -> None:
    """A file of the run's, written whole or not at all, never through a link; a failed write names the file."""
    try:
        write_atomically(path, data)
    except OSError as err:
        raise OSError(err.errno, err.strerror, path) from None


class PredictionWriter(BasePredictionWriter):
    """After predict: one line per image on stdout, and predictions.csv in the run's log directory.

    Lightning's writer with write_interval "batch": each batch's rows are collected as it ends, and written once,
    whole and sorted by path, when predict ends (a CSV written batch by batch would be half a file after a crash,
    and under DDP the processes' shards must be gathered first).
    """

    def __init__(self) -> None:
        super().__init__(write_interval="batch")
        self.rows: list[tuple[str, list[float]]] = []
        self.skipped: list[tuple[str, str]] = []

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.rows, self.skipped = [], []

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        paths, probabilities = prediction
        self.rows.extend(zip(paths, probabilities.float().cpu().tolist(), strict=True))
        self.skipped.extend(batch[2])

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        rows, skipped = sorted(_gather(trainer, self.rows)), sorted(_gather(trainer, self.skipped))
        if skipped and trainer.is_global_zero:
            print(skipped_line(skipped, len(rows) + len(skipped), "named by --data.predict_path"), file=sys.stderr)
        if not rows:  # every file was skipped: nothing to write, and not a success
            raise DataError("no readable images among the files --data.predict_path names")
        log_dir = trainer.log_dir or trainer.default_root_dir  # on every process: a collective call under DDP
        if not trainer.is_global_zero:
            return
        os.makedirs(log_dir, exist_ok=True)
        path = _output_path(trainer, log_dir, "predictions.csv")
        classes = _dataset(trainer).classes
        # MNIST's columns stay path, digit, probability, p0..p9; other datasets name the class, and p<i> is the
        # probability of the i-th class
        column = "digit" if all(name.isdigit() for name in classes) else "class"
        table = io.StringIO(newline="")
        writer = csv.writer(table)
        writer.writerow(["path", column, "probability", *(f"p{i}" for i in range(len(classes)))])
        for image_path, probs in rows:
            best = max(range(len(probs)), key=probs.__getitem__)
            writer.writerow([image_path, classes[best], f"{probs[best]:.4f}", *(f"{p:.6f}" for p in probs)])
            print(f"{printable(image_path)}\t{classes[best]}\t{probs[best]:.4f}")
        write_file(path, table.getvalue().encode())
        print(f"Predictions: {path}", file=sys.stderr)  # stdout holds the prediction lines only
