"""Datasets: which MNIST-format datasets exist and where their files are (catalog), the four IDX files read and
checked (idx), batches cut from tensors in memory (batches), and a person's own images (images)."""

from mnist_lit.datasets.batches import BatchLoader, EpochBatches
from mnist_lit.datasets.catalog import (
    DATASETS,
    DEFAULT,
    DEFAULT_DATA_DIR,
    FILE_NAMES,
    DatasetName,
    Known,
    download,
    find_files,
    missing_message,
    recorded_dataset,
)
from mnist_lit.datasets.idx import load_split
from mnist_lit.datasets.images import (
    FORMATS,
    ImageFiles,
    check_cost,
    loose_images,
    loose_line,
    open_image,
    prepare,
    read_class_folders,
    skipped_line,
)

__all__ = [
    "DATASETS", "DEFAULT", "DEFAULT_DATA_DIR", "FILE_NAMES", "FORMATS", "BatchLoader", "DatasetName", "EpochBatches",
    "ImageFiles", "Known", "check_cost", "download", "find_files", "load_split", "loose_images", "loose_line",
    "missing_message", "open_image", "prepare", "read_class_folders", "recorded_dataset", "skipped_line",
]  # fmt: skip
