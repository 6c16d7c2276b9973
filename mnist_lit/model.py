"""The guide's network, and the LightningModule that trains and evaluates it."""

from __future__ import annotations

import functools
import importlib
import inspect
import re
from typing import Any

import torch
import torch.nn.functional as F
from jsonargparse.typing import ClosedUnitInterval, PositiveInt
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from mnist_lit.lean import LeanHooks

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
    """A small modern CNN for 28x28 images. Outputs logits.

    Two blocks of two 3x3 convolutions with batch norm, max pooling after each block, dropout and one linear layer.
    """

    def __init__(self, width: PositiveInt = 16, dropout: ClosedUnitInterval = 0.25) -> None:
        """
        Args:
            width: Channels of the first block; the second has twice as many.
            dropout: Dropout before the linear layer (the probability of zeroing each input), below 1.
        """
        super().__init__()
        if dropout == 1:  # every input of the linear layer zeroed while training: only its bias would learn
            raise ValueError("a dropout of 1 zeroes every input of the linear layer, which then never learns")

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


class BatchNormNet(nn.Module):
    """The guide's Net with batch norm after each convolution, wider, and no dropout. Outputs logits.

    The same two 5x5 convolutions, each followed by 2x2 max pooling, then two linear layers.

    Net's shape keeps its speed on a CPU (a 28x28 image meets one convolution before it is pooled, and no padding),
    and batch norm lets it train at a peak learning rate of 0.2 (the guide's: 0.01): configs/bn99.yaml takes it past
    99% in one epoch, configs/bn995.yaml past 99.5% in six."""

    def __init__(self, width: PositiveInt = 16, hidden: PositiveInt = 256) -> None:
        """
        Args:
            width: Channels of the first convolution; the second has twice as many.
            hidden: Units of the hidden linear layer.
        """
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, kernel_size=5, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, kernel_size=5, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.fc1 = nn.Linear(2 * width * 4 * 4, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


NET_SPEC: dict[str, Any] = {"class_path": "mnist_lit.model.Net", "init_args": {}}  # the default network


def from_spec(spec: dict[str, Any]) -> Any:
    """What a class-path spec names, called with its init_args: the class imported as named. A spec is code, as in
    LightningCLI: the commands check one that comes from a file as data before it gets here (mnist_lit.runs)."""
    module, _, name = spec["class_path"].rpartition(".")
    return functools.partial(getattr(importlib.import_module(module), name), **(spec.get("init_args") or {}))


def spec_of(net: nn.Module) -> dict[str, Any]:
    """A class-path spec for a module given in Python, for the checkpoint: its class, and the arguments it records
    (none, unless the module keeps them as `init_args`; pass net as a spec to have it rebuilt with its own)."""
    cls = type(net)
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": dict(getattr(net, "init_args", {}))}


def build_net(net: nn.Module | dict[str, Any] | None) -> nn.Module:
    """The network: the guide's Net by default, built from a class-path spec, or a module given in Python."""
    if net is None:
        return Net()
    if isinstance(net, dict):
        return from_spec(net)()
    if not isinstance(net, nn.Module):
        raise ValueError(f"--model.net: {type(net).__name__} is not a torch.nn.Module")
    return net


def log_probabilities(net: nn.Module, outputs: Tensor) -> Tensor:
    """A network's outputs as log-probabilities: log_softmax unless it says it applied one (Net). Applied to
    log-probabilities it would change nothing but the float rounding, which the guide's numbers must keep."""
    return outputs if getattr(net, "log_probabilities", False) else F.log_softmax(outputs, dim=1)


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


def layers(net: nn.Module) -> list[str]:
    """The names of the network's layers that have weights: what --model.freeze can name."""
    return [name for name, module in net.named_children() if any(True for _ in module.parameters())]


def freeze_layers(net: nn.Module, names: tuple[str, ...]) -> None:
    """Leave these layers of the network unchanged by training; layers it does not have are refused."""
    if unknown := [name for name in names if name not in layers(net)]:
        raise ValueError(
            f"--model.freeze: {', '.join(unknown)} is not a layer of the {type(net).__name__}; it has"
            f" {', '.join(layers(net))}"
        )
    if set(names) == set(layers(net)):
        raise ValueError("--model.freeze: freezing every layer leaves nothing to train")
    for name in names:
        getattr(net, name).requires_grad_(False)


def _metric_name(name: str) -> str:
    return re.sub(r"\W+", "_", name).strip("_")


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
            freeze: Layers of the network that training leaves unchanged, e.g. [conv1, conv2] for the Net.
        """
        super().__init__()
        self.save_hyperparameters()
        if not isinstance(self.hparams.get("net"), dict):  # built here, or given as a module in Python
            self.hparams["net"] = NET_SPEC if net is None else spec_of(net)
        self.make_optimizer = from_spec(optimizer) if isinstance(optimizer, dict) else optimizer
        self.make_scheduler = from_spec(lr_scheduler) if isinstance(lr_scheduler, dict) else lr_scheduler
        self.net = build_net(net)
        check_contract(self.net)
        freeze_layers(self.net, freeze)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.net.to(memory_format=self.memory_format)
        # Loss metrics average per-image losses in float64: summed NLL / N, exactly the guide's test loss.
        self.val_loss, self.test_loss = MeanMetric().set_dtype(torch.float64), MeanMetric().set_dtype(torch.float64)
        self.val_acc = MulticlassAccuracy(num_classes=10, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=10, average="micro")
        self.test_confusion = MulticlassConfusionMatrix(num_classes=10)
        self.confusion: Tensor | None = None

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
        acc.update(preds := output.argmax(1), y)
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
        # OneCycleLR's length: the run's, unless given. A resume's comes with the checkpoint (asking the trainer here
        # would set up the train loader before Lightning restores its place in the epoch): a stand-in until then.
        spec = self.hparams.lr_scheduler
        given = (spec.get("init_args") or {}) if isinstance(spec, dict) else {}
        if given.get("total_steps", 0) is None and given.get("epochs") is None:
            total = 1 if self.trainer.ckpt_path else int(self.trainer.estimated_stepping_batches)
            scheduler = self.make_scheduler(optimizer, total_steps=total)
        else:
            scheduler = self.make_scheduler(optimizer)
        # A schedule counted in steps (OneCycleLR) steps every batch; the others (StepLR's step_size ...) every epoch.
        per_step = "total_steps" in inspect.signature(type(scheduler)).parameters
        config = {"scheduler": scheduler, "interval": "step" if per_step else "epoch"}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = "val/loss"
        return {"optimizer": optimizer, "lr_scheduler": config}
