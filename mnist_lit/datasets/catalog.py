"""The MNIST-format datasets this version knows, where their four IDX files are found, and fetching them.

Adding an MNIST-format dataset means adding it to DATASETS; reading the files is idx.py's, serving them data.py's.
"""

from __future__ import annotations

import contextlib
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lightning.pytorch import LightningDataModule

from mnist_lit.errors import DataError


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
