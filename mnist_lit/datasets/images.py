"""A person's own images (files for predict, class folders for training), prepared the way MNIST's were.

Nothing here knows a dataset: the normalisation and the item's size come from the caller (datasets.py's table).
"""

from __future__ import annotations

import glob
import io
import re
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms.functional import pil_to_tensor, to_pil_image

from mnist_lit.errors import DataError, one_line, printable

# MNIST's recipe: the digit scaled into a 20x20 box, centred by its centre of mass in a 28x28 field.
BOX, FIELD = 20, 28
# Ink is what stands out from the paper by more than this fraction of the darkest stroke.
INK = 0.3
# A pixel budget per image, checked before decoding: preparing an image costs about 20 bytes a pixel, so a tiny
# file that declares 13000x13000 pixels would take 3 GB. 50 megapixels covers the photos of today's phones.
MAX_PIXELS = 50_000_000
# A progressive JPEG is decoded once per scan, each over every pixel (about 2.5 ns a pixel a scan here): a 1.2 MB
# file of a thousand scans over 50 megapixels took minutes. An encoder writes about 10; scans x pixels is bounded
# so that no JPEG within the pixel budget decodes for more than about 3 s, and the scans to 100 whatever its size.
MAX_SCANS = 100
MAX_SCAN_PIXELS = 1_000_000_000
SKIPS_NAMED = 3  # files named in the one line that counts the skipped ones
# The only formats opened: Pillow's own decoders. Pillow would also open EPS, say, by running Ghostscript on the file,
# a program a file from elsewhere must never get to run.
FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM")


def regular(path: Path) -> bool:
    """A regular file, not a link: links inside a folder of images are not followed (a folder from elsewhere may
    hold links planted to make us read a file outside it, or a device that never ends)."""
    try:
        return stat.S_ISREG(path.lstat().st_mode)
    except OSError:
        return False


def expand(path: str) -> list[Path]:
    """The files a predict_path names: one file (followed if it is a link: the user named it), every regular file
    in a folder, or a glob's regular files."""
    if Path(path).is_file():  # before the glob: a file may have [ ] in its name
        files = [Path(path)]
    elif Path(path).is_dir():
        files = sorted(p for p in Path(path).iterdir() if regular(p) and not p.name.startswith("."))
    elif Path(path).exists():
        raise DataError(f"--data.predict_path {path}: not a regular file or a folder (a device, a pipe or a socket)")
    elif any(c in path for c in "*?["):
        # below the glob's own folder, a link to a folder is not followed either ('**' would walk into it)
        parts = Path(path).parts
        base = Path(*parts[: next(i for i, part in enumerate(parts) if any(c in part for c in "*?["))] or ("",))
        files = [
            Path(p)
            for p in sorted(glob.glob(path, recursive=True))
            if regular(Path(p)) and not any(d.is_symlink() for d in Path(p).parents if base in d.parents)
        ]
    else:
        raise DataError(f"--data.predict_path {path}: no such file, folder or matching glob")
    if not files and Path(path).is_dir() and (folders := [p.name for p in Path(path).iterdir() if p.is_dir()]):
        raise DataError(
            f"--data.predict_path {path}: no files directly in it, only folders ({', '.join(sorted(folders)[:3])}):"
            f" predict reads a flat folder of images, a file or a glob (e.g. '{Path(path) / '*' / '*.png'}'); a"
            " folder per class is --data.image_dir's layout, for fit and test"
        )
    if not files:
        raise DataError(f"--data.predict_path {path}: no files there")
    return files


def looks_like_image(path: Path) -> bool:
    """A name with an image format's extension (Pillow's list), judged without opening the file."""
    Image.init()
    return path.suffix.lower() in Image.registered_extensions()


def loose_images(directory: Path) -> list[Path]:
    """The image files directly in an image_dir, beside its class folders: they belong to no class."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if not p.name.startswith(".") and regular(p) and looks_like_image(p))


def loose_line(directory: Path, loose: Sequence[Path]) -> str:
    """One line for the images outside any class folder: how many, the first, and where images go."""
    return printable(
        f"--data.image_dir {directory}: ignored {len(loose)} image{'s' if len(loose) > 1 else ''} directly in it"
        f" (first: {loose[0].name}), outside any class folder: images to train on go in a folder per class"
        f" ({directory / '3' / loose[0].name}); a flat folder of images is predict's layout (--data.predict_path)"
    )


def prepare(image: Image.Image, mean: float, std: float, box: int = BOX) -> Tensor:
    """Any photo or scan of one digit (or item) -> a (1, 28, 28) tensor like the dataset's, normalised with the
    dataset's mean and std; the item's longer side is scaled to box pixels (MNIST's digits: 20)."""
    check_size(image)
    if image.mode in ("RGBA", "LA", "P"):
        # transparent background: paint it white, as paper
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        # 16-bit scans, or 32-bit: convert("L") would clip them to their darkest 256 levels
        values = torch.from_numpy(np.array(image, dtype=np.float32))
        top = 1.0 if image.mode == "F" and values.max() <= 1 else 255.0 if values.max() <= 255 else 65535.0
        if not bool(values.isfinite().all()):  # a float image may hold nan or inf: no digit can be read from them
            raise ValueError("its pixels are not all finite numbers")
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
    scale = box / max(height, width)
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
    return ((field - mean) / std).unsqueeze(0)


def check_size(image: Image.Image, limit: int = MAX_PIXELS) -> None:
    """The pixel budget, from the header Image.open read: before anything is decoded or transposed; then the cost
    of decoding those pixels (check_cost)."""
    if image.width * image.height > limit:
        raise ValueError(f"{image.width}x{image.height} pixels is over the limit of {limit / 1e6:g} megapixels")
    check_cost(image)


def check_cost(image: Image.Image) -> None:
    """What decoding an opened image would cost beyond its pixels, read from the file's structure before it is
    decoded: a progressive JPEG's scans (each a pass over every pixel). Pillow's other decoders here cost about the
    same for every pixel, so the pixel budget bounds them."""
    if image.format != "JPEG" or image.fp is None:
        return
    scans = _count(image.fp, b"\xff\xda", MAX_SCANS + 1)  # SOS markers: entropy-coded data never holds one
    if scans > MAX_SCANS or scans * image.width * image.height > MAX_SCAN_PIXELS:
        many = f"over {MAX_SCANS}" if scans > MAX_SCANS else str(scans)
        raise ValueError(
            f"a progressive JPEG of {many} scans over {image.width}x{image.height} pixels: over the decoding budget"
            f" of {MAX_SCAN_PIXELS / 1e9:g} billion pixel-scans"
        )


def _count(file: Any, marker: bytes, most: int) -> int:
    """Occurrences of a 2-byte marker in a file, read in blocks (up to `most`); its position is kept."""
    position, count, tail = file.tell(), 0, b""
    try:
        file.seek(0)
        while count < most and (block := file.read(2**20)):
            count += (tail + block).count(marker)
            tail = block[-1:]
    finally:
        file.seek(position)
    return count


def open_image(source: Path | io.BytesIO) -> Image.Image:
    """An image file, its header read (nothing decoded yet), if it is in one of FORMATS."""
    return Image.open(source, formats=FORMATS)


def read(path: Path, mean: float, std: float, box: int = BOX) -> Tensor:
    """One image file, prepared. Raises whatever reading it raises: a file from elsewhere can make Pillow raise
    nearly anything (a ValueError for a blank image or one over the pixel budget)."""
    with open_image(path) as image:
        check_size(image)
        return prepare(ImageOps.exif_transpose(image), mean, std, box)


def reason(err: Exception) -> str:
    if isinstance(err, UnidentifiedImageError):
        return f"not an image ({', '.join(FORMATS)})"
    if isinstance(err, Image.DecompressionBombError):  # Pillow's own limit, above ours, also read from the header
        return f"its header declares more pixels than the limit of {MAX_PIXELS / 1e6:g} megapixels"
    if isinstance(err, (ValueError, OSError)) and str(err):
        return one_line(str(err))[:200]
    return f"not a readable image ({type(err).__name__}: {one_line(str(err))[:200]})"


def skipped_line(skipped: Sequence[tuple[str, str]], total: int, where: str) -> str:
    """One line for every file that could not be used: how many, and the first with its reason."""
    shown = "; ".join(printable(f"{path}: {why}") for path, why in skipped[:SKIPS_NAMED])
    more = f"; and {len(skipped) - SKIPS_NAMED} more" if len(skipped) > SKIPS_NAMED else ""
    return f"skipped {len(skipped)} of {total} files {where} that are not readable images ({shown}{more})"


class ImageFiles(Dataset):
    """The images a predict_path names. A file that is not a readable image is reported and skipped."""

    def __init__(self, path: str, mean: float, std: float, box: int = BOX) -> None:
        self.paths = expand(path)
        self.mean, self.std, self.box = mean, std, box

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor | None, str, str]:
        path = self.paths[index]
        try:
            return read(path, self.mean, self.std, self.box), str(path), ""
        except Exception as err:  # one bad file costs itself, never the good ones beside it
            return None, str(path), reason(err)

    @staticmethod
    def collate(items: list[tuple[Tensor | None, str, str]]) -> tuple[Tensor, list[str], list[tuple[str, str]]]:
        """(the batch's images, their paths, (path, reason) for each file skipped)."""
        readable = [(image, path) for image, path, _ in items if image is not None]
        skipped = [(path, why) for image, path, why in items if image is None]
        if not readable:
            return torch.empty(0, 1, FIELD, FIELD), [], skipped
        images, paths = zip(*readable, strict=True)
        return torch.stack(images), list(paths), skipped


def _key(name: str) -> str:
    """A class name as a folder may spell it: "T-shirt/top", "t-shirt_top" and "Tshirt Top" are the same."""
    return re.sub(r"[^0-9a-z]", "", name.lower())


def class_folders(directory: Path, classes: Sequence[str]) -> dict[Path, int]:
    """The class folders of an ImageFolder layout, each with the index of the class it names: a class name
    (in any case, punctuation and spaces ignored) or the class's index (0 to 9)."""
    option = f"--data.image_dir {directory}"
    if not directory.is_dir():
        raise DataError(f"{option}: no such folder")
    folders = sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
    if links := [p.name for p in folders if p.is_symlink()]:
        raise DataError(f"{option}: the class folder {links[0]} is a symbolic link, and links are not followed")
    if not folders:
        n = len(loose_images(directory))
        loose = f", only {n} image{'s' if n > 1 else ''} directly in it" if n else ""
        raise DataError(
            f"{option}: no class folders in it{loose} (it needs one folder per class, e.g. {directory / '3'}/; a"
            " flat folder of images is predict's layout, --data.predict_path)"
        )
    index = {_key(name): i for i, name in enumerate(classes)} | {str(i): i for i in range(len(classes))}
    if unknown := [p.name for p in folders if _key(p.name) not in index]:
        raise DataError(
            f"{option}: class folder {', '.join(unknown)} matches none of the model's classes: {', '.join(classes)}"
            f" (or their numbers 0 to {len(classes) - 1})"
        )
    found = {p: index[_key(p.name)] for p in folders}
    seen: dict[int, Path] = {}
    for folder, label in found.items():
        if label in seen:
            raise DataError(f"{option}: {seen[label].name} and {folder.name} are both class {classes[label]!r}")
        seen[label] = folder
    return found


def read_class_folders(
    directory: Path, classes: Sequence[str], mean: float, std: float, box: int = BOX
) -> tuple[Tensor, Tensor, list[tuple[Path, str]]]:
    """Every image under directory's class folders, prepared as predict prepares one: (images (N, 1, 28, 28),
    labels (N,), the files skipped as unreadable with the reason). A class folder with no readable image is
    an error."""
    images, labels, skipped = [], [], []
    for folder, label in class_folders(directory, classes).items():
        files = sorted(p for p in folder.rglob("*") if not p.name.startswith(".") and (p.is_file() or p.is_symlink()))
        if not files:
            raise DataError(f"--data.image_dir {directory}: the class folder {folder.name} holds no files")
        before = len(images)
        for path in files:
            if not regular(path):
                skipped.append((path, "a symbolic link, not followed"))
                continue
            try:
                images.append(read(path, mean, std, box))
            except Exception as err:  # one bad file costs itself, never the good ones beside it
                skipped.append((path, reason(err)))
                continue
            labels.append(label)
        if len(images) == before:
            raise DataError(f"--data.image_dir {directory}: the class folder {folder.name} holds no readable image")
    return torch.stack(images), torch.tensor(labels), skipped
