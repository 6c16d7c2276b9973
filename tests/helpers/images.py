"""Images a user would bring: a drawn digit, a folder of labelled ones, MNIST's own digits as PIL images."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import torch
from PIL import Image


def drawn(label: int, index: int) -> Image.Image:
    """conftest's synthetic digit (a bar at the label's row) in another style: framed, so that it keeps its place
    when predict's preparation crops an image to its ink, with a dot that makes each image of a class its own."""
    pixels = torch.randint(0, 40, (28, 28), generator=torch.Generator().manual_seed(100 * label + index))
    pixels[3, 3:25] = pixels[24, 3:25] = pixels[3:25, 3] = pixels[3:25, 24] = 250
    row = 4 + 2 * label
    pixels[row : row + 2, 4:24] = 250
    pixels[4 + 2 * ((label + 5) % 10), 5 + index % 18] = 250
    return Image.fromarray(pixels.to(torch.uint8).numpy())


def image_folder(root: Path, per_class: int = 10, names: list[str] | None = None) -> Path:
    for label in range(10):
        folder = root / (names[label] if names else str(label))
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            drawn(label, i).save(folder / f"{i:03d}.png")
    return root


def png(image: Image.Image, kind: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, kind)
    return buffer.getvalue()


def mnist_digits(folder: Path, count: int) -> list[Image.Image]:
    """The first `count` test digits of the (real or synthetic) MNIST files in folder."""
    raw = gzip.decompress((folder / "t10k-images-idx3-ubyte.gz").read_bytes())[16:]
    return [Image.frombytes("L", (28, 28), raw[i * 784 : (i + 1) * 784]) for i in range(count)]


def digit(size: int = 28) -> Image.Image:
    """A light '7'-ish stroke on black, MNIST style."""
    image = Image.new("L", (size, size), 0)
    scale = size / 28
    for x in range(int(8 * scale), int(20 * scale)):
        for t in range(int(2 * scale)):
            image.putpixel((x, int(6 * scale) + t), 255)
    for y in range(int(6 * scale), int(22 * scale)):
        x = int(19 * scale) - int((y - 6 * scale) * 0.4)
        for t in range(int(2 * scale)):
            image.putpixel((x + t, y), 255)
    return image
