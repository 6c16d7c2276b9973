"""MNIST-format datasets (or a folder of your own images) as tensors in memory, and the LightningDataModule.

The four IDX files are decoded once per process into one normalised float tensor; batches are cut
from it by indexing, so the training loop never runs per-sample Python or PIL.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import socket
import struct
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from jsonargparse.typing import ClosedUnitInterval, NonNegativeInt, PositiveInt
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Sampler

from mnist_lit.images import DataError, ImageFiles, read_class_folders, skipped_line


@dataclass(frozen=True)
class Known:
    """One MNIST-format dataset: what its files hold, where they are found, and how its images are normalised."""

    title: str
    classes: tuple[str, ...]
    # The training set's mean and standard deviation of pixel values in [0, 1], computed once over its 60k images.
    mean: float
    std: float
    # sha256 of the decompressed canonical files: a .gz wrapper may differ between mirrors, its content may not.
    files: dict[str, str]
    # torchvision's class for the dataset, which downloads it into <data_dir>/<torchvision>/raw/
    torchvision: str
    # The longer side of an item in its 28x28 image: how images of your own are scaled to look like the dataset's.
    box: int
    # Where a system package puts the files: looked in after --data.data_dir.
    system_dirs: tuple[str, ...] = ()


# Adding an MNIST-format dataset means adding it here.
DATASETS = {
    "mnist": Known(
        title="MNIST",
        classes=tuple(str(digit) for digit in range(10)),
        mean=0.1307,  # the guide's Normalize((0.1307,), (0.3081,))
        std=0.3081,
        files={
            "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
            "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
            "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
            "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        },
        torchvision="MNIST",
        box=20,  # MNIST's digits: scaled into a 20x20 box, centred by mass
    ),
    "fashion_mnist": Known(
        title="Fashion-MNIST",
        classes=(
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ),
        mean=0.2860,
        std=0.3530,
        files={
            "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        },
        torchvision="FashionMNIST",
        box=28,  # Fashion-MNIST's articles fill the 28x28 image along their longer side
        system_dirs=("/usr/share/datasets/fashion-mnist",),  # Debian's package dataset-fashion-mnist
    ),
}
DatasetName = Literal[tuple(DATASETS)]  # type: ignore[valid-type]  # the table's names, for --help and parsing
DEFAULT = "mnist"
DEFAULT_DATA_DIR = "~/.torch/datasets/mnist"
FILE_NAMES = tuple(DATASETS[DEFAULT].files)
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049
# The validation hold-out never depends on the run's seed, so every run and resume sees the same split.
SPLIT_SEED = 0
DOWNLOAD_TIMEOUT_S = 15


def recorded_dataset(checkpoint: dict[str, Any]) -> str:
    """The dataset a checkpoint's run trained on (checkpoints from before datasets had names: MNIST)."""
    record = checkpoint.get(LightningDataModule.CHECKPOINT_HYPER_PARAMS_KEY) or {}
    if not isinstance(record, dict):  # data from a file: never taken on trust
        raise DataError(f"the checkpoint's record of its data is a {type(record).__name__}, not a mapping")
    name = record.get("dataset") or DEFAULT
    if not isinstance(name, str) or name not in DATASETS:
        raise DataError(f"the checkpoint was trained on a dataset named {name!r}, which this version does not know")
    return name


def find_files(data_dir: Path, dataset: str = DEFAULT) -> dict[str, Path]:
    """Where each of the four files is: raw or .gz, directly in data_dir, in torchvision's <data_dir>/MNIST/raw/
    (FashionMNIST/raw/, ...), or in the folder a system package puts them in.

    The default folder is shared by the datasets, and the Offline advice puts MNIST's four files directly in it:
    there, another dataset looks in its own folders first, so MNIST's files never shadow its own. A data_dir the
    user gives is looked in first: files there that are another dataset's are named as such."""
    known = DATASETS[dataset]
    own = (data_dir / known.torchvision / "raw", *map(Path, known.system_dirs))
    shared = dataset != DEFAULT and data_dir.expanduser().absolute() == Path(DEFAULT_DATA_DIR).expanduser().absolute()
    found = {}
    for name in FILE_NAMES:
        for folder in (*own, data_dir) if shared else (data_dir, *own):
            candidates = [folder / name, folder / f"{name}.gz"]
            if hit := next((p for p in candidates if p.is_file()), None):
                found[name] = hit
                break
    return found


def missing_message(data_dir: Path, missing: list[str], dataset: str = DEFAULT) -> str:
    known = DATASETS[dataset]
    return (
        f"{known.title} files not found in {data_dir.absolute()}: {', '.join(missing)} (looked for each, raw or .gz,"
        f" in that folder and in its {known.torchvision}/raw/{''.join(f', and in {d}' for d in known.system_dirs)})."
        " Put the four files there, or pass --data.data_dir to the folder that has them"
    )


def download(data_dir: Path, dataset: str = DEFAULT) -> None:
    """Fetch the four files with torchvision's downloader into data_dir/<torchvision's name>/raw/.

    If that fails, whatever it had created is removed again: no empty folders, no half-downloaded file that a
    later run would take for a corrupt one.
    """
    import torchvision.datasets  # only here: torchvision is slow to import and rarely needed

    existed = _tree(data_dir)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # without a network, fail in seconds rather than hang
    try:
        getattr(torchvision.datasets, DATASETS[dataset].torchvision)(str(data_dir), train=False, download=True)
    except Exception as err:  # torchvision wraps network failures in several types
        for path in sorted(_tree(data_dir) - existed, key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                path.rmdir() if path.is_dir() else path.unlink()
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise DataError(
            f"{missing_message(data_dir, sorted(set(FILE_NAMES) - set(find_files(data_dir, dataset))), dataset)}."
            " Downloading them failed"
            f" (no network?): {reason}"
        ) from None
    finally:
        socket.setdefaulttimeout(previous)


def _tree(folder: Path) -> set[Path]:
    """The existing paths among folder and the folders above it, and everything inside folder."""
    paths = {p for p in (folder, *folder.parents) if p.exists()}
    return paths | set(folder.rglob("*")) if folder.exists() else paths


def read_idx(path: Path, verify: bool, dataset: str = DEFAULT) -> bytes:
    """The decompressed bytes of one IDX file, checked against the dataset's checksum when verify is set."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"cannot read {path}: {err}. Replace it with an intact copy") from None
    name, known = path.name.removesuffix(".gz"), DATASETS[dataset]
    if not verify or name not in known.files:
        return raw
    digest = hashlib.sha256(raw).hexdigest()
    if digest == known.files[name]:
        return raw
    if other := next((key for key, other in DATASETS.items() if other.files.get(name) == digest), None):
        raise DataError(
            f"{path} is {DATASETS[other].title}'s {name}, but this run's dataset is {known.title} ({dataset}):"
            f" pass --data.data_dir the folder with {known.title}'s files"
        )
    raise DataError(
        f"{path} is corrupt or truncated (its content does not match {known.title}'s checksum). Replace it with an"
        " intact copy, or pass --data.verify_checksums false for other data in MNIST's format"
    )


def parse_idx(raw: bytes, path: Path, magic: int) -> Tensor:
    """An IDX payload as a uint8 tensor of the shape its header declares."""
    ndim = {IMAGES_MAGIC: 3, LABELS_MAGIC: 1}[magic]
    header = 4 + 4 * ndim
    if len(raw) < header or struct.unpack(">I", raw[:4])[0] != magic:
        kind = "images" if magic == IMAGES_MAGIC else "labels"
        raise DataError(f"{path} is not an IDX {kind} file (wrong magic number {raw[:4].hex() or 'none'})")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    count = 1
    for size in shape:
        count *= size
    if len(raw) - header != count:
        raise DataError(
            f"{path} holds {len(raw) - header} bytes of data where its header declares {count}: it is truncated"
            " or corrupt. Replace it with an intact copy"
        )
    if magic == IMAGES_MAGIC and shape[1:] != (28, 28):
        raise DataError(f"{path} holds {shape[1]}x{shape[2]} images; the model needs 28x28")
    return torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8).view(*shape)


def normalize(images: Tensor, dataset: str = DEFAULT) -> Tensor:
    """uint8 images (N, 28, 28) to normalised float (N, 1, 28, 28), with the dataset's mean and std.

    The same operations in the same order as ToTensor() then Normalize(), so the values are bit-identical.
    """
    known = DATASETS[dataset]
    return images.unsqueeze(1).float().div_(255).sub_(known.mean).div_(known.std)


def load_split(files: dict[str, Path], train: bool, verify: bool, dataset: str = DEFAULT) -> tuple[Tensor, Tensor]:
    """The normalised images and int64 labels of the training or test set."""
    prefix = "train" if train else "t10k"
    images_path, labels_path = files[f"{prefix}-images-idx3-ubyte"], files[f"{prefix}-labels-idx1-ubyte"]
    images = parse_idx(read_idx(images_path, verify, dataset), images_path, IMAGES_MAGIC)
    labels = parse_idx(read_idx(labels_path, verify, dataset), labels_path, LABELS_MAGIC)
    if len(images) != len(labels):
        raise DataError(f"{images_path} holds {len(images)} images but {labels_path} {len(labels)} labels")
    if len(labels) and int(labels.max()) > 9:
        raise DataError(f"{labels_path} holds label {int(labels.max())}; the labels must be 0 to 9")
    return normalize(images, dataset), labels.long()


class EpochBatches(Sampler[Tensor]):
    """One process's batches of indices for one epoch.

    For training (shuffle=True) the order is a pure function of (seed, epoch); the seed and the position in
    the order are the state Lightning checkpoints: a resumed run re-creates exactly the order it was killed in
    (also without --seed_everything, or with another one), and goes on from the next sample. Under DDP the
    epoch's order is dealt out in turn to the world_size processes, as DistributedSampler does, so their shards
    are disjoint: for training each gets the same number of samples (the remainder, fewer than world_size
    samples, sits that epoch out), for evaluation (shuffle=False, the file order, every pass from the start)
    every sample is seen exactly once.
    """

    def __init__(
        self, size: int, batch_size: int, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1
    ) -> None:
        self.size, self.batch_size, self.shuffle, self.seed = size, batch_size, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        # Samples this process has been handed this epoch (counted in samples, not batches, so a resume with
        # another batch_size still sees each sample once), and how far into the epoch's order they reach.
        self.seen = 0
        self.position = 0

    def _shard_size(self) -> int:
        if self.shuffle:  # training: equal shards, or DDP processes would wait on each other at the end
            return self.size // self.world_size
        return len(range(self.rank, self.size, self.world_size))

    def __len__(self) -> int:
        return -(-self._shard_size() // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.seen, self.position = epoch, 0, 0

    def indices(self) -> Tensor:
        """This process's sample indices for the rest of the epoch (for evaluation: for a whole pass)."""
        if not self.shuffle:
            self.seen = self.position = 0
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.size)
        # What this process still has to see this epoch. After a resume with another number of processes the
        # rest of the order is dealt out anew, wrapping round to its start if the new processes need more.
        remaining = max(self._shard_size() - self.seen, 0)
        stream = torch.arange(self.position, self.position + remaining * self.world_size) % max(self.size, 1)
        return order[stream[self.rank :: self.world_size]]

    def __iter__(self) -> Iterator[Tensor]:
        return iter(self.indices().split(self.batch_size))

    def advance(self, batch_len: int) -> None:
        self.seen += batch_len
        self.position += batch_len * self.world_size

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "seen": self.seen, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        # from a checkpoint: numbers that size tensors (a negative count would ask for an endless order)
        values = [state.get(key) if isinstance(state, dict) else None for key in ("seed", "epoch", "seen", "position")]
        if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63 for v in values) or (
            values[2] > self.size or values[3] > self.size * max(self.world_size, 1) * 4
        ):
            raise DataError(f"the checkpoint's place in the data order is not one this data has: {state!r:.120}")
        self.seed, self.epoch, self.seen, self.position = values


class _Rows(torch.utils.data.Dataset):
    """Batches by index tensor, for DataLoader workers (batch_size=None hands each worker a whole batch)."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images, self.labels = images, labels

    def __getitem__(self, index: Tensor) -> tuple[Tensor, Tensor]:
        return self.images[index], self.labels[index]

    def __len__(self) -> int:
        return len(self.images)


class BatchLoader:
    """Batches (images, labels) cut from tensors in memory; Lightning saves and restores its position.

    With num_workers=0 batches are cut in the training process (fastest for data already in memory); with
    workers they are cut in a torch DataLoader's worker processes. pin_memory pins each batch so that the
    copy to the GPU is asynchronous. The tensors may also live on the GPU already: then batches never cross.
    """

    def __init__(
        self, images: Tensor, labels: Tensor, sampler: EpochBatches, num_workers: int = 0, pin_memory: bool = False
    ) -> None:
        self.images, self.labels, self.sampler = images, labels, sampler
        # As in a DataLoader with batch_size=None: the sampler yields whole batches. Lightning reads both
        # attributes (and calls sampler.set_epoch at each epoch).
        self.batch_sampler = None
        self.num_workers, self.pin_memory = num_workers, pin_memory

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        # A generator: Lightning creates the iterator before it calls set_epoch, so the order is fixed lazily.
        if self.num_workers == 0:
            order = self.sampler.indices().to(self.images.device)
            for index in order.split(self.sampler.batch_size):
                images, labels = self.images.index_select(0, index), self.labels.index_select(0, index)
                if self.pin_memory:
                    images, labels = images.pin_memory(), labels.pin_memory()
                # Counted as it is handed out: a checkpoint saved after this batch must not replay it.
                self.sampler.advance(len(index))
                yield images, labels
            return
        loader = DataLoader(
            _Rows(self.images, self.labels),
            sampler=list(self.sampler),
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            generator=torch.Generator(),  # leaves the global RNG, which drives dropout, untouched
        )
        for images, labels in loader:
            self.sampler.advance(len(labels))
            yield images, labels

    def state_dict(self) -> dict[str, int]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.load_state_dict(state)


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
        if skipped and (self.trainer is None or self.trainer.is_global_zero):
            print(skipped_line(skipped, len(skipped) + len(labels), f"under {self.image_dir}"), file=sys.stderr)
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
