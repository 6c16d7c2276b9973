"""The guide's MNIST recipe in one file of plain Lightning: what you would write first, and what the rest of
mnist_lit extends. It imports nothing from mnist_lit; read it before model.py and data.py.

    python -m mnist_lit.plain [--data_dir ~/.torch/datasets/mnist] [--max_steps N] [--default_root_dir plain]

What it leaves out, and where the project adds it: the data decoded once into memory, checked against its
checksums, in batches that resume mid-epoch (data.py, datasets/); any network, optimizer or schedule by class path
(model.py); atomic, digest-sealed checkpoints, one run per folder, exact resume at any batch and on signals
(checkpoints/, signals.py); checks on what a file from elsewhere may name (trust.py); every option on the command
line, `last` and one-line errors (cli/, runs.py, errors.py, __main__.py).
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor, nn
from torch.utils.data import DataLoader, random_split
from torchvision import datasets, transforms


class Net(nn.Module):
    """The guide's CNN, as it writes it."""

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
        x = x.view(-1, 320)
        x = F.relu(self.fc1(x))
        x = self.fc2(x)
        return F.log_softmax(x, dim=1)


class PlainMNIST(LightningModule):
    """The guide's training and test steps; Lightning runs the loops, the devices and the checkpoints."""

    def __init__(self, lr: float = 0.01, momentum: float = 0.5) -> None:
        super().__init__()
        self.save_hyperparameters()  # saved in every checkpoint: load_from_checkpoint rebuilds the model
        self.net = Net()

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.nll_loss(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _evaluate(self, batch: tuple[Tensor, Tensor], stage: str) -> None:
        x, y = batch
        output = self(x)
        # the guide's test loss is summed NLL / N: a mean over the epoch, weighted by batch size, is the same
        self.log(f"{stage}/loss", F.nll_loss(output, y), batch_size=len(y))
        self.log(f"{stage}/acc", (output.argmax(1) == y).float().mean(), batch_size=len(y), prog_bar=True)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum)


FILES = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
         "t10k-labels-idx1-ubyte.gz"]  # fmt: skip


class PlainMNISTData(LightningDataModule):
    """torchvision's MNIST, normalised as the guide does, with 5,000 training images held out for validation."""

    def __init__(
        self,
        data_dir: str = "~/.torch/datasets/mnist",
        batch_size: int = 64,
        num_workers: int = 4,
        val_size: int = 5000,
    ) -> None:
        super().__init__()
        self.data_dir = str(Path(data_dir).expanduser())  # torchvision keeps the files in <data_dir>/MNIST/raw
        self.batch_size, self.num_workers, self.val_size = batch_size, num_workers, val_size
        self.transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])

    def prepare_data(self) -> None:  # once per machine, before setup: download what is missing
        # ... unless the four .gz files are straight in data_dir, as the rest of mnist_lit keeps them: then they are
        # decompressed into torchvision's <data_dir>/MNIST/raw (whole or not at all), and nothing is downloaded
        raw = Path(self.data_dir, "MNIST", "raw")
        for flat in [Path(self.data_dir, name) for name in FILES if not (raw / name.removesuffix(".gz")).exists()]:
            if flat.is_file():
                raw.mkdir(parents=True, exist_ok=True)
                (raw / f"{flat.stem}.part").write_bytes(gzip.decompress(flat.read_bytes()))
                os.replace(raw / f"{flat.stem}.part", raw / flat.stem)
        try:
            datasets.MNIST(self.data_dir, train=True, download=True)
            datasets.MNIST(self.data_dir, train=False, download=True)
        except RuntimeError as err:  # offline: torchvision tried each mirror; leave no empty MNIST/raw behind
            with contextlib.suppress(OSError):
                raw.rmdir(), raw.parent.rmdir()  # the second only once the first is gone
            why = str(err).splitlines()[0].rstrip(":")
            raise SystemExit(f"error: no MNIST in {self.data_dir} ({why}): put {', '.join(FILES)} there") from None

    def setup(self, stage: str) -> None:
        train = datasets.MNIST(self.data_dir, train=True, transform=self.transform)
        split = [len(train) - self.val_size, self.val_size]
        self.train, self.val = random_split(train, split, generator=torch.Generator().manual_seed(1))
        self.test = datasets.MNIST(self.data_dir, train=False, transform=self.transform)

    def _loader(self, dataset: torch.utils.data.Dataset, shuffle: bool = False) -> DataLoader:
        # the guide's workers, and pinned memory when batches go to a GPU
        return DataLoader(
            dataset, self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(), persistent_workers=self.num_workers > 0,
        )  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test)


def main(args: list[str] | None = None) -> dict[str, float]:
    """Train for 10 epochs with a checkpoint every 10 steps, then test; returns the test metrics."""
    parser = argparse.ArgumentParser(prog="python -m mnist_lit.plain", description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", default="~/.torch/datasets/mnist", help="where MNIST is, or is downloaded to")
    parser.add_argument("--max_steps", type=int, default=-1, help="stop after this many steps (default: no limit)")
    parser.add_argument("--default_root_dir", default="plain", help="checkpoints/ and lightning_logs/ go here")
    parser.add_argument("--num_workers", type=int, default=4, help="data loading processes (the guide's 4)")
    parser.add_argument("--val_size", type=int, default=5000, help="training images held out for validation")
    options = parser.parse_args(args)
    seed_everything(1)
    model = PlainMNIST()
    data = PlainMNISTData(options.data_dir, num_workers=options.num_workers, val_size=options.val_size)
    checkpoints = ModelCheckpoint(
        dirpath=Path(options.default_root_dir) / "checkpoints", every_n_train_steps=10, save_last=True
    )
    trainer = Trainer(
        max_epochs=10, max_steps=options.max_steps, callbacks=[checkpoints], default_root_dir=options.default_root_dir
    )
    trainer.fit(model, datamodule=data)
    (results,) = trainer.test(model, datamodule=data)  # the weights fit ended with
    return results


if __name__ == "__main__":
    main()
