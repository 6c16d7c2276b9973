"""The LightningDataModule: an MNIST-format dataset (or a folder of your own images) as tensors in memory.

The four IDX files are decoded once per process into one normalised float tensor (datasets/idx.py); batches are
cut from it by indexing (datasets/batches.py), so the training loop never runs per-sample Python or PIL. Which
datasets there are and where their files are found is datasets/catalog.py's.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from jsonargparse.typing import ClosedUnitInterval, NonNegativeInt, PositiveInt
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader

from mnist_lit.datasets import (
    DATASETS,
    DEFAULT,
    DEFAULT_DATA_DIR,
    FILE_NAMES,
    BatchLoader,
    DatasetName,
    EpochBatches,
    ImageFiles,
    download,
    find_files,
    load_split,
    loose_images,
    loose_line,
    missing_message,
    read_class_folders,
    skipped_line,
)
from mnist_lit.errors import DataError

# The validation hold-out never depends on the run's seed, so every run and resume sees the same split.
SPLIT_SEED = 0


class MNISTDataModule(LightningDataModule):
    """An MNIST-format dataset, or a folder of your own labelled images, served from memory.

    The dataset's four IDX files give 55k training images, 5k validation images held out of the 60k, and the
    official 10k test set; a folder of images is split per class into training, validation and test.
    """

    def __init__(
        self,
        dataset: DatasetName | None = None,
        data_dir: str = DEFAULT_DATA_DIR,
        image_dir: str | None = None,
        batch_size: PositiveInt = 64,
        test_batch_size: PositiveInt = 1000,
        val_size: NonNegativeInt = 5000,
        image_val_fraction: ClosedUnitInterval = 0.2,
        image_test_fraction: ClosedUnitInterval = 0.2,
        num_workers: NonNegativeInt = 0,
        pin_memory: bool | None = None,
        data_on_device: bool = False,
        shift: NonNegativeInt = 0,
        download: bool = True,
        verify_checksums: bool = True,
        predict_path: str | None = None,
    ) -> None:
        """
        Args:
            dataset: Which MNIST-format dataset: its files, normalisation and class names. Default: the one the
                checkpoint loaded with --ckpt_path or --model.init_from was trained on, else mnist.
            data_dir: Folder with the dataset's four files (raw or .gz, directly or in torchvision's MNIST/raw/,
                FashionMNIST/raw/). Only written to when files are missing and download is on.
            image_dir: Train, validate and test on your own images instead: one folder per class (named by the
                class or its number, e.g. image_dir/3/*.png), each image prepared as predict prepares it.
            batch_size: Training batch size per process.
            test_batch_size: Batch size for validation, test and predict.
            val_size: Images held out of the 60k training images for validation; 0 trains on all 60k.
            image_val_fraction: With image_dir: the fraction of each class's images held out for validation.
            image_test_fraction: With image_dir: the fraction of each class's images held out for test.
            num_workers: Worker processes that cut batches; 0 (fastest for in-memory data) cuts them in the
                training process.
            pin_memory: Pin batches for asynchronous copies to the GPU (default: on whenever batches go to one).
            data_on_device: Keep the whole dataset on the accelerator (190 MB), so batches never cross to it.
            shift: Move each training image by a random number of pixels, up to this many along each axis, drawn
                anew every batch (augmentation on the batch in memory); 0, the guide's, moves none.
            download: Fetch missing files with torchvision's downloader.
            verify_checksums: Check the files against the dataset's checksums; turn off for other data in
                MNIST's format.
            predict_path: For predict: an image file, a folder of images, or a glob (PNG, JPEG, BMP).
        """
        super().__init__()
        self.dataset = dataset or DEFAULT
        self.save_hyperparameters()
        self.hparams["dataset"] = self.dataset  # what the checkpoint records: the name, also when defaulted
        self.known = DATASETS[self.dataset]
        self.classes = self.known.classes
        self.data_dir = Path(data_dir).expanduser()
        self.image_dir = None if image_dir is None else Path(image_dir).expanduser()
        self.batch_size, self.test_batch_size, self.val_size = batch_size, test_batch_size, val_size
        self.image_fractions = {"val": image_val_fraction, "test": image_test_fraction}
        self.num_workers, self.pin_memory, self.data_on_device = num_workers, pin_memory, data_on_device
        self.shift = shift
        self.download, self.verify_checksums, self.predict_path = download, verify_checksums, predict_path
        self.splits: dict[str, tuple[Tensor, Tensor]] = {}

    def prepare_data(self) -> None:
        """Runs once per machine before setup: find the files, or download them."""
        if self.trainer is not None and self.trainer.predicting:
            return  # predict reads the user's own images, not the dataset
        if self.image_dir is not None:
            if not self.image_dir.is_dir():
                raise DataError(f"--data.image_dir {self.image_dir.absolute()}: no such folder")
            return
        if self.data_dir.exists() and not self.data_dir.is_dir():
            raise DataError(
                f"--data.data_dir {self.data_dir.absolute()} is a file: pass the folder with {self.known.title}'s files"
            )
        missing = sorted(set(FILE_NAMES) - set(find_files(self.data_dir, self.dataset)))
        if not missing:
            return
        if not self.download:
            raise DataError(f"{missing_message(self.data_dir, missing, self.dataset)} (download is off)")
        download(self.data_dir, self.dataset)

    def setup(self, stage: str) -> None:
        if stage == "predict":
            return
        if self.image_dir is not None:
            self._setup_image_dir(stage)
            return
        files = find_files(self.data_dir, self.dataset)
        if missing := sorted(set(FILE_NAMES) - set(files)):
            raise DataError(missing_message(self.data_dir, missing, self.dataset))
        if stage == "validate" and self.val_size == 0:
            raise DataError("validate needs a validation set, and --data.val_size is 0")
        if stage in ("fit", "validate") and "train" not in self.splits:
            images, labels = load_split(files, train=True, verify=self.verify_checksums, dataset=self.dataset)
            if self.val_size >= len(images):
                raise DataError(f"val_size {self.val_size} leaves no training images out of {len(images)}")
            order = torch.randperm(len(images), generator=torch.Generator().manual_seed(SPLIT_SEED))
            train, val = order[self.val_size :], order[: self.val_size]
            if self.val_size == 0:
                train = torch.arange(len(images))  # all 60k in their file order, as the guide trains
            self.splits["train"] = self._place(images[train], labels[train])
            if self.val_size:
                self.splits["val"] = self._place(images[val], labels[val])
        if stage == "test" and "test" not in self.splits:
            split = load_split(files, train=False, verify=self.verify_checksums, dataset=self.dataset)
            self.splits["test"] = self._place(*split)

    def _setup_image_dir(self, stage: str) -> None:
        """The folder's images, decoded once, split per class in a fixed order (the same in every run)."""
        needed = {"fit": "train", "validate": "val", "test": "test"}[stage]
        if needed != "train" and not self.image_fractions[needed]:
            raise DataError(f"{stage} needs a {needed} split, and --data.image_{needed}_fraction is 0")
        if self.splits:
            return
        known = self.known
        images, labels, skipped = read_class_folders(self.image_dir, self.classes, known.mean, known.std, known.box)
        if self.trainer is None or self.trainer.is_global_zero:
            if skipped:
                print(skipped_line(skipped, len(skipped) + len(labels), f"under {self.image_dir}"), file=sys.stderr)
            if loose := loose_images(self.image_dir):
                print(loose_line(self.image_dir, loose), file=sys.stderr)
        parts: dict[str, list[Tensor]] = {"train": [], "val": [], "test": []}
        generator = torch.Generator().manual_seed(SPLIT_SEED)
        for label in labels.unique().tolist():
            members = (labels == label).nonzero().flatten()
            members = members[torch.randperm(len(members), generator=generator)]
            val = round(len(members) * self.image_fractions["val"])
            test = round(len(members) * self.image_fractions["test"])
            parts["val"].append(members[:val])
            parts["test"].append(members[val : val + test])
            parts["train"].append(members[val + test :])
        for split, indices in parts.items():
            index = torch.cat(indices).sort().values
            if len(index) == 0 and (split == "train" or self.image_fractions[split]):
                raise DataError(
                    f"--data.image_dir {self.image_dir}: its {len(labels)} images leave no {split} images with"
                    f" --data.image_val_fraction {self.image_fractions['val']} and --data.image_test_fraction"
                    f" {self.image_fractions['test']}"
                )
            if len(index):
                self.splits[split] = self._place(images[index], labels[index])

    def _place(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        if self.data_on_device and self.trainer is not None:
            device = self.trainer.strategy.root_device
            return images.to(device), labels.to(device)
        return images, labels

    def _loader(self, split: str, train: bool) -> BatchLoader:
        images, labels = self.splits[split]
        trainer = self.trainer
        rank, world_size = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        sampler = EpochBatches(
            len(images),
            self.batch_size if train else self.test_batch_size,
            shuffle=train,
            # seed_everything's seed (torch's initial seed), so --seed_everything also sets the data order
            seed=torch.initial_seed() % 2**62,
            rank=rank,
            world_size=world_size,
        )
        # Pinning only helps copies from host memory to a GPU; elsewhere it would fail or just cost time.
        to_gpu = trainer is not None and trainer.strategy.root_device.type == "cuda" and images.device.type == "cpu"
        pin = to_gpu and self.pin_memory is not False
        return BatchLoader(images, labels, sampler, num_workers=self.num_workers, pin_memory=pin)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.shift and self.trainer is not None and self.trainer.training:
            images, labels = batch
            background = -self.known.mean / self.known.std  # a black pixel, normalised
            batch = shifted(images, self.shift, background), labels
        return batch

    def train_dataloader(self) -> BatchLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> BatchLoader | list:
        # no hold-out (val_size or image_val_fraction 0): an empty list tells Lightning there is nothing to validate on
        return self._loader("val", train=False) if "val" in self.splits else []

    def test_dataloader(self) -> BatchLoader:
        return self._loader("test", train=False)

    def predict_dataloader(self) -> DataLoader:
        if self.predict_path is None:
            raise DataError("predict needs images: pass --data.predict_path with an image file, folder or glob")
        files = ImageFiles(self.predict_path, self.known.mean, self.known.std, self.known.box)
        return DataLoader(files, batch_size=self.test_batch_size, collate_fn=ImageFiles.collate)


def shifted(images: Tensor, most: int, background: float) -> Tensor:
    """Each image of an N x C x H x W batch moved by its own random whole number of pixels, -most to most along each
    axis, the uncovered border filled with background. The offsets come from torch's random stream on the CPU, which
    a checkpoint saves and a resume restores, so a resumed run draws the same ones."""
    n, _, height, width = images.shape
    dy, dx = (torch.randint(-most, most + 1, (2, n)) + most).to(images.device)
    padded = F.pad(images, (most, most, most, most), value=background)
    rows = (torch.arange(height, device=images.device) + dy[:, None])[:, None, :, None]
    cols = (torch.arange(width, device=images.device) + dx[:, None])[:, None, None, :]
    index = torch.arange(n, device=images.device)[:, None, None, None]
    channels = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
    return padded[index, channels, rows, cols]
