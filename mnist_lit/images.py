"""A person's own digit images, prepared the way MNIST's digits were, for predict."""

from __future__ import annotations

import glob
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms.functional import pil_to_tensor, to_pil_image

from mnist_lit.data import MEAN, STD, DataError

# MNIST's recipe: the digit scaled into a 20x20 box, centred by its centre of mass in a 28x28 field.
BOX, FIELD = 20, 28
# Ink is what stands out from the paper by more than this fraction of the darkest stroke.
INK = 0.3
# A pixel budget per image, checked before decoding: preparing an image costs about 20 bytes a pixel, so a tiny
# file that declares 13000x13000 pixels would take 3 GB. 50 megapixels covers the photos of today's phones.
MAX_PIXELS = 50_000_000


def expand(path: str) -> list[Path]:
    """The files a predict_path names: one file, every file in a folder, or a glob's matches."""
    if Path(path).is_file():  # before the glob: a file may have [ ] in its name
        files = [Path(path)]
    elif Path(path).is_dir():
        files = sorted(p for p in Path(path).iterdir() if p.is_file() and not p.name.startswith("."))
    elif any(c in path for c in "*?["):
        files = [Path(p) for p in sorted(glob.glob(path, recursive=True)) if Path(p).is_file()]
    else:
        raise DataError(f"--data.predict_path {path}: no such file, folder or matching glob")
    if not files:
        raise DataError(f"--data.predict_path {path}: no files there")
    return files


def prepare(image: Image.Image) -> Tensor:
    """Any photo or scan of one digit -> a normalised (1, 28, 28) tensor like MNIST's."""
    if image.width * image.height > MAX_PIXELS:
        megapixels = MAX_PIXELS // 1_000_000
        raise ValueError(f"{image.width}x{image.height} pixels is over the limit of {megapixels} megapixels")
    if image.mode in ("RGBA", "LA", "P"):
        # transparent background: paint it white, as paper
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        # 16-bit scans, or 32-bit: convert("L") would clip them to their darkest 256 levels
        values = torch.from_numpy(np.array(image, dtype=np.float32))
        top = 1.0 if image.mode == "F" and values.max() <= 1 else 255.0 if values.max() <= 255 else 65535.0
        pixels = (values / top).clamp(0, 1)
    else:
        pixels = pil_to_tensor(image.convert("L"))[0] / 255
    border = torch.cat([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    if border.median() > 0.5:  # dark ink on light paper: MNIST's digits are light on black
        pixels, border = 1 - pixels, 1 - border
    ink = (pixels - border.median()).clamp(min=0)
    if ink.max() <= 0:
        raise ValueError("no digit found (the image is blank)")
    ink /= ink.max()
    ink[ink < INK * 0.5] = 0  # paper grain and scanner noise
    rows, cols = (ink >= INK).any(1).nonzero(), (ink >= INK).any(0).nonzero()
    ink = ink[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    height, width = ink.shape
    scale = BOX / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    digit = to_pil_image(ink.unsqueeze(0)).resize(size, Image.Resampling.LANCZOS)
    digit = pil_to_tensor(digit)[0] / 255
    mass = digit.sum()
    cy = (digit.sum(1) * torch.arange(size[1])).sum() / mass
    cx = (digit.sum(0) * torch.arange(size[0])).sum() / mass
    top = min(max(round(FIELD / 2 - float(cy)), 0), FIELD - size[1])
    left = min(max(round(FIELD / 2 - float(cx)), 0), FIELD - size[0])
    field = torch.zeros(FIELD, FIELD)
    field[top : top + size[1], left : left + size[0]] = digit
    return ((field - MEAN) / STD).unsqueeze(0)


class ImageFiles(Dataset):
    """The images a predict_path names. A file that is not a readable image is reported and skipped."""

    def __init__(self, path: str) -> None:
        self.paths = expand(path)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor | None, str]:
        path = self.paths[index]
        try:
            with Image.open(path) as image:
                return prepare(ImageOps.exif_transpose(image)), str(path)
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as err:
            reason = "not an image" if isinstance(err, UnidentifiedImageError) else str(err)
            print(f"skipped {path}: {reason}", file=sys.stderr)
            return None, str(path)

    @staticmethod
    def collate(items: list[tuple[Tensor | None, str]]) -> tuple[Tensor, list[str]]:
        readable = [(image, path) for image, path in items if image is not None]
        if not readable:
            return torch.empty(0, 1, FIELD, FIELD), []
        images, paths = zip(*readable, strict=True)
        return torch.stack(images), list(paths)
