"""Checkpoints as a test writes and compares them: a resealed copy, a class-path spec, two runs that must agree."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from helpers.cli import QUIET, SYNTHETIC
from mnist_lit.checkpoints.files import DIGEST_KEY, digest


def fit_args(data: Path, epochs: int = 3) -> list[str]:
    # checkpoints every 3 steps of 9 per epoch: kills land mid-epoch, at epoch ends and inside writes
    return [
        "fit",
        "--data.data_dir",
        str(data),
        *SYNTHETIC,
        *QUIET,
        "--trainer.max_epochs",
        str(epochs),
        "--checkpoint.every_n_train_steps",
        "3",
    ]


def assert_same_run(a: Path, b: Path) -> None:
    """Weights, optimizer state and counters (steps and epochs) of two last.ckpt files are identical."""
    x = torch.load(a / "checkpoints" / "last.ckpt", weights_only=True)
    y = torch.load(b / "checkpoints" / "last.ckpt", weights_only=True)
    assert (x["global_step"], x["epoch"]) == (y["global_step"], y["epoch"])
    progress = [c["loops"]["fit_loop"]["epoch_progress"] for c in (x, y)]  # every epoch counted as begun and ended
    assert progress[0] == progress[1]
    assert x["state_dict"].keys() == y["state_dict"].keys()
    for key in x["state_dict"]:
        assert torch.equal(x["state_dict"][key], y["state_dict"][key]), key
    for s, t in zip(
        x["optimizer_states"][0]["state"].values(), y["optimizer_states"][0]["state"].values(), strict=True
    ):
        assert torch.equal(s["momentum_buffer"], t["momentum_buffer"])


def reseal(source: Path, target: Path, change: Callable[[dict], None]) -> Path:
    """A copy of a checkpoint with a change, sealed with a valid digest: as anyone who writes one can."""
    checkpoint = torch.load(source, weights_only=True)
    change(checkpoint)
    checkpoint.pop(DIGEST_KEY, None)
    checkpoint[DIGEST_KEY] = digest(checkpoint)
    torch.save(checkpoint, target)
    return target


def spec(class_path: str, **init_args: object) -> dict:
    return {"class_path": class_path, "init_args": init_args}
