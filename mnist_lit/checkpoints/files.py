"""Checkpoint files on disk, the one reader of a checkpoint from elsewhere: loaded safely (weights only, the digest
checked, hyperparameters checked as data) and found ('last': a run's newest). They are written by writer.py on
Lightning's writer thread (io.py)."""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import re
import stat
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from mnist_lit.checkpoints.digest import DIGEST_KEY, digest
from mnist_lit.errors import CheckpointError, Untrusted, first_line
from mnist_lit.trust import check_model_hparams

LAST, EXTENSION = "last", ".ckpt"
# fit --ckpt_path auto: resume the run's latest checkpoint if there is one, else start the run. For commands that
# restart themselves (torchrun's --max-restarts, a requeued SLURM job): the first start and every restart alike.
AUTO = "auto"
MAX_CHECKPOINT_BYTES = 2 * 2**30  # read whole into memory: a file from elsewhere must not exhaust it


def checkpoint_dir(default_root_dir: str | os.PathLike | None, dirpath: str | os.PathLike | None) -> Path:
    """Where a run's checkpoints go: --checkpoint.dirpath, else <default_root_dir>/checkpoints."""
    if dirpath is not None:
        return Path(dirpath).expanduser()
    return Path(default_root_dir or os.getcwd()).expanduser() / "checkpoints"


# --- loading ----------------------------------------------------------------------------------------------------


def read_bytes(path: str | os.PathLike) -> bytes:
    """A file's bytes, if it is a regular file: a FIFO or a device named as a checkpoint must not hang or flood us."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO opens at once instead of waiting for a writer
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path} is a folder, not a checkpoint file") from None
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {err.strerror}") from None
    info = os.fstat(fd)
    mode = info.st_mode
    if stat.S_ISREG(mode) and info.st_size > MAX_CHECKPOINT_BYTES:
        os.close(fd)
        raise CheckpointError(
            f"{path} is {info.st_size / 2**30:.1f} GiB, over the {MAX_CHECKPOINT_BYTES // 2**30} GiB a checkpoint of"
            " the largest network allowed (100 million weights, with Adam's state) can take"
        )
    if not stat.S_ISREG(mode):
        os.close(fd)
        if stat.S_ISDIR(mode):
            raise CheckpointError(f"{path} is a folder, not a checkpoint file")
        raise CheckpointError(f"{path} is not a regular file (a device, a pipe or a socket), so not a checkpoint")
    with os.fdopen(fd, "rb") as f:
        try:
            return f.read()
        except OSError as err:
            raise CheckpointError(f"cannot read {path}: {err.strerror}") from None


def _ours(checkpoint: dict[str, Any]) -> bool:
    """Whether mnist_lit wrote this checkpoint, by any of several marks, so that damage to one (the digest's key
    itself) cannot pass it off as a file from elsewhere that carries no digest."""
    keys = [str(key) for key in checkpoint]
    callbacks = checkpoint.get("callbacks")
    data = checkpoint.get("datamodule_hyper_parameters")
    return (
        any("mnist" in key or "sha256" in key for key in keys)
        or "rng_state" in checkpoint  # mnist_lit's Checkpoint callback saves it; Lightning does not
        or (isinstance(callbacks, dict) and any("TrainingCurves" in str(key) for key in callbacks))
        or (isinstance(data, dict) and "dataset" in data)
    )


MAX_DEPTH = 64  # nesting a checkpoint may have: Lightning's is 6 deep; walking a deeper one would overflow the stack


def check_stored(path: str | os.PathLike, data: bytes) -> None:
    """torch.save stores its records uncompressed: a compressed one would expand, as it loads, to what its header
    says (hundreds of MB from a small file) before any check could see it."""
    with contextlib.suppress(zipfile.BadZipFile, OSError, ValueError, EOFError):  # not a zip: torch.load says so
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            if any(info.compress_type != zipfile.ZIP_STORED for info in archive.infolist()):
                raise CheckpointError(f"{path} is not a checkpoint torch.save wrote: its records are compressed")


def check_dense(path: str | os.PathLike, value: Any, depth: int = 0) -> None:
    """Every tensor a loaded file holds is a plain one in this machine's memory, no larger than the bytes behind it:
    a sparse, meta or quantized tensor would fail in our code with a traceback, and a view that repeats its bytes
    (an expand) would be made real the first time it is read whole (17 TB from a 190 KB file)."""
    if depth > MAX_DEPTH:
        raise CheckpointError(f"{path} is not a checkpoint: it is nested over {MAX_DEPTH} deep")
    if isinstance(value, dict):
        for item in value.values():
            check_dense(path, item, depth + 1)
    elif isinstance(value, (list, tuple)):
        for item in value:
            check_dense(path, item, depth + 1)
    elif isinstance(value, torch.Tensor):
        if value.layout != torch.strided or value.device.type != "cpu" or value.is_quantized:
            raise CheckpointError(
                f"{path} holds a tensor that is not a plain one ({value.layout}, {value.device.type})"
            )
        if value.numel() and value.numel() * value.element_size() > value.untyped_storage().nbytes():
            raise CheckpointError(
                f"{path} holds a tensor of {tuple(value.shape)} over {value.untyped_storage().nbytes()} bytes: a view"
                " that repeats its data, which torch.save never writes for a checkpoint"
            )


def _unpickle(path: str | os.PathLike, data: bytes | None, what: str) -> Any:
    """A file's contents (from data, its bytes, if given), unpickling nothing but tensors and plain containers
    (weights_only), every tensor dense. what: the kind of file, for the messages."""
    unreadable = f"{path} is not a readable {what} (it is not in torch.save's format)"
    data = read_bytes(path) if data is None else data
    check_stored(path, data)
    try:
        with warnings.catch_warnings():  # torch's warnings about a damaged file's pickle protocol: the error says it
            warnings.simplefilter("ignore")
            contents = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's safe unpickler names what it refused: a GLOBAL (a function or class), a call, an object
        # their-words[torch.weights_only]: what torch's safe unpickler names when it refuses
        if re.search(r"GLOBAL|reduce for|new object", str(err)):
            raise CheckpointError(
                f"refusing to load {path}: it holds pickled Python objects, not just tensors (loading it could run"
                f" code), or it is damaged. Use a {what} written by mnist_lit"
            ) from None
        raise CheckpointError(f"{unreadable}; it may be damaged") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable {what} ({first_line(err)}); it may be truncated") from None
    except Exception:  # torch's legacy reader fails on arbitrary bytes with KeyError, struct.error, ...
        raise CheckpointError(unreadable) from None
    check_dense(path, contents)
    return contents


def load_weights(path: str | os.PathLike) -> dict[str, Any]:
    """A .pth file that export wrote, read as data: the guide's state_dict, or {"net": a network's spec,
    "state_dict": its weights} (the spec is checked where the network is built: mnist_lit.runs)."""
    state = _unpickle(path, None, ".pth file")
    if isinstance(state, dict) and "state_dict" in state and "net" not in state:
        raise CheckpointError(f"{path} is a Lightning checkpoint, not export's .pth: name it .ckpt")
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a state_dict (it holds a {type(state).__name__})")
    return state


def _load(path: str | os.PathLike, data: bytes | None = None) -> dict[str, Any]:
    """A checkpoint's verified contents."""
    checkpoint = _unpickle(path, data, "checkpoint")
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} is not a Lightning checkpoint (it holds a {type(checkpoint).__name__}, so it has"
                              " no state_dict)")  # fmt: skip
    if not isinstance(checkpoint.get("state_dict"), dict):
        bare = checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values())
        why = ": it is a bare state_dict of weights, as export's .pth files are" if bare else ""
        raise CheckpointError(f"{path} is not a Lightning checkpoint (it has no state_dict{why})")
    if "pytorch-lightning_version" not in checkpoint:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (it has no pytorch-lightning_version)")
    if DIGEST_KEY in checkpoint:
        if digest(checkpoint) != checkpoint[DIGEST_KEY]:
            raise CheckpointError(f"{path} is damaged: its contents do not match the checksum written with it")
    elif _ours(checkpoint):
        raise CheckpointError(
            f"{path} is damaged: it was written by mnist_lit but carries no checksum (a file whose checksum key was"
            " damaged or removed)"
        )
    # else: a Lightning checkpoint from elsewhere, with no mark of mnist_lit: no digest to check it against
    try:  # a digest proves the bytes unchanged, not who wrote them: what they ask for is checked as data
        check_model_hparams(checkpoint.get("hyper_parameters"))
    except Untrusted as err:
        raise CheckpointError(
            f"refusing to load {path}: {err}; it was read as data, and nothing it asks for was done"
        ) from None
    return checkpoint


# A checkpoint mnist_lit.runs has read and verified, kept for the next load of the same unchanged file (Lightning's
# resume or test, LitMNIST's init_from): one read and one digest check per command. Taken once; keyed by the file.
_handed: tuple[tuple[int, ...], dict[str, Any]] | None = None


def _identity(path: str | os.PathLike) -> tuple[int, ...]:
    info = os.stat(path)
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns


def hand_over(path: str | os.PathLike | None, checkpoint: dict[str, Any] | None = None) -> None:
    """Keep checkpoint for the next load_checkpoint of path while the file is unchanged (None:
    keep nothing)."""
    global _handed
    _handed = None
    if path is not None and checkpoint is not None:
        with contextlib.suppress(OSError):
            _handed = (_identity(path), checkpoint)


def _take_handed(path: str | os.PathLike) -> dict[str, Any] | None:
    global _handed
    with contextlib.suppress(OSError):
        if _handed is not None and _handed[0] == _identity(path):
            checkpoint, _handed = _handed[1], None
            return checkpoint
    return None


def load_checkpoint(path: str | os.PathLike, data: bytes | None = None) -> dict[str, Any]:
    """A checkpoint's verified contents (from data, the file's bytes, if given). A damaged one is refused, naming
    the newest intact one beside it."""
    if data is None and (handed := _take_handed(path)) is not None:  # read and verified already (mnist_lit.runs)
        return handed
    try:
        return _load(path, data)
    except CheckpointError as err:
        if not re.search(r"is damaged|may be truncated|may be damaged|or it is damaged", str(err)):
            raise
        intact = newest_intact(Path(path).parent, besides=Path(path))
        hint = f"; the newest intact checkpoint beside it is {intact}: pass --ckpt_path {intact}" if intact else ""
        raise CheckpointError(f"{err}{hint}") from None


def newest_intact(directory: Path, besides: Path) -> Path | None:
    """The newest checkpoint in directory, other than besides, that loads and matches the digest it carries."""
    candidates = sorted(_checkpoints(directory), key=lambda p: p.stat().st_mtime_ns, reverse=True)
    for candidate in candidates:
        if candidate.resolve() == besides.resolve():
            continue
        with contextlib.suppress(CheckpointError, OSError):
            if DIGEST_KEY in _load(candidate):  # verified, not merely readable
                return candidate
    return None


def _checkpoints(directory: Path) -> list[Path]:
    """The checkpoint files in directory: regular files only, never a link (a folder on a shared disk may hold
    links planted to make us read, or pass off, a file elsewhere)."""
    with contextlib.suppress(OSError):
        return [p for p in directory.glob(f"*{EXTENSION}") if stat.S_ISREG(p.lstat().st_mode)]
    return []


def newest_checkpoint(directory: Path) -> Path | None:
    """The run's latest checkpoint: last.ckpt, unless a periodic file is newer (a kill between the two writes,
    or a last.ckpt that could not be written)."""
    last = directory / f"{LAST}{EXTENSION}"
    times = {}
    for path in _checkpoints(directory):
        with contextlib.suppress(FileNotFoundError):  # removed by a running fit since the listing
            times[path] = path.lstat().st_mtime_ns
    newest = max(times, key=lambda p: (times[p], p == last), default=None)
    if last in times and newest is not None and times[newest] <= times[last]:
        return last
    return newest


def load_newest(directory: Path) -> tuple[Path, dict[str, Any]]:
    """The run's latest checkpoint and its verified contents. A fit saving beside us may remove the file we found
    before we read it (its older periodic file): then the newest is looked for again, a few times."""
    attempts = 5
    for attempt in range(attempts):
        path = newest_checkpoint(directory)
        if path is None:
            break
        try:
            return path, load_checkpoint(path)
        except CheckpointError:
            if path.exists() or attempt == attempts - 1:
                raise
    raise CheckpointError(f"no checkpoint to load in {directory.absolute()}")


def resolve(ckpt_path: str, directory: Path, fitting: bool) -> str:
    """The file --ckpt_path names: 'last' (and fit's 'auto') is the run's latest checkpoint in directory, which must
    exist."""
    if ckpt_path == "best":
        raise CheckpointError(
            "--ckpt_path best needs a checkpoint that tracks a metric; pass 'last' or a checkpoint file"
        )
    if ckpt_path == AUTO and not fitting:
        raise CheckpointError("--ckpt_path auto is for fit (resume if there is a run, else start one): pass 'last'")
    if ckpt_path not in (LAST, AUTO):
        return ckpt_path
    refuse_linked_folder(directory)
    if (newest := newest_checkpoint(directory)) is None:
        last = directory / f"{LAST}{EXTENSION}"
        if fitting:
            hint = "drop --ckpt_path to start a new run"
        else:
            hint = "no fit saved a checkpoint in this root: run `fit` (with checkpointing on)"
        verb = "resume" if fitting else "load"
        raise CheckpointError(
            f"no checkpoint to {verb}: {last.absolute()} does not exist ({hint}, or check --trainer.default_root_dir)"
        )
    return str(newest)


def load_ckpt_path(ckpt_path: str, directory: Path, fitting: bool) -> tuple[str, dict[str, Any]]:
    """The file --ckpt_path names ('last': the run's latest in directory) and its verified contents."""
    path = resolve(ckpt_path, directory, fitting)
    if ckpt_path not in (LAST, AUTO):
        return path, load_checkpoint(path)
    found, checkpoint = load_newest(directory)
    return str(found), checkpoint


def refuse_linked_folder(directory: Path) -> None:
    """A run's checkpoint folder is a folder, never a link: one planted in a shared run folder would have a fit
    write (and remove) checkpoints, or `last` read one, wherever it points."""
    if directory.is_symlink():
        raise CheckpointError(
            f"{directory} is a symbolic link, and a run's checkpoint folder is never followed: pass the folder it"
            " points to as --checkpoint.dirpath if it is yours"
        )
