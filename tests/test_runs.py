"""mnist_lit.runs, the front door to a trained run on disk: its rules on small hand-made checkpoints, without
main() and without training."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from helpers.cli import QUIET, SYNTHETIC, run_cli

from mnist_lit import runs
from mnist_lit.checkpoints.files import DIGEST_KEY, digest
from mnist_lit.errors import CheckpointError, ConfigError, DataError
from mnist_lit.model import GUIDE_SGD, LitMNIST, Net


def write_checkpoint(path: Path, step: int = 9, dataset: str = "mnist", resumable: bool = True, seed: int = 7) -> Path:
    """A checkpoint as fit writes one, sealed with its digest: the guide's Net, a step count, its dataset."""
    checkpoint = {
        "state_dict": {f"net.{k}": v for k, v in Net().state_dict().items()},
        "pytorch-lightning_version": "2.6.6",
        "epoch": 1,
        "global_step": step,
        "hyper_parameters": {"optimizer": GUIDE_SGD},
        "datamodule_hyper_parameters": {"dataset": dataset},
    }
    if resumable:
        checkpoint |= {
            "optimizer_states": [{"state": {}, "param_groups": []}],
            "loops": {},
            "rng_state": {"cpu": torch.get_rng_state(), "seed": seed},
        }
    checkpoint[DIGEST_KEY] = digest(checkpoint)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    return path


def test_load_resolves_last_reads_the_file_once_and_hands_back_what_commands_need(tmp_path, monkeypatch):
    older = write_checkpoint(tmp_path / "checkpoints" / "epoch=0-step=3.ckpt", step=3)
    newer = write_checkpoint(tmp_path / "checkpoints" / "epoch=1-step=9.ckpt", step=9, dataset="fashion_mnist")
    os.utime(older, (1, 1))
    calls = []
    real = runs.hparams_from
    monkeypatch.setattr(runs, "hparams_from", lambda checkpoint: calls.append(1) or real(checkpoint))
    trained = runs.load("last", tmp_path / "checkpoints")
    assert trained.path == str(newer) and trained.checkpoint["global_step"] == 9
    assert trained.dataset == "fashion_mnist" and type(trained.net) is Net and not trained.net.training
    assert trained.net_spec["class_path"].endswith("Net") and len(calls) == 1


def test_a_fit_takes_the_lock_and_a_second_fit_into_the_folder_is_refused(tmp_path):
    folder = tmp_path / "checkpoints"
    run = runs.open_run("fit", None, folder)
    assert run.lock is not None and run.resume is None and (folder / ".lock").is_file()
    with pytest.raises(CheckpointError, match="is in use by another fit"):
        runs.open_run("fit", None, folder)
    run.close()
    assert not folder.exists()  # created for the run, left empty: removed again
    runs.open_run("fit", None, folder).close()


def test_a_new_fit_never_writes_over_an_earlier_run_and_leaves_the_lock_free(tmp_path):
    folder = tmp_path / "checkpoints"
    write_checkpoint(folder / "last.ckpt")
    with pytest.raises(CheckpointError, match=r"holds an earlier run.*--ckpt_path last"):
        runs.open_run("fit", None, folder)
    assert not (folder / ".lock").exists()
    with pytest.raises(CheckpointError, match="holds another run"):  # another run's checkpoint resumed here
        runs.open_run("fit", str(write_checkpoint(tmp_path / "other" / "last.ckpt")), folder)


def test_auto_starts_a_run_where_there_is_none_and_resumes_one_where_there_is(tmp_path):
    folder = tmp_path / "checkpoints"
    run = runs.open_run("fit", "auto", folder)
    assert run.resume is None
    run.close()
    write_checkpoint(folder / "last.ckpt", step=12)
    run = runs.open_run("fit", "auto", folder)
    assert run.resume is not None and run.resume.checkpoint["global_step"] == 12
    run.close()
    with pytest.raises(CheckpointError, match="auto is for fit"):
        runs.open_run("test", "auto", folder)


def test_evaluating_needs_weights_and_a_weights_only_file_tests_but_does_not_resume(tmp_path):
    folder = tmp_path / "checkpoints"
    with pytest.raises(CheckpointError, match="test needs trained weights"):
        runs.open_run("test", None, folder)
    write_checkpoint(folder / "last.ckpt", resumable=False)
    run = runs.open_run("test", "last", folder)
    assert run.lock is None and run.resume is not None and run.resume.path == str(folder / "last.ckpt")
    with pytest.raises(CheckpointError, match="holds weights only"):
        runs.open_run("fit", "last", folder)
    assert not (folder / ".lock").exists()


def test_the_dataset_is_the_checkpoints_and_another_given_is_refused(tmp_path):
    path = write_checkpoint(tmp_path / "checkpoints" / "last.ckpt", dataset="fashion_mnist")
    assert runs.open_run("validate", str(path), path.parent, dataset="fashion_mnist").resume.dataset == "fashion_mnist"
    with pytest.raises(DataError, match=r"trained on Fashion-MNIST .*drop --data.dataset mnist"):
        runs.open_run("validate", str(path), path.parent, dataset="mnist")


def test_init_from_is_a_new_run_from_another_folders_weights(tmp_path):
    source = tmp_path / "old" / "checkpoints"
    write_checkpoint(source / "last.ckpt", dataset="fashion_mnist")
    run = runs.open_run("fit", None, tmp_path / "new", init_from="last", init_directory=source)
    assert run.init is not None and run.init.dataset == "fashion_mnist" and run.resume is None
    run.close()
    with pytest.raises(ConfigError, match="pass one of them"):
        runs.open_run("fit", "last", tmp_path / "new", init_from="last", init_directory=source)
    with pytest.raises(CheckpointError, match="in the folder this run's checkpoints would overwrite"):
        runs.open_run("fit", None, source, init_from="last", init_directory=source)


def test_a_resume_goes_on_with_its_own_seed_and_refuses_another(tmp_path):
    trained = runs.load(write_checkpoint(tmp_path / "last.ckpt", seed=7))
    assert runs.resumed_seed(trained, 1, given=False) == 7  # the default, not given: the run's own
    assert runs.resumed_seed(trained, 7, given=True) == 7
    with pytest.raises(ConfigError, match=r"--seed_everything cannot change when resuming"):
        runs.resumed_seed(trained, 8, given=True)


def test_a_resume_takes_a_new_learning_rate_but_not_a_new_optimizer_or_network():
    sgd = {"optimizer": GUIDE_SGD}
    faster = {"optimizer": {**GUIDE_SGD, "init_args": {**GUIDE_SGD["init_args"], "lr": 0.05}}}
    runs.check_resume_changes("x.ckpt", sgd, faster)
    with pytest.raises(ConfigError, match=r"--model.optimizer cannot change"):
        runs.check_resume_changes("x.ckpt", sgd, {"optimizer": {"class_path": "torch.optim.Adam"}})
    with pytest.raises(ConfigError, match=r"--model.net cannot change"):
        runs.check_resume_changes("x.ckpt", sgd, {**sgd, "net": {"class_path": "mnist_lit.model.ConvNet"}})
    with pytest.raises(ConfigError, match=r"its --model.lr_scheduler sets it"):
        runs.check_resume_changes("x.ckpt", {**sgd, "lr_scheduler": {"class_path": "S"}},
                                  {**faster, "lr_scheduler": {"class_path": "S"}})  # fmt: skip


def test_the_run_lock_takes_a_dead_holders_file_and_refuses_links_and_special_files(tmp_path):
    from mnist_lit.checkpoints.runlock import RunLock

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / ".lock").write_text("99999\n")  # left by a killed fit: its flock went with it
    lock = RunLock(folder)
    lock.acquire()
    assert (folder / ".lock").read_text() == f"{os.getpid()}\n"
    lock.release()
    assert not (folder / ".lock").exists()
    os.mkfifo(folder / ".lock")
    with pytest.raises(CheckpointError, match="it exists and is not a regular file"):
        RunLock(folder).acquire()
    (folder / ".lock").unlink()
    (folder / ".lock").symlink_to(tmp_path / "precious")
    with pytest.raises(CheckpointError, match="it is a symbolic link, and links are not followed"):
        RunLock(folder).acquire()
    assert not (tmp_path / "precious").exists()


def test_the_later_load_of_a_checkpoint_takes_the_one_already_verified(tmp_path):
    from mnist_lit.checkpoints.io import AtomicCheckpointIO

    path = write_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    run = runs.open_run("test", "last", path.parent)
    handed = AtomicCheckpointIO().load_checkpoint(path)  # no second read: the verified contents, less the loops'
    assert handed["state_dict"] is run.resume.checkpoint["state_dict"] and "loops" not in handed  # state (a test's)
    again = AtomicCheckpointIO().load_checkpoint(path)  # handed over once only: from the file
    assert again["state_dict"] is not run.resume.checkpoint["state_dict"] and again["global_step"] == 9
    run.close()
    run = runs.open_run("fit", "last", path.parent)
    assert AtomicCheckpointIO().load_checkpoint(path) is run.resume.checkpoint  # a resume's: all of it
    run = runs.open_run("test", "last", path.parent)
    write_checkpoint(path, step=12)  # the file changed since it was verified: read anew
    assert AtomicCheckpointIO().load_checkpoint(path)["global_step"] == 12
    run.close()


def test_init_from_puts_the_verified_checkpoints_weights_into_the_model(tmp_path):
    """--model.init_from's file is read once (runs.open_run) and its weights go into the built model from there."""
    path = write_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    run = runs.open_run("fit", None, tmp_path / "new", init_from="last", init_directory=path.parent)
    model = LitMNIST()
    run.init.weights_into(model)
    for name, weights in run.init.checkpoint["state_dict"].items():
        assert torch.equal(model.state_dict()[name], weights), name
    with pytest.raises(CheckpointError, match="is a checkpoint of another model"):
        run.init.weights_into(LitMNIST(net={"class_path": "mnist_lit.model.ConvNet", "init_args": {"width": 4}}))
    run.close()


@pytest.mark.slow  # whole runs: in the slow suite, so the default one stays under 4 minutes
def test_a_resume_and_a_validate_keep_to_the_runs_own_held_out_images(tmp_path, mnist_dir, run_main):
    """--data.val_size is the run's own unless given: a resume trains on the same images, a validate scores only
    images the run held out (none, for a run of all the training images)."""
    from helpers.cli import QUIET, SYNTHETIC

    synthetic = [a for a in SYNTHETIC if a not in ("--data.val_size", "64")]
    data = ["--data.data_dir", str(mnist_dir), *synthetic, *QUIET]  # val_size: the default, 5000, unless given
    assert run_main("fit", *data, "--data.val_size", "0", "--trainer.max_steps", "2", cwd=tmp_path)[0] == 0
    status, _, err = run_main("fit", *data, "--ckpt_path", "last", "--trainer.max_steps", "4", cwd=tmp_path)
    assert status == 0, err  # val_size 0, the run's own (not the default)
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    status, _, err = run_main("validate", *data, "--ckpt_path", "last", cwd=tmp_path)
    assert status != 0 and "none were held out to validate on; use test" in err, err
    status, _, err = run_main("fit", *data, "--ckpt_path", "last", "--data.val_size", "64", "--trainer.max_steps", "6",
                              cwd=tmp_path)  # fmt: skip
    assert status != 0 and "--data.val_size cannot change when resuming" in err, err
    other = tmp_path / "held"
    other.mkdir()
    assert run_main("fit", *data, "--data.val_size", "64", "--trainer.max_steps", "2", cwd=other)[0] == 0
    assert run_main("validate", *data, "--ckpt_path", "last", cwd=other)[0] == 0  # its own 64
    status, _, err = run_main("validate", *data, "--ckpt_path", "last", "--data.val_size", "65", cwd=other)
    assert status != 0 and "a validation set of 65 would score images it trained on" in err, err
    assert run_main("validate", *data, "--ckpt_path", "last", "--data.val_size", "32", cwd=other)[0] == 0


@pytest.mark.slow  # two tests of a run: about 35 s
def test_evaluating_a_runs_checkpoint_writes_beside_that_run(tmp_path, trained_run, mnist_dir):
    """`test --ckpt_path runs/a/checkpoints/last.ckpt` left its figures in ./lightning_logs, apart from the run."""
    shutil.copytree(trained_run, tmp_path / "runs" / "a")
    data = ["--data.data_dir", str(mnist_dir), *SYNTHETIC, *QUIET]
    test = run_cli("test", "--ckpt_path", "runs/a/checkpoints/last.ckpt", *data, cwd=tmp_path)
    assert test.returncode == 0, test.stderr[-2000:]
    assert not (tmp_path / "lightning_logs").exists()
    assert (tmp_path / "runs" / "a" / "lightning_logs" / "version_1" / "confusion.png").is_file()
    given = run_cli("test", "--ckpt_path", "runs/a/checkpoints/last.ckpt", "--trainer.default_root_dir", "here", *data,
                    cwd=tmp_path)  # fmt: skip
    assert given.returncode == 0 and (tmp_path / "here" / "lightning_logs" / "version_0").is_dir(), given.stderr
