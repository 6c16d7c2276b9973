"""mnist_lit.lean: Lightning's per-step work made cheaper, and nothing else changed."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
from helpers.cli import QUIET, SYNTHETIC, run_cli
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.profilers import PassThroughProfiler
from torch import nn

from mnist_lit.datasets.batches import BatchLoader, EpochBatches
from mnist_lit.lean import QuietProfiler
from mnist_lit.model import LitMNIST


class Unlean(LitMNIST):
    """LitMNIST with Lightning's and torch's own versions of what mnist_lit.lean replaces."""

    __setattr__ = nn.Module.__setattr__


def train(model: LitMNIST, profiler: object) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    x, y = torch.randn(320, 1, 28, 28), torch.randint(0, 10, (320,))
    trainer = Trainer(
        max_epochs=2, log_every_n_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, profiler=profiler, accelerator="cpu", num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(model, train_dataloaders=BatchLoader(x, y, EpochBatches(320, 64, shuffle=True, seed=1)))
    return model.state_dict(), dict(trainer.callback_metrics)


def test_the_lean_hooks_and_profiler_train_bit_for_bit_as_lightnings_own():
    torch.manual_seed(1)
    lean, unlean = LitMNIST(), Unlean()
    unlean.load_state_dict(lean.state_dict())
    (ours, our_metrics), (theirs, their_metrics) = train(lean, QuietProfiler()), train(unlean, PassThroughProfiler())
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    assert our_metrics.keys() == their_metrics.keys() and "train/loss" in our_metrics  # self.log names its hook
    for key in our_metrics:
        assert torch.equal(our_metrics[key], their_metrics[key]), key
    assert lean._current_fx_name is None and "_current_fx_name" not in lean._modules  # a plain attribute


class SeeProfiler(Callback):
    seen: ClassVar[list[type]] = []

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        SeeProfiler.seen.append(type(trainer.profiler))


@pytest.mark.slow  # whole runs: in the slow suite, so the default one stays under 4 minutes
def test_quiet_profiler_is_the_default_and_a_chosen_profiler_still_profiles(mnist_dir, tmp_path, run_main):
    with QuietProfiler().profile("a") as inside, QuietProfiler().profile("b"):
        assert inside is None
    args = ["--data.data_dir", str(mnist_dir), *SYNTHETIC, *QUIET, "--trainer.max_steps", "2"]
    status, _, err = run_main("fit", *args, "--trainer.callbacks", "test_lean.SeeProfiler", cwd=tmp_path)
    assert status == 0, err
    assert SeeProfiler.seen == [QuietProfiler]
    chosen = run_cli("fit", "--data.data_dir", str(mnist_dir), *SYNTHETIC, *QUIET, "--trainer.max_steps", "3",
                     "--trainer.profiler", "simple", "--trainer.default_root_dir", "simple", cwd=tmp_path)  # fmt: skip
    assert chosen.returncode == 0, chosen.stderr
    assert "FIT Profiler Report" in chosen.stdout + chosen.stderr
    assert "run_training_batch" in chosen.stdout + chosen.stderr
