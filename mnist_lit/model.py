"""The guide's network, and the LightningModule that trains and evaluates it."""

from __future__ import annotations

import functools
import inspect
import io
import math
import os
import re
from typing import Any

import torch
import torch.nn.functional as F
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from mnist_lit.checkpoint import check_weights
from mnist_lit.storage import load_checkpoint, read_bytes
from mnist_lit.trust import check_spec

# The guide's optimizer, as the class_path spec jsonargparse shows in --print_config and saves in checkpoints (a
# callable object there would need unpickling code to load). fused: the whole update in one kernel, bit for bit
# the same numbers, twice as fast on CPU as the default loop.
GUIDE_SGD: dict[str, Any] = {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.01, "momentum": 0.5, "fused": True}}


class Net(nn.Module):
    """The guide's CNN, layer for layer: its state_dict and the guide's are interchangeable."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.conv2_drop = nn.Dropout2d()
        self.fc1 = nn.Linear(320, 50)
        self.fc2 = nn.Linear(50, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2_drop(self.conv2(x)), 2))
        # The guide's x.view(-1, 320), written so that it also takes channels_last activations: same values.
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = self.fc2(x)
        return F.log_softmax(x, dim=1)


def _metric_name(name: str) -> str:
    return re.sub(r"\W+", "_", name).strip("_")


def layers(net: Net) -> list[str]:
    """The names of the Net's layers that have weights: what --model.freeze can name."""
    return [name for name, module in net.named_children() if any(True for _ in module.parameters())]


class LitMNIST(LightningModule):
    """Trains the guide's Net; logs train/loss, train/lr, val/loss, val/acc, test/loss, test/acc."""

    TRAIN_METRICS = ("train/loss", "train/lr")  # what fit logs, for callbacks that watch one (EarlyStopping ...)
    VAL_METRICS = ("val/loss", "val/acc")

    def __init__(
        self,
        optimizer: OptimizerCallable = GUIDE_SGD,
        lr_scheduler: LRSchedulerCallable | None = None,
        channels_last: bool = True,
        init_from: str | None = None,
        freeze: tuple[str, ...] = (),
    ) -> None:
        """
        Args:
            optimizer: Any torch.optim optimizer and its options, e.g. --model.optimizer Adam
                --model.optimizer.lr 0.001. Default: the guide's SGD, lr 0.01, momentum 0.5.
            lr_scheduler: Any torch.optim.lr_scheduler, e.g. --model.lr_scheduler StepLR
                --model.lr_scheduler.step_size 3 (stepped once per epoch), or OneCycleLR
                --model.lr_scheduler.max_lr 0.2 (stepped every batch; total_steps is the run's length unless
                given). Default: none, a constant learning rate as in the guide.
            channels_last: Run convolutions in the channels_last memory format: same model and results (to
                float rounding), about 25% faster on CPU.
            init_from: Fine-tune: start fit from the weights of this checkpoint ('last': the newest one in
                <trainer.default_root_dir>/checkpoints), with a new optimizer and new step counts (to continue
                a run instead, use --ckpt_path).
            freeze: Layers of the Net that training leaves unchanged, e.g. [conv1, conv2].
        """
        super().__init__()
        # init_from is not recorded: a resumed or tested run has its weights from its own checkpoint.
        self.save_hyperparameters(ignore=["init_from"])
        self.make_optimizer = _from_spec("optimizer", optimizer)
        self.make_scheduler = _from_spec("lr_scheduler", lr_scheduler) if lr_scheduler is not None else None
        self.net = Net()
        if unknown := [name for name in freeze if name not in layers(self.net)]:
            raise ValueError(
                f"--model.freeze: {', '.join(unknown)} is not a layer of the Net; it has {', '.join(layers(self.net))}"
            )
        if set(freeze) == set(layers(self.net)):
            raise ValueError("--model.freeze: freezing every layer leaves nothing to train")
        if init_from is not None:
            checkpoint = load_checkpoint(init_from)
            check_weights(init_from, checkpoint, self)
            self.load_state_dict(checkpoint["state_dict"])
        for name in freeze:
            getattr(self.net, name).requires_grad_(False)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.net.to(memory_format=self.memory_format)
        check_optimizer(self.make_optimizer)
        # Loss metrics average per-image losses in float64: summed NLL / N, exactly the guide's test loss.
        self.val_loss, self.test_loss = MeanMetric().set_dtype(torch.float64), MeanMetric().set_dtype(torch.float64)
        self.val_acc = MulticlassAccuracy(num_classes=10, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=10, average="micro")
        self.test_confusion = MulticlassConfusionMatrix(num_classes=10)
        self.confusion: Tensor | None = None

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> LitMNIST:  # type: ignore[override]
        """Lightning's, for a file from elsewhere: its digest verified and its hyperparameters checked as data
        (mnist_lit.trust) before Lightning builds anything from them. Reads the file once."""
        if isinstance(checkpoint_path, (str, os.PathLike)):
            data = read_bytes(checkpoint_path)
            load_checkpoint(checkpoint_path, data)  # verified, and its hyperparameters checked as data
            checkpoint_path = io.BytesIO(data)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.contiguous(memory_format=self.memory_format))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.nll_loss(self(x), y)
        # self.log costs ~0.4 ms a call, a tenth of a step here, and Lightning writes step metrics only every
        # log_every_n_steps steps: call it only on those. The progress bar shows every step's loss itself.
        every = self.trainer.log_every_n_steps
        if every and (self.global_step + 1) % every == 0:
            self.log("train/loss", loss)
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return loss

    def _evaluate(self, batch: tuple[Tensor, Tensor], loss: MeanMetric, acc: MulticlassAccuracy) -> Tensor:
        x, y = batch
        output = self(x)
        loss.update(F.nll_loss(output, y, reduction="none"))
        preds = output.argmax(1)
        acc.update(preds, y)
        return preds

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.val_loss, self.val_acc)
        self.log("val/loss", self.val_loss, prog_bar=True)
        self.log("val/acc", self.val_acc, prog_bar=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        preds = self._evaluate(batch, self.test_loss, self.test_acc)
        self.test_confusion.update(preds, batch[1])
        self.log("test/loss", self.test_loss)
        self.log("test/acc", self.test_acc)
        return preds

    def on_test_epoch_end(self) -> None:
        confusion = self.test_confusion.compute()  # summed over all processes
        self.confusion = confusion.cpu()  # for the report drawn after test
        counts = confusion.sum(1)
        per_class = confusion.diag() / counts.clamp(min=1)
        # Named by the data's classes (test/acc_0 for MNIST, test/acc_Trouser, test/acc_T_shirt_top for Fashion-MNIST:
        # letters, digits and _ only, as metric names go), and only classes the test set has images of.
        classes = getattr(self.trainer.datamodule, "classes", None) or [str(i) for i in range(len(counts))]
        keys = [f"test/acc_{_metric_name(name)}" for name in classes]
        # Already the same on every process; sync_dist only tells Lightning so (and keeps it from warning).
        self.log_dict({k: acc for k, acc, n in zip(keys, per_class, counts, strict=True) if n}, sync_dist=True)

    def predict_step(self, batch: tuple[Tensor, list[str], list], batch_idx: int) -> tuple[list[str], Tensor]:
        images, paths, _ = batch  # and the files skipped as unreadable, which the PredictionWriter counts
        return paths, self(images).exp()

    def configure_optimizers(self) -> Any:
        # Frozen parameters (requires_grad False) stay out of the optimizer: no state, no weight decay for them.
        optimizer = self.make_optimizer([p for p in self.parameters() if p.requires_grad])
        if self.make_scheduler is None:
            return optimizer
        # OneCycleLR's length: the run's, unless given (total_steps, or epochs and steps_per_epoch). On a resume
        # the scheduler's state, its length included, comes from the checkpoint; asking the trainer for the run's
        # length here would set up the train loader before the checkpoint's place in the epoch is restored, and
        # Lightning would then never restore it. A stand-in length there, replaced by the checkpoint's.
        given = _spec_args(self.hparams.lr_scheduler)
        if given.get("total_steps", 0) is None and given.get("epochs") is None:
            total = 1 if self.trainer.ckpt_path else int(self.trainer.estimated_stepping_batches)
            scheduler = self.make_scheduler(optimizer, total_steps=total)
        else:
            scheduler = self.make_scheduler(optimizer)
        # A schedule whose length is counted in steps (OneCycleLR) steps every batch; the others, whose sizes
        # (StepLR's step_size, ...) are in epochs, once per epoch.
        per_step = "total_steps" in inspect.signature(type(scheduler)).parameters
        config = {"scheduler": scheduler, "interval": "step" if per_step else "epoch"}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = "val/loss"
        return {"optimizer": optimizer, "lr_scheduler": config}

    def on_train_start(self) -> None:
        """A resumed run's optimizer options given anew (e.g. --model.optimizer.lr) replace the restored ones."""
        if self.trainer.ckpt_path is None:
            return
        for config in self.trainer.lr_scheduler_configs:
            length = getattr(config.scheduler, "total_steps", None)
            if isinstance(length, int) and length < self.trainer.estimated_stepping_batches:
                raise MisconfigurationException(
                    f"the {type(config.scheduler).__name__} schedule of this run ends at step {length}: a resumed run"
                    " cannot train beyond it (--trainer.max_epochs or max_steps); start a new run for a longer one"
                )
        # with a schedule, the learning rate (and a cycled momentum) is the scheduler's, restored with it
        scheduled = ("lr", "momentum", "betas") if self.trainer.lr_scheduler_configs else ()
        changes = []
        for name, value in _spec_args(self.hparams.optimizer).items():
            if name in scheduled:
                continue
            for optimizer in self.trainer.optimizers:
                for group in optimizer.param_groups:
                    if name in group and tunable(value) and tunable(group[name]) and group[name] != _plain(value):
                        changes.append(f"{name} {_show(group[name])} -> {_show(value)}")
                        group[name] = _plain(value)
        if changes:
            rank_zero_info(f"optimizer: {', '.join(dict.fromkeys(changes))} from this resume on")


def _from_spec(field: str, value: Any) -> Any:
    """A callable from a class_path spec (the default, or a spec given in Python or read from a checkpoint), checked
    as data first (mnist_lit.trust); callables pass through."""
    if not isinstance(value, dict):
        return value
    cls = check_spec(field, value)
    return functools.partial(cls, **(value.get("init_args") or {}))


def _spec_args(spec: Any) -> dict[str, Any]:
    return dict(spec.get("init_args", {})) if isinstance(spec, dict) else {}


def tunable(value: Any) -> bool:
    """A number, or numbers (Adam's betas): the options a resumed optimizer can take anew."""
    if isinstance(value, (list, tuple)):
        return bool(value) and all(tunable(v) for v in value)
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _plain(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _show(value: Any) -> str:
    return f"({', '.join(map(str, value))})" if isinstance(value, (list, tuple)) else str(value)


def check_optimizer(optimizer: OptimizerCallable | dict[str, Any]) -> None:
    """Refuse bad optimizer options now, not after data loading: torch's own checks, and ranges it leaves out."""
    probe = nn.Parameter(torch.zeros(1))  # not a Net: its random initial weights would shift the seeded stream
    make = _from_spec("optimizer", optimizer)  # a spec from a file refused here is never called
    try:
        group = make([probe]).param_groups[0]
    except (ValueError, TypeError, RuntimeError) as err:
        raise ValueError(f"--model.optimizer: {err}") from None
    lr = group.get("lr")
    if isinstance(lr, (int, float)) and not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"--model.optimizer.lr: {lr} is out of range; it must be > 0 and finite")
    momentum = group.get("momentum")
    if isinstance(momentum, (int, float)) and not 0 <= momentum < 1:
        raise ValueError(f"--model.optimizer.momentum: {momentum} is out of range; it must be >= 0 and < 1")
