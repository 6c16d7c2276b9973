"""The guide's network, and the LightningModule that trains and evaluates it."""

from __future__ import annotations

import functools
import inspect
import math
import os
import re
import warnings
from typing import IO, Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from mnist_lit.checkpoints import check_weights, load_checkpoint
from mnist_lit.errors import CheckpointError, first_line
from mnist_lit.lean import LeanHooks
from mnist_lit.trust import check_model_hparams, check_spec

# The guide's optimizer, as the class_path spec jsonargparse shows in --print_config and saves in checkpoints (a
# callable object there would need unpickling code to load). fused: the whole update in one kernel, bit for bit
# the same numbers, twice as fast on CPU as the default loop.
GUIDE_SGD: dict[str, Any] = {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.01, "momentum": 0.5, "fused": True}}


class Net(nn.Module):
    """The guide's CNN, layer for layer: its state_dict and the guide's are interchangeable."""

    log_probabilities = True  # its forward ends in log_softmax: LitMNIST applies none of its own

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


class ConvNet(nn.Module):
    """A small modern CNN for 28x28 images: two blocks of two 3x3 convolutions with batch norm, max pooling after
    each block, dropout and one linear layer. Outputs logits."""

    def __init__(self, width: int = 16, dropout: float = 0.25) -> None:
        """
        Args:
            width: Channels of the first block; the second has twice as many.
            dropout: Dropout before the linear layer.
        """
        super().__init__()

        def block(inputs: int, outputs: int) -> nn.Sequential:
            layers = []
            for channels in (inputs, outputs):
                layers += [nn.Conv2d(channels, outputs, 3, padding=1, bias=False), nn.BatchNorm2d(outputs), nn.ReLU()]
            return nn.Sequential(*layers, nn.MaxPool2d(2))

        self.block1 = block(1, width)
        self.block2 = block(width, 2 * width)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(2 * width * 7 * 7, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.dropout(torch.flatten(self.block2(self.block1(x)), 1)))


NET_SPEC: dict[str, Any] = {"class_path": "mnist_lit.model.Net", "init_args": {}}  # the default network


def log_probabilities(net: nn.Module, outputs: Tensor) -> Tensor:
    """A network's outputs as log-probabilities: log_softmax unless it says it applied one (Net). Applied to
    log-probabilities it would change nothing but the float rounding, which the guide's numbers must keep."""
    return outputs if getattr(net, "log_probabilities", False) else F.log_softmax(outputs, dim=1)


def build_net(net: nn.Module | dict[str, Any] | None) -> nn.Module:
    """The network: the guide's Net by default, a class-path spec checked as data (mnist_lit.trust) and built, or a
    module given in Python."""
    if net is None:
        return Net()
    if isinstance(net, dict):
        cls = check_spec("net", net)
        return cls(**(net.get("init_args") or {}))
    if not isinstance(net, nn.Module):
        raise ValueError(f"--model.net: {type(net).__name__} is not a torch.nn.Module")
    return net


def check_contract(net: nn.Module) -> None:
    """What a network must do, checked once, early: take a batch of N x 1 x 28 x 28 images and give N x 10 outputs
    (logits or log-probabilities)."""
    name = type(net).__name__
    training = net.training
    try:
        with torch.no_grad():
            outputs = net.eval()(torch.zeros(2, 1, 28, 28))
    except Exception as err:  # whatever the user's network raises
        raise ValueError(
            f"--model.net {name}: fails on a batch of 2 images of 1x28x28 ({type(err).__name__}: {err})"
        ) from None
    finally:
        net.train(training)
    if not isinstance(outputs, Tensor) or tuple(outputs.shape) != (2, 10):
        shape = tuple(outputs.shape) if isinstance(outputs, Tensor) else type(outputs).__name__
        raise ValueError(
            f"--model.net {name}: gives {shape} for a batch of 2 images of 1x28x28; it must give (2, 10):"
            f" one output per class (logits or log-probabilities)"
        )


def _metric_name(name: str) -> str:
    return re.sub(r"\W+", "_", name).strip("_")


def layers(net: nn.Module) -> list[str]:
    """The names of the network's layers that have weights: what --model.freeze can name."""
    return [name for name, module in net.named_children() if any(True for _ in module.parameters())]


class LitMNIST(LeanHooks, LightningModule):
    """Trains the guide's Net (or any network); logs train/loss, train/lr, val/loss, val/acc, test/loss, test/acc.

    LeanHooks (mnist_lit.lean) only trims Lightning's bookkeeping around each step; read it as a LightningModule."""

    TRAIN_METRICS = ("train/loss", "train/lr")  # what fit logs, for callbacks that watch one (EarlyStopping ...)
    VAL_METRICS = ("val/loss", "val/acc")

    def __init__(
        self,
        net: nn.Module | None = None,
        optimizer: OptimizerCallable = GUIDE_SGD,
        lr_scheduler: LRSchedulerCallable | None = None,
        channels_last: bool = True,
        init_from: str | None = None,
        freeze: tuple[str, ...] = (),
    ) -> None:
        """
        Args:
            net: The network, any torch.nn.Module by class path with its own options, e.g. --model.net
                mnist_lit.model.ConvNet --model.net.width 32. It takes N x 1 x 28 x 28 images and gives N x 10
                outputs, logits or log-probabilities. Default: the guide's Net.
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
            freeze: Layers of the network that training leaves unchanged, e.g. [conv1, conv2] for the Net.
        """
        super().__init__()
        # init_from is not recorded: a resumed or tested run has its weights from its own checkpoint.
        self.save_hyperparameters(ignore=["init_from"])
        if not isinstance(self.hparams.get("net"), dict):  # built here, or given as a module in Python
            self.hparams["net"] = NET_SPEC if net is None else spec_of(net)
        self.make_optimizer = _from_spec("optimizer", optimizer)
        self.make_scheduler = _from_spec("lr_scheduler", lr_scheduler) if lr_scheduler is not None else None
        self.net = build_net(net)
        check_contract(self.net)
        if unknown := [name for name in freeze if name not in layers(self.net)]:
            raise ValueError(
                f"--model.freeze: {', '.join(unknown)} is not a layer of the {type(self.net).__name__}; it has"
                f" {', '.join(layers(self.net))}"
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
    def load_from_checkpoint(  # type: ignore[override]
        cls,
        checkpoint_path: str | os.PathLike | IO[bytes],
        map_location: Any = None,
        hparams_file: Any = None,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> LitMNIST:
        """Lightning's, for a file from elsewhere: its digest verified and its hyperparameters checked as data
        (mnist_lit.trust), then the model built from them here, never by importing what a file names.
        kwargs override the checkpoint's hyperparameters, as in Lightning's."""
        if hparams_file is not None:
            raise ValueError("hparams_file: give the hyperparameters to change as keyword arguments instead")
        if isinstance(checkpoint_path, (str, os.PathLike)):
            checkpoint = load_checkpoint(checkpoint_path)
        else:
            checkpoint = load_checkpoint(getattr(checkpoint_path, "name", "the checkpoint"), checkpoint_path.read())
        model = cls(**{**hparams_from(checkpoint), **kwargs})
        model.load_state_dict(checkpoint["state_dict"], strict=True if strict is None else strict)
        return model.to(map_location) if isinstance(map_location, (str, torch.device)) else model

    def forward(self, x: Tensor) -> Tensor:
        """Log-probabilities of the classes."""
        return log_probabilities(self.net, self.net(x.contiguous(memory_format=self.memory_format)))

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


def spec_of(net: nn.Module) -> dict[str, Any]:
    """A class-path spec for a module given in Python, for the checkpoint: its class, and the arguments it records
    (none, unless the module keeps them as `init_args`; pass net as a spec to have it rebuilt with its own)."""
    cls = type(net)
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": dict(getattr(net, "init_args", {}))}


def hparams_from(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The LitMNIST arguments a checkpoint was trained with (checked as data when it was loaded), as specs."""
    hparams = check_model_hparams(checkpoint.get("hyper_parameters"))
    if "lr" in hparams or "momentum" in hparams:  # written before the optimizer became an option: the guide's SGD
        init_args = {**GUIDE_SGD["init_args"], "lr": hparams.pop("lr", 0.01), "momentum": hparams.pop("momentum", 0.5)}
        hparams["optimizer"] = {**GUIDE_SGD, "init_args": init_args}
    return hparams


def net_from(
    ckpt_path: str | os.PathLike, checkpoint: dict[str, Any], hparams: dict[str, Any] | None = None
) -> nn.Module:
    """The network a checkpoint holds, rebuilt from its spec (checked as data) with its weights, in eval mode; its
    convolution weights in the plain layout (a channels_last run's are not)."""
    net = build_net((hparams_from(checkpoint) if hparams is None else hparams).get("net"))
    check_weights(ckpt_path, checkpoint, nn.ModuleDict({"net": net}))
    state = {k.removeprefix("net."): v.contiguous() for k, v in checkpoint["state_dict"].items()}
    net.load_state_dict(state, strict=True)
    try:  # what serve and export would otherwise find out from a request, or not at all
        check_contract(net)
    except ValueError as err:
        raise CheckpointError(f"{ckpt_path} holds a network that is of no use here: {err}") from None
    return net.eval()


def _from_spec(field: str, value: Any) -> Any:
    """A callable from a class_path spec (the default, or a spec given in Python or read from a checkpoint), checked
    as data first (mnist_lit.trust); callables pass through."""
    if not isinstance(value, dict):
        return value
    cls = check_spec(field, value)
    return functools.partial(cls, **(value.get("init_args") or {}))


def _spec_args(spec: Any) -> dict[str, Any]:
    return dict(spec.get("init_args", {})) if isinstance(spec, dict) else {}


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


def check_scheduler(optimizer: OptimizerCallable | dict[str, Any], scheduler: dict[str, Any] | None) -> None:
    """Refuse a schedule's bad options now, in one line, not as a traceback at its first step: it is built on a probe
    optimizer and stepped a few times (torch checks some arguments only when the schedule runs: T_max 0, a
    last_epoch without initial_lr). Only the arguments given that differ from the class's defaults are passed."""
    if scheduler is None:
        return
    cls = check_spec("lr_scheduler", {**scheduler, "init_args": {}})
    defaults = {name: p.default for name, p in inspect.signature(cls).parameters.items()}
    given = {k: v for k, v in _spec_args(scheduler).items() if k not in defaults or defaults[k] != v}
    check_spec("lr_scheduler", {**scheduler, "init_args": given})
    optimizer = _from_spec("optimizer", optimizer)([nn.Parameter(torch.zeros(1))])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "step() before optimizer.step()": a probe has no training step
            if "total_steps" in defaults and "total_steps" not in given and given.get("epochs") is None:
                given["total_steps"] = 8  # the run's length, as configure_optimizers gives it
            schedule = cls(optimizer, **given)
            length = getattr(schedule, "total_steps", None)  # a one-cycle of N steps takes N - 1 after its first
            for _ in range(min(3, length - 1) if isinstance(length, int) else 3):
                optimizer.step(lambda: torch.zeros(()))  # a closure: LBFGS takes one
                schedule.step(*([1.0] if isinstance(schedule, torch.optim.lr_scheduler.ReduceLROnPlateau) else []))
    except (ValueError, TypeError, KeyError, IndexError, ZeroDivisionError, RuntimeError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        raise ValueError(f"--model.lr_scheduler {cls.__name__}: {first_line(ValueError(message))}") from None
