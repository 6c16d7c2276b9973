"""The four IDX files read into tensors: decompressed, checked against the dataset's checksums, parsed and
normalised once per process."""

from __future__ import annotations

import gzip
import hashlib
import struct
import zlib
from pathlib import Path

import torch
from torch import Tensor

from mnist_lit.datasets.catalog import DATASETS, DEFAULT
from mnist_lit.errors import DataError

IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049


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
