"""MNIST files for the tests: tiny synthetic IDX files, where the real ones are, and the guide's own evaluation."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import torch

from helpers.cli import ROOT

REAL_MNIST = ROOT.parent / "shared" / "mnist"


def idx_bytes(tensor: torch.Tensor, magic: int) -> bytes:
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", size) for size in tensor.shape)
    return header + tensor.to(torch.uint8).numpy().tobytes()


def write_mnist(folder: Path, train: int = 640, test: int = 200, gz: bool = True, seed: int = 0) -> Path:
    """Four IDX files of random digits: each class is a bright bar at its own row, plus noise, so a model
    can learn them in a few steps and the files are tiny."""
    generator = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, count in (("train", train), ("t10k", test)):
        labels = torch.randint(0, 10, (count,), generator=generator)
        images = torch.randint(0, 60, (count, 28, 28), generator=generator)
        for i, label in enumerate(labels.tolist()):
            images[i, 4 + 2 * label : 6 + 2 * label, 4:24] = 250
        for name, payload in (
            (f"{prefix}-images-idx3-ubyte", idx_bytes(images, 2051)),
            (f"{prefix}-labels-idx1-ubyte", idx_bytes(labels, 2049)),
        ):
            if gz:
                (folder / f"{name}.gz").write_bytes(gzip.compress(payload))
            else:
                (folder / name).write_bytes(payload)
    return folder


def guide_evaluation(checkpoint: Path, data_dir: Path, verify: bool) -> tuple[float, float]:
    """The guide's own Net, loaded (strictly) with a checkpoint's net.* weights, scored by the guide's own test
    code on the test set: (accuracy, summed NLL / N)."""
    from helpers.guide import Net, evaluate
    from mnist_lit.datasets.catalog import find_files
    from mnist_lit.datasets.idx import load_split

    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    net = Net()
    net.load_state_dict({k.removeprefix("net."): v for k, v in state.items()}, strict=True)
    images, labels = load_split(find_files(data_dir), train=False, verify=verify)
    return evaluate(net, zip(images.split(64), labels.split(64), strict=True), len(labels))
