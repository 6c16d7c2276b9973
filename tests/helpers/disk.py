"""A full disk, met for real: a small tmpfs mounted for the test (needs root, as CI runs), filled to a few bytes."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def small_filesystem(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of this size mounted at path, as a full disk is met for real (needs root, as CI runs)."""
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(disk: Path, leave: int) -> None:
    """Leave about `leave` bytes free on disk."""
    free = shutil.disk_usage(disk).free
    (disk / "ballast").write_bytes(b"\0" * max(free - leave, 0))


def fill_up(disk: Path) -> None:
    """Every free byte of disk taken, whatever others write to it meanwhile."""
    with contextlib.suppress(OSError), (disk / "ballast").open("wb") as ballast:
        while True:
            ballast.write(b"\0" * 65536)
            ballast.flush()
