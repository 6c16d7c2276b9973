"""The guide's network, and the LightningModule that trains and evaluates it."""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from jsonargparse.typing import restricted_number_type
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from mnist_lit.checkpoint import check_weights
from mnist_lit.storage import load_checkpoint

LearningRate = restricted_number_type("LearningRate", float, [(">", 0), ("<", float("inf"))])
Momentum = restricted_number_type("Momentum", float, [(">=", 0), ("<", 1)])


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
    """Trains the guide's Net with SGD; logs train/loss, val/loss, val/acc, test/loss, test/acc."""

    def __init__(
        self,
        lr: LearningRate = 0.01,
        momentum: Momentum = 0.5,
        channels_last: bool = True,
        init_from: str | None = None,
        freeze: tuple[str, ...] = (),
    ) -> None:
        """
        Args:
            lr: SGD learning rate.
            momentum: SGD momentum, in [0, 1).
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
        # Loss metrics average per-image losses in float64: summed NLL / N, exactly the guide's test loss.
        self.val_loss, self.test_loss = MeanMetric().set_dtype(torch.float64), MeanMetric().set_dtype(torch.float64)
        self.val_acc = MulticlassAccuracy(num_classes=10, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=10, average="micro")
        self.test_confusion = MulticlassConfusionMatrix(num_classes=10)
        self.confusion: Tensor | None = None

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

    def predict_step(self, batch: tuple[Tensor, list[str]], batch_idx: int) -> tuple[list[str], Tensor]:
        images, paths = batch
        return paths, self(images).exp()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # fused: the whole update in one kernel, bit for bit the same numbers, twice as fast as the default loop
        fused = True if self.device.type in ("cpu", "cuda") else None
        # Frozen layers (requires_grad False) stay out of the optimizer: it neither updates nor keeps state for them.
        trained = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.SGD(trained, lr=self.hparams.lr, momentum=self.hparams.momentum, fused=fused)
