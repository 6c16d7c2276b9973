"""Every failure a user can cause: a one-line error, a non-zero exit, no traceback, nothing on disk harmed."""

from __future__ import annotations

import builtins
import gzip
import hashlib
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.cli import QUIET, SYNTHETIC, assert_clean_error, run_cli
from helpers.mnist import write_mnist
from PIL import Image

from mnist_lit.__main__ import main as entry
from mnist_lit.__main__ import run as main
from mnist_lit.checkpoints.files import DIGEST_KEY, digest, load_checkpoint
from mnist_lit.errors import CheckpointError


class EvilShell:
    """The same through os.system, whose module torch's safe loader blocks outright (another refusal path)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class Evil:
    """Unpickling this creates a file: what a booby-trapped checkpoint could do with any code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (str(self.marker), "w"))


def fingerprint(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


@pytest.fixture(scope="module")
def run_root(tmp_path_factory, mnist_dir, trained_run):
    """An existing run that no failed command may touch, plus the bad files the cases point at."""
    root = tmp_path_factory.mktemp("existing") / "run"
    shutil.copytree(trained_run, root)  # the session's finished run (conftest), a copy of its own
    bad = root / "bad"
    bad.mkdir()
    (bad / "random.ckpt").write_bytes(bytes(range(256)) * 40)
    other = {"state_dict": {"encoder.weight": torch.zeros(3)}, "pytorch-lightning_version": "2.6.0"}
    torch.save(other, bad / "other-model.ckpt")
    torch.save({"conv1.weight": torch.zeros(10, 1, 5, 5)}, bad / "model.pth")  # the guide's file, not a checkpoint
    torch.save({"state_dict": {}, "payload": Evil(root / "PWNED")}, bad / "evil.ckpt")
    torch.save({"state_dict": {}, "payload": EvilShell(root / "PWNED")}, bad / "evil-shell.ckpt")
    good = (root / "checkpoints" / "last.ckpt").read_bytes()
    (bad / "hello.ckpt").write_text("hello")
    (bad / "other-run" / "checkpoints").mkdir(parents=True)
    (bad / "other-run" / "checkpoints" / "last.ckpt").write_bytes(good)
    checkpoint = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    # the files made from it below are hand-made, sealed with a digest as mnist_lit seals its own: what each case
    # checks is what follows the digest check
    del checkpoint[DIGEST_KEY]
    torch.save({"state_dict": checkpoint["state_dict"]}, bad / "state-dict-only.ckpt")
    weights_only = {k: v for k, v in checkpoint.items() if k not in ("optimizer_states", "loops")}
    torch.save({**weights_only, DIGEST_KEY: digest(weights_only)}, bad / "weights-only.ckpt")
    nan = {
        **checkpoint,
        "state_dict": {k: torch.full_like(v, float("nan")) for k, v in checkpoint["state_dict"].items()},
    }
    torch.save({**nan, DIGEST_KEY: digest(nan)}, bad / "nan.ckpt")
    (bad / "folder.pth").mkdir()
    torch.save({"conv1.weight": torch.zeros(10, 1, 5, 5), "payload": Evil(root / "PWNED")}, bad / "evil.pth")
    (bad / "truncated.ckpt").write_bytes(good[: len(good) // 2])
    for how in ("truncated-gz", "short", "magic"):
        folder = write_mnist(bad / f"data-{how}", train=200, test=50)
        path = folder / "train-images-idx3-ubyte.gz"
        payload = gzip.decompress(path.read_bytes())
        damaged = {
            "truncated-gz": path.read_bytes()[:500],
            "short": gzip.compress(payload[:-1000]),
            "magic": gzip.compress(b"\x00\x00\x08\x01" + payload[4:]),
        }[how]
        path.write_bytes(damaged)
    (bad / "not-a-dir").write_text("x")
    os.mkfifo(bad / "pipe.pth")  # a special file export must not replace
    (bad / "no-ckpt-run").mkdir()  # a root whose fit ran with checkpointing off
    result = run_cli(
        "fit", "--data.data_dir", str(mnist_dir), *SYNTHETIC, *QUIET, "--trainer.max_steps", "2",
        "--trainer.enable_checkpointing", "false", cwd=bad / "no-ckpt-run",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    huge = bad / "huge"
    huge.mkdir()
    Image.new("L", (13000, 13000), 255).save(huge / "blank-13000.png")  # ~200 KB on disk, 169 megapixels
    (bad / "images-empty" / "3").mkdir(parents=True)
    (bad / "images-unknown" / "cat").mkdir(parents=True)
    (bad / "images-unknown" / "cat" / "tabby.txt").write_text("a cat")
    (bad / "images-unreadable" / "3").mkdir(parents=True)
    (bad / "images-unreadable" / "3" / "notes.txt").write_text("not an image")
    return root


def data(mnist_dir: Path) -> list[str]:
    return ["--data.data_dir", str(mnist_dir), *SYNTHETIC, *QUIET]


CASES = {
    # name: (arguments after the subcommand, words the one-line error must contain)
    "negative lr": (["fit", "--model.lr", "-1"], ["--model.optimizer", "Invalid learning rate: -1"]),
    "infinite lr": (
        ["fit", "--model.optimizer.lr", "inf"],
        ["--model.optimizer.lr: 'inf' is not valid; it takes a finite float"],
    ),
    "nan momentum": (
        ["fit", "--model.momentum", "nan"],
        ["--model.optimizer.momentum: 'nan' is not valid; it takes a finite float"],
    ),
    "momentum not a number": (
        ["fit", "--model.momentum", "x"],
        ["--model.optimizer.momentum: 'x' is not valid; it takes float"],
    ),
    "batch size not an int": (
        ["fit", "--data.batch_size", "1.5"],
        ["--data.batch_size: '1.5' is not valid; it takes an int > 0"],
    ),
    "fraction not a number": (
        ["fit", "--data.image_val_fraction", "half"],
        ["--data.image_val_fraction: 'half' is not valid; it takes a number >= 0 and <= 1"],
    ),
    "zero lr": (["fit", "--model.lr", "0"], ["--model.optimizer.lr: 0.0 is out of range; it must be > 0"]),
    "a network's width of 0": (
        ["fit", "--model.net", "mnist_lit.model.BatchNormNet", "--model.net.width", "0"],
        ["--model.net.width: 0 is out of range; it must be > 0"],
    ),
    "a network's dropout of 1, which would train nothing": (
        ["fit", "--model.net", "ConvNet", "--model.net.dropout", "1"],
        ["--model.net ConvNet", "a dropout of 1 zeroes every input of the linear layer, which then never learns"],
    ),
    "a network's dropout of 1.5": (
        ["fit", "--model.net", "ConvNet", "--model.net.dropout", "1.5"],
        ["--model.net.dropout: 1.5 is out of range; it must be >= 0 and <= 1"],
    ),
    "lr not a number": (["fit", "--model.optimizer.lr", "abc"], ["--model.optimizer.lr: 'abc' is not valid"]),
    "momentum of 1.5": (["fit", "--model.momentum", "1.5"], ["--model.optimizer.momentum: 1.5 is out of range"]),
    "unknown optimizer": (["fit", "--model.optimizer", "Adamm"], ["--model.optimizer", "no class named 'Adamm'"]),
    "an option the optimizer lacks": (
        ["fit", "--model.optimizer.betas", "[0.9,0.99]"],
        ["--model.optimizer.betas: SGD has no option 'betas'"],
    ),
    "OneCycleLR without max_lr": (
        ["fit", "--model.lr_scheduler", "OneCycleLR"],
        ["--model.lr_scheduler OneCycleLR needs max_lr: add --model.lr_scheduler.max_lr VALUE"],
    ),
    "CSVLogger without save_dir": (
        ["fit", "--trainer.logger", "CSVLogger"],
        ["--trainer.logger CSVLogger needs save_dir: add --trainer.logger.save_dir VALUE"],
    ),
    "unknown logger": (["fit", "--trainer.logger", "Foo"], ["--trainer.logger: no class named 'Foo'"]),
    "EarlyStopping without monitor": (
        ["fit", "--trainer.callbacks+=EarlyStopping"],
        ["--trainer.callbacks EarlyStopping needs monitor: add --trainer.callbacks.monitor VALUE"],
    ),
    "monitor of a metric never logged": (
        [
            "fit",
            "--ckpt_path",
            "last",
            "--trainer.max_epochs",
            "3",
            "--trainer.callbacks+=ModelCheckpoint",
            "--trainer.callbacks.monitor",
            "val_acc",
        ],
        ["ModelCheckpoint: monitor 'val_acc' is not a metric this run logs; it logs train/loss, train/lr, val/loss"],
    ),
    "ReduceLROnPlateau without validation": (
        [
            "fit",
            "--trainer.default_root_dir",
            "new",
            "--data.val_size",
            "0",
            "--model.lr_scheduler",
            "torch.optim.lr_scheduler.ReduceLROnPlateau",
        ],
        ["ReduceLROnPlateau watches val/loss, and this run has no validation"],
    ),
    # torch checks these only when the schedule is built or first stepped: a traceback mid-fit before
    "a schedule of no length": (
        ["fit", "--model.lr_scheduler", "CosineAnnealingLR", "--model.lr_scheduler.T_max", "0"],
        ["--model.lr_scheduler CosineAnnealingLR:"],
    ),
    "a one-cycle of no steps": (
        [
            "fit",
            "--model.lr_scheduler",
            "OneCycleLR",
            "--model.lr_scheduler.max_lr",
            "0.1",
            "--model.lr_scheduler.total_steps",
            "0",
        ],
        ["--model.lr_scheduler OneCycleLR: Expected positive integer total_steps, but got 0"],
    ),
    "a plateau factor over 1": (
        [
            "fit",
            "--model.lr_scheduler",
            "torch.optim.lr_scheduler.ReduceLROnPlateau",
            "--model.lr_scheduler.factor",
            "2.0",
        ],
        ["--model.lr_scheduler ReduceLROnPlateau: Factor should be < 1.0"],
    ),
    "a cycle of no steps up": (
        [
            "fit",
            "--model.lr_scheduler",
            "CyclicLR",
            "--model.lr_scheduler.base_lr",
            "0.01",
            "--model.lr_scheduler.max_lr",
            "0.1",
            "--model.lr_scheduler.step_size_up",
            "0",
        ],
        ["--model.lr_scheduler CyclicLR:"],
    ),
    "a schedule resumed without its state": (
        [
            "fit",
            "--model.lr_scheduler",
            "StepLR",
            "--model.lr_scheduler.step_size",
            "1",
            "--model.lr_scheduler.last_epoch",
            "3",
        ],
        ["--model.lr_scheduler StepLR: param 'initial_lr' is not specified"],
    ),
    "a class name two modules have": (
        ["fit", "--model.lr_scheduler", "ReduceLROnPlateau"],
        ["--model.lr_scheduler: Multiple subclasses with name ReduceLROnPlateau", "torch.optim.lr_scheduler"],
    ),
    "another optimizer on a resume": (
        ["fit", "--ckpt_path", "last", "--model.optimizer", "Adam"],
        ["--model.optimizer cannot change when resuming", "torch.optim.SGD"],
    ),
    "a schedule on a resume": (
        ["fit", "--ckpt_path", "last", "--model.lr_scheduler", "StepLR", "--model.lr_scheduler.step_size", "1"],
        ["--model.lr_scheduler cannot change when resuming"],
    ),
    "an optimizer switch on a resume": (
        ["fit", "--ckpt_path", "last", "--model.optimizer.nesterov", "true"],
        ["--model.optimizer.nesterov cannot change when resuming"],
    ),
    "channels_last on a resume": (
        ["fit", "--ckpt_path", "last", "--model.channels_last", "false"],
        ["--model.channels_last cannot change when resuming"],
    ),
    "negative seed": (["test", "--ckpt_path", "last", "--seed_everything", "-5"], ["--seed_everything", "-5"]),
    "no batches to accumulate": (
        ["fit", "--ckpt_path", "last", "--trainer.accumulate_grad_batches", "0"],
        ["accumulate_grad_batches"],
    ),
    "validation beyond the epoch": (
        ["fit", "--ckpt_path", "last", "--trainer.max_epochs", "3", "--trainer.val_check_interval", "1000"],
        ["--trainer.val_check_interval (1000) must be less than or equal to the number of the training batches"],
    ),
    "validation every 0 batches": (
        ["fit", "--ckpt_path", "last", "--trainer.val_check_interval", "0"],
        ["val_check_interval", "> 0"],
    ),
    "batch size 0": (["fit", "--data.batch_size", "0"], ["--data.batch_size"]),
    "text for a number": (["fit", "--trainer.max_epochs", "ten"], ["--trainer.max_epochs", "'ten'", "int"]),
    "unknown option": (["fit", "--model.optimzer", "Adam"], ["--model.optimzer", "did you mean --model.optimizer?"]),
    "unknown strategy": (["test", "--ckpt_path", "last", "--trainer.strategy", "foo"], ["strategy"]),
    "no TPU here": (["test", "--ckpt_path", "last", "--trainer.accelerator", "tpu"], ["torch_xla"]),
    "missing config file": (["fit", "--config", "nope.yaml"], ["nope.yaml"]),
    "no such subcommand": (["fitt"], ["'fitt' is not a subcommand", "export", "did you mean fit?"]),
    "a dash for an underscore": (["fit", "--ckpt-path", "last"], ["did you mean --ckpt_path?"]),
    "the guide's --lr": (["fit", "--lr", "0.1"], ["did you mean --model.optimizer.lr?"]),
    "an abbreviated option": (["fit", "--trainer.max_epoch", "1"], ["did you mean --trainer.max_epochs?"]),
    "missing checkpoint": (["test", "--ckpt_path", "nope.ckpt"], ["nope.ckpt", "does not exist"]),
    "random bytes": (["test", "--ckpt_path", "bad/random.ckpt"], ["random.ckpt", "not a readable checkpoint"]),
    "truncated checkpoint": (["test", "--ckpt_path", "bad/truncated.ckpt"], ["truncated.ckpt"]),
    "another model": (["test", "--ckpt_path", "bad/other-model.ckpt"], ["another model"]),
    "a plain state_dict": (["validate", "--ckpt_path", "bad/model.pth"], ["not a Lightning checkpoint"]),
    "pickled payload": (["test", "--ckpt_path", "bad/evil.ckpt"], ["refusing to load", "evil.ckpt"]),
    "pickled payload, weights_only off": (
        ["test", "--ckpt_path", "bad/evil.ckpt", "--weights_only", "false"],
        ["--weights_only false: mnist_lit reads every checkpoint as data"],  # refused before the file is opened
    ),
    "resume a pickled payload": (["fit", "--ckpt_path", "bad/evil.ckpt"], ["refusing to load"]),
    "pickled shell command": (["test", "--ckpt_path", "bad/evil-shell.ckpt"], ["refusing to load"]),
    "a text file": (["test", "--ckpt_path", "bad/hello.ckpt"], ["hello.ckpt", "not a readable checkpoint"]),
    "a folder": (["test", "--ckpt_path", "bad"], ["is a folder"]),
    "a state_dict only": (["test", "--ckpt_path", "bad/state-dict-only.ckpt"], ["not a Lightning checkpoint"]),
    "resume weights only": (["fit", "--ckpt_path", "bad/weights-only.ckpt"], ["weights only", "cannot resume"]),
    "resume another run over this one": (
        ["fit", "--ckpt_path", "bad/other-run/checkpoints/last.ckpt"],
        ["holds another run", "would overwrite"],
    ),
    "test without a checkpoint": (["test"], ["test needs trained weights", "--ckpt_path"]),
    "validate without a checkpoint": (["validate"], ["validate needs trained weights"]),
    "checkpoint folder is a file": (["fit", "--checkpoint.dirpath", "bad/not-a-dir"], ["is a file"]),
    "truncated data file": (
        ["validate", "--ckpt_path", "last", "--data.data_dir", "bad/data-truncated-gz"],
        ["cannot read"],
    ),
    "short data file": (["validate", "--ckpt_path", "last", "--data.data_dir", "bad/data-short"], ["truncated"]),
    "wrong magic number": (["validate", "--ckpt_path", "last", "--data.data_dir", "bad/data-magic"], ["magic"]),
    "data_dir is a file": (["test", "--ckpt_path", "last", "--data.data_dir", "bad/not-a-dir"], ["is a file"]),
    "weights of nan": (["test", "--ckpt_path", "bad/nan.ckpt"], ["nan.ckpt", "finite numbers"]),
    "val_size too large": (["validate", "--ckpt_path", "last", "--data.val_size", "100000"], ["val_size"]),
    "validate without a validation set": (["validate", "--ckpt_path", "last", "--data.val_size", "0"], ["val_size"]),
    "best without a monitored metric": (["test", "--ckpt_path", "best"], ["best"]),
    "no GPU here": (["test", "--ckpt_path", "last", "--trainer.accelerator", "gpu"], ["gpu"]),
    "unknown dataset": (["fit", "--data.dataset", "kmnist"], ["--data.dataset", "'kmnist'", "fashion_mnist"]),
    "test on another dataset": (
        ["test", "--ckpt_path", "last", "--data.dataset", "fashion_mnist"],
        ["trained on MNIST (mnist), not on Fashion-MNIST", "drop --data.dataset"],
    ),
    "freeze an unknown layer": (
        ["fit", "--trainer.default_root_dir", "bad/fresh", "--model.freeze", "[conv3]"],
        ["--model.freeze", "conv3", "conv1, conv2, fc1, fc2"],
    ),
    "freeze every layer": (
        ["fit", "--trainer.default_root_dir", "bad/fresh", "--model.freeze", "[conv1, conv2, fc1, fc2]"],
        ["nothing to train"],
    ),
    "fine-tune and resume at once": (
        ["fit", "--ckpt_path", "last", "--model.init_from", "last"],
        ["--model.init_from", "--ckpt_path", "one of them"],
    ),
    "fine-tune from a missing file": (["fit", "--model.init_from", "nope.ckpt"], ["nope.ckpt", "does not exist"]),
    "fine-tune over the run it starts from": (
        ["fit", "--model.init_from", "last"],
        ["--model.init_from last", "--checkpoint.dirpath"],
    ),
    "fine-tune from a pickled payload": (
        ["fit", "--trainer.default_root_dir", "bad/fresh", "--model.init_from", "bad/evil.ckpt"],
        ["refusing to load"],
    ),
    "fine-tune from another model": (
        ["fit", "--trainer.default_root_dir", "bad/fresh", "--model.init_from", "bad/other-model.ckpt"],
        ["another model"],
    ),
    "image folder missing": (
        ["test", "--ckpt_path", "last", "--data.image_dir", "nope"],
        ["--data.image_dir", "no such"],
    ),
    "image folder with an empty class folder": (
        ["test", "--ckpt_path", "last", "--data.image_dir", "bad/images-empty"],
        ["class folder 3 holds no files"],
    ),
    "image folder with an unknown class": (
        ["test", "--ckpt_path", "last", "--data.image_dir", "bad/images-unknown"],
        ["cat", "matches none of the model's classes"],
    ),
    "image folder without a readable image": (
        ["test", "--ckpt_path", "last", "--data.image_dir", "bad/images-unreadable"],
        ["class folder 3 holds no readable image"],
    ),
    "image folder without a test split": (
        ["test", "--ckpt_path", "last", "--data.image_dir", "bad/images-empty", "--data.image_test_fraction", "0"],
        ["--data.image_test_fraction is 0"],
    ),
    "image folder fraction above 1": (
        ["fit", "--data.image_val_fraction", "1.5"],
        ["--data.image_val_fraction", "1.5"],
    ),
    "export format": (["export", "--ckpt_path", "last", "--output", "model.txt"], [".txt"]),
    "export to a folder": (["export", "--ckpt_path", "last", "--output", "bad/folder.pth"], ["is a folder"]),
    "export without output": (["export", "--ckpt_path", "last"], ["--output"]),
    "train for 0 epochs": (["fit", "--trainer.max_epochs", "0"], ["--trainer.max_epochs", "trains nothing"]),
    "train for 0 steps": (["fit", "--trainer.max_steps", "0"], ["--trainer.max_steps", "trains nothing"]),
    "train on 0 batches": (
        ["fit", "--trainer.limit_train_batches", "0"],
        ["--trainer.limit_train_batches", "trains nothing"],
    ),
    "test after a fit without checkpoints": (
        ["test", "--ckpt_path", "last", "--trainer.default_root_dir", "bad/no-ckpt-run"],
        ["no checkpoint to load", "checkpointing on"],
    ),
    "a second fit into a folder in use": (["fit", "--ckpt_path", "last"], ["is in use by another fit (PID 99999)"]),
    "an image over the pixel budget": (
        ["predict", "--ckpt_path", "last", "--data.predict_path", "bad/huge"],
        ["no readable images"],
    ),
    "export over a special file": (
        ["export", "--ckpt_path", "last", "--output", "bad/pipe.pth"],
        ["not a regular file"],
    ),
    "serve without a checkpoint": (["serve"], ["serve needs trained weights", "--ckpt_path"]),
    "serve from an empty root": (
        ["serve", "--ckpt_path", "last", "--trainer.default_root_dir", "bad"],
        ["no checkpoint", "--trainer.default_root_dir"],
    ),
    "serve a pickled payload": (["serve", "--ckpt_path", "bad/evil.ckpt"], ["refusing to load"]),
    "serve a pickled .pth": (["serve", "--ckpt_path", "bad/evil.pth"], ["evil.pth", "holds pickled Python objects"]),
    "serve a .pth of another model": (["serve", "--ckpt_path", "bad/model.pth"], ["another model"]),
    "serve a folder": (["serve", "--ckpt_path", "bad/folder.pth"], ["is a folder"]),
    "serve weights of nan": (["serve", "--ckpt_path", "bad/nan.ckpt"], ["finite numbers"]),
    "serve on a privileged port": (["serve", "--ckpt_path", "last", "--port", "80"], ["--port", "80", ">= 1024"]),
    "serve on another address": (["serve", "--ckpt_path", "last", "--host", "10.1.2.3"], ["--host", "10.1.2.3"]),
    "serve on a GPU": (["serve", "--ckpt_path", "last", "--accelerator", "cuda"], ["--accelerator cuda", "no such"]),
    "serve batches of 0": (
        ["serve", "--ckpt_path", "last", "--max_batch_size", "0"],
        ["--max_batch_size", "0 is out of range; it must be > 0"],
    ),
    "export without checkpoint": (
        ["export", "--ckpt_path", "last", "--output", "m.pth", "--trainer.default_root_dir", "bad"],
        ["no checkpoint", "--trainer.default_root_dir"],
    ),
}


HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, b"99999")
print("held", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_line_and_harms_nothing(case, run_root, mnist_dir, monkeypatch, request):
    args, needles = CASES[case]
    if args[0] in ("fit", "validate", "test", "predict"):
        args = [args[0], *data(mnist_dir), *args[1:]]  # the case's own options come last and win
    monkeypatch.chdir(run_root)
    monkeypatch.setattr("sys.argv", ["mnist_lit"])
    if case == "a second fit into a folder in use":  # another process holds the lock, as a running fit does
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLD_LOCK, str(run_root / "checkpoints" / ".lock")], stdout=subprocess.PIPE
        )
        holder.stdout.readline()
        request.addfinalizer(holder.kill)
    before = fingerprint(run_root)
    if torch.cuda.is_available() and case in ("no GPU here", "serve on a GPU"):
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit) as exited:
        main(args)
    message = str(exited.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    after = fingerprint(run_root)
    assert {k: after[k] for k in before} == before  # nothing that was there changed or went
    assert not (run_root / "PWNED").exists()
    assert not list(run_root.rglob("*.part"))  # no half-written file left behind
    assert sorted(p.name for p in (run_root / "lightning_logs").iterdir()) == ["version_0"]  # no empty log folders
    assert (run_root / "bad" / "pipe.pth").is_fifo()


@pytest.mark.slow  # a whole run or several: in the slow suite, so the default one stays under 4 minutes
def test_errors_reach_the_shell_as_one_line_and_a_failure_status(run_root, mnist_dir):
    assert_clean_error(run_cli("fit", "--model.lr", "-1", cwd=run_root), "--model.optimizer")
    assert_clean_error(run_cli("test", "--ckpt_path", "bad/evil.ckpt", *data(mnist_dir), cwd=run_root), "refusing")
    assert not (run_root / "PWNED").exists()


def test_the_booby_trap_really_fires_when_loaded_unsafely(run_root, tmp_path):
    """So the tests above prove something: the same file, loaded the unsafe way, creates the marker."""
    evil = tmp_path / "evil.ckpt"
    torch.save({"payload": Evil(tmp_path / "marker")}, evil)
    with pytest.raises(CheckpointError, match="refusing"):
        load_checkpoint(evil)
    assert not (tmp_path / "marker").exists()
    torch.load(evil, weights_only=False)
    assert (tmp_path / "marker").exists()


@pytest.mark.slow  # a fit that looks for the files (5 s): in the slow suite, so the default one stays under 4 minutes
def test_empty_data_dir_without_network_fails_fast_and_clean(tmp_path):
    """No files, no network (sockets are blocked in the child): a clear error within seconds."""
    (tmp_path / "sitecustomize.py").write_text(
        "import socket\n"
        "def _blocked(*a, **k):\n    raise OSError('network blocked by the test')\n"
        "socket.getaddrinfo = _blocked\nsocket.socket.connect = _blocked\n"
    )
    import os
    import time

    from helpers.cli import cli_env

    env = cli_env()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    start = time.monotonic()
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "mnist_lit", "fit", "--data.data_dir", str(tmp_path / "empty"), *QUIET],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert_clean_error(result, "MNIST files not found", "Downloading them failed")
    assert time.monotonic() - start < 60
    shutil.rmtree(tmp_path / "empty", ignore_errors=True)


def test_a_diverged_run_stops_before_saving_non_finite_weights(tmp_path, mnist_dir, run_main):
    status, _, err = run_main("fit", *data(mnist_dir), "--model.lr", "1e6", "--trainer.max_epochs", "1", cwd=tmp_path)
    assert status != 0 and "error: training diverged" in err and "learning rate" in err, err[-2000:]
    for path in tmp_path.rglob("*.ckpt"):  # whatever was saved holds finite numbers
        weights = torch.load(path, weights_only=True)["state_dict"].values()
        assert all(bool(w.isfinite().all()) for w in weights), path


def test_resuming_a_finished_run_says_there_is_nothing_to_train_and_writes_nothing(run_root, mnist_dir, run_main):
    before = fingerprint(run_root)
    status, _, err = run_main("fit", *data(mnist_dir), "--ckpt_path", "last", "--trainer.max_epochs", "1", cwd=run_root)
    assert status == 0, err[-2000:]  # not a failure: a requeued job or a script run twice finds its run complete
    assert "nothing to train:" in err and "--trainer.max_epochs 1" in err, err[-2000:]
    after = fingerprint(run_root)
    assert {k: after.get(k) for k in before if not k.endswith(".lock")} == {
        k: v for k, v in before.items() if not k.endswith(".lock")
    }
    assert sorted(p.name for p in (run_root / "lightning_logs").iterdir()) == ["version_0"]


@pytest.mark.slow  # a fit and a resume: about 30 s
def test_resuming_a_run_trained_past_the_limit_says_nothing_to_train_before_anything_is_built(tmp_path, mnist_dir):
    """The README's `fit --ckpt_path last` on a run trained further than the limit it gives (the default 10 epochs
    after --trainer.max_epochs 20) ended in Lightning's own error, after the model's summary."""
    options = ["--data.data_dir", str(mnist_dir), *SYNTHETIC, "--trainer.enable_progress_bar", "false"]
    assert run_cli("fit", *options, "--trainer.max_epochs", "2", cwd=tmp_path).returncode == 0
    before = fingerprint(tmp_path)
    resumed = run_cli("fit", *options, "--ckpt_path", "last", "--trainer.max_epochs", "1", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert resumed.stderr.strip().splitlines()[-1].startswith("nothing to train: "), resumed.stderr
    assert "epoch 2" in resumed.stderr and "--trainer.max_epochs 1" in resumed.stderr, resumed.stderr
    assert "Params" not in resumed.stdout + resumed.stderr and "restored a checkpoint" not in resumed.stderr
    after = fingerprint(tmp_path)
    assert {k: after.get(k) for k in before if not k.endswith(".lock")} == {
        k: v for k, v in before.items() if not k.endswith(".lock")
    }


class Writes(io.StringIO):
    """A stderr that keeps each write it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def test_the_error_line_reaches_stderr_in_one_write(monkeypatch, tmp_path):
    """The processes of a DDP run share torchrun's stream: a line written in two pieces (Python's own
    `sys.exit(message)` writes the message, then its newline) ran into another process's line in CI."""
    stderr = Writes()
    monkeypatch.setattr("sys.stderr", stderr)
    monkeypatch.setattr("sys.argv", ["mnist_lit", "export", "--ckpt_path", str(tmp_path / "missing.ckpt")])
    with pytest.raises(SystemExit) as exited:
        entry()
    assert exited.value.code == 1
    (line,) = [text for text in stderr.writes if text.strip()]
    assert line.startswith("error: ") and line.endswith("\n") and line.count("\n") == 1, stderr.writes
