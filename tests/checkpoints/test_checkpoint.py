"""Checkpoint files: atomic writes, which file 'last' means, and loading nothing but tensors."""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict

import pytest
import torch

from mnist_lit.checkpoints.files import DIGEST_KEY, load_checkpoint, newest_checkpoint, resolve
from mnist_lit.checkpoints.io import AtomicCheckpointIO
from mnist_lit.errors import CheckpointError


def test_atomic_write_replaces_the_old_file_only_when_the_new_one_is_complete(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)
    io.flush()
    before = path.read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", fail)
    io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, path)  # written by another thread...
    with pytest.raises(CheckpointError, match=f"could not write checkpoint {path}: disk full"):
        io.flush()  # ...whose failure is raised here (or at the next save)
    assert path.read_bytes() == before  # the failed write never touched it
    monkeypatch.undo()
    io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, path)
    io.teardown()
    assert torch.equal(torch.load(path, weights_only=True)["state_dict"]["w"], torch.zeros(3))
    assert not (tmp_path / "last.ckpt.part").exists()


def test_a_save_holds_the_step_it_was_asked_for_though_the_writer_writes_it_later(tmp_path):
    # The writer thread writes the files after training has gone on: the next optimizer step updates the weights
    # and their momentum in place, and neither file may hold those.
    io = AtomicCheckpointIO()
    weights = torch.ones(3)
    state = OrderedDict(w=weights)
    state._metadata = OrderedDict(w={"version": 1})  # a state_dict's own attribute, kept as torch.save keeps it
    checkpoint = {
        "pytorch-lightning_version": "2.6.6",
        "state_dict": state,
        "optimizer_states": [{"state": {0: {"momentum_buffer": weights}}}],
    }
    gate = threading.Event()
    io._submit(gate.wait, 10)  # the writer busy: the save below waits in its queue
    io.save_checkpoint(checkpoint, tmp_path / "epoch=0-step=10.ckpt")
    io.copy(str(tmp_path / "epoch=0-step=10.ckpt"), str(tmp_path / "last.ckpt"))
    weights.add_(1)  # the next step
    gate.set()
    io.teardown()
    for name in ("epoch=0-step=10.ckpt", "last.ckpt"):
        loaded = load_checkpoint(tmp_path / name)  # its digest verified
        assert torch.equal(loaded["state_dict"]["w"], torch.ones(3))
        assert torch.equal(loaded["optimizer_states"][0]["state"][0]["momentum_buffer"], torch.ones(3))
        assert loaded["state_dict"]._metadata == {"w": {"version": 1}}


def test_removal_waits_for_the_write_before_it(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    old, new = tmp_path / "epoch=0-step=10.ckpt", tmp_path / "epoch=0-step=20.ckpt"
    torch.save({"state_dict": {}}, old)
    release = threading.Event()
    replace = os.replace

    def slow_replace(src, dst, **folders):
        release.wait(10)
        replace(src, dst, **folders)

    monkeypatch.setattr(os, "replace", slow_replace)
    io.save_checkpoint({"state_dict": {}}, new)
    io.remove_checkpoint(old)
    time.sleep(0.2)
    assert old.exists() and not new.exists()  # the old file stays until its successor is complete
    release.set()
    io.teardown()
    assert new.exists() and not old.exists()


def test_last_is_last_ckpt_or_after_an_early_kill_the_newest_periodic_file(tmp_path):
    assert newest_checkpoint(tmp_path) is None
    for step in (3, 6):
        torch.save({}, tmp_path / f"epoch=0-step={step}.ckpt")
        time.sleep(0.01)
    (tmp_path / "epoch=0-step=9.ckpt.part").write_bytes(b"torn")
    assert newest_checkpoint(tmp_path).name == "epoch=0-step=6.ckpt"
    torch.save({}, tmp_path / "last.ckpt")
    assert resolve("last", tmp_path, fitting=True) == str(tmp_path / "last.ckpt")
    assert resolve("some/file.ckpt", tmp_path, fitting=False) == "some/file.ckpt"


def test_resolve_says_where_it_looked(tmp_path):
    with pytest.raises(CheckpointError, match=str(tmp_path / "last.ckpt")):
        resolve("last", tmp_path, fitting=False)
    with pytest.raises(CheckpointError, match="tracks a metric"):
        resolve("best", tmp_path, fitting=False)


def test_load_refuses_what_is_not_a_lightning_checkpoint(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.ckpt")
    with pytest.raises(CheckpointError, match="no state_dict"):
        load_checkpoint(tmp_path / "list.ckpt")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "empty.ckpt")


def reference_digest(checkpoint: dict) -> str:
    """The digest's definition, one hash update per value: what mnist_lit.checkpoints.digest computes faster."""
    import hashlib

    h = hashlib.sha256()

    def feed(value: object) -> None:
        if isinstance(value, torch.Tensor):
            h.update(f"T{value.dtype}{tuple(value.shape)}".encode())
            tensor = value.detach().cpu().contiguous()
            h.update(tensor.view(torch.uint8).numpy() if tensor.dim() else tensor.reshape(1).view(torch.uint8).numpy())
        elif isinstance(value, dict):
            h.update(b"D%d" % len(value))
            for key, item in value.items():
                feed(key)
                feed(item)
        elif isinstance(value, (list, tuple)):
            h.update(b"L%d" % len(value))
            for item in value:
                feed(item)
        else:
            h.update(f"{type(value).__name__}:{value!r};".encode())

    feed({k: v for k, v in checkpoint.items() if k != DIGEST_KEY})
    return h.hexdigest()


def test_the_digest_is_its_definition_for_every_kind_of_value(trained_run):
    from mnist_lit.checkpoints.digest import digest

    odd = {
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0),
        "transposed": torch.arange(6).reshape(2, 3).t(),
        "channels_last": torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last),
        "bools": torch.tensor([True, False]),
        "bf16": torch.randn(3, dtype=torch.bfloat16),
        "large": torch.randn(300, 1000),  # over a MiB: hashed where it lies
        "values": [1, 2.5, None, "x", (3, True), b"raw", OrderedDict(a=1)],
        7: {"nested": {"deeper": torch.ones(2, 2)}},
        DIGEST_KEY: "ignored",
    }
    assert digest(odd) == reference_digest(odd)
    assert digest(odd) != digest({**odd, "bools": torch.tensor([True, True])})
    fitted = load_checkpoint(trained_run / "checkpoints" / "last.ckpt")
    assert digest(fitted) == reference_digest(fitted) == fitted[DIGEST_KEY]


def test_a_write_creates_its_temporary_file_anew_beside_the_target_and_leaves_none_behind(tmp_path, monkeypatch):
    from mnist_lit.checkpoints import writer as storage

    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    taken = tmp_path / "run" / f".{'ab' * 6}.last.ckpt{storage.PART}"
    taken.parent.mkdir()
    taken.symlink_to(victim)  # planted at the first name the write will try
    names = iter([bytes.fromhex("ab" * 6), bytes.fromhex("cd" * 6)])
    monkeypatch.setattr(storage.os, "urandom", lambda n: next(names))
    storage.write_atomically(str(tmp_path / "run" / "last.ckpt"), b"new")
    assert (tmp_path / "run" / "last.ckpt").read_bytes() == b"new" and victim.read_bytes() == b"keep"
    assert taken.is_symlink()  # never followed, never removed
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "run" / "last.ckpt").stat().st_mode & 0o777 == 0o666 & ~umask  # as a plain open() makes it
    monkeypatch.undo()
    storage.write_atomically(str(tmp_path / "new" / "folder" / "x.ckpt"), b"made")  # its folder made on the way
    assert (tmp_path / "new" / "folder" / "x.ckpt").read_bytes() == b"made"

    def fail(fd: int) -> None:
        raise OSError("disk full")

    real_write = os.write
    monkeypatch.setattr(storage.os, "write", lambda fd, data: real_write(fd, bytes(data[:7])))  # short writes
    storage.write_atomically(str(tmp_path / "short.ckpt"), memoryview(bytes(range(256)) * 4).cast("I"))
    assert (tmp_path / "short.ckpt").read_bytes() == bytes(range(256)) * 4
    monkeypatch.setattr(storage.os, "write", lambda fd, data: 0)  # a file system that takes nothing
    with pytest.raises(OSError, match="no bytes written"):
        storage.write_atomically(str(tmp_path / "short.ckpt"), b"other")
    assert (tmp_path / "short.ckpt").read_bytes() == bytes(range(256)) * 4
    monkeypatch.undo()
    monkeypatch.setattr(storage.os, "fsync", fail)
    with pytest.raises(OSError, match="disk full"):
        storage.write_atomically(str(tmp_path / "run" / "last.ckpt"), b"newer")
    assert (tmp_path / "run" / "last.ckpt").read_bytes() == b"new"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == sorted(["last.ckpt", taken.name])
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(storage.PART)]


@pytest.mark.parametrize("make", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.5, fused=True),
    lambda p: torch.optim.Adam(p),
    lambda p: torch.optim.Adafactor(p),  # its state is not of the parameters' shapes
], ids=["SGD", "Adam", "Adafactor"])  # fmt: skip
def test_a_resumed_optimizer_state_is_checked_by_the_layout_the_optimizer_makes(make):
    from mnist_lit.checkpoints.resume import _optimizer_misfit

    model = torch.nn.Sequential(*[torch.nn.Linear(3, 3) for _ in range(6)])  # 12 parameters: ids past 9
    optimizer = make(model.parameters())
    model(torch.randn(2, 3)).sum().backward()
    optimizer.step()
    assert _optimizer_misfit(optimizer, optimizer.state_dict()) is None
    state = optimizer.state_dict()
    key = next(k for k, v in state["state"][11].items() if isinstance(v, torch.Tensor) and v.dim())
    state["state"][11][key] = torch.zeros(2)
    assert f"parameter 11's {key} is not a tensor of shape" in _optimizer_misfit(optimizer, state)
    state = optimizer.state_dict()
    state["param_groups"][0]["params"] = [*range(11), True]
    assert "do not name the model's 12 parameters" in _optimizer_misfit(optimizer, state)


def test_a_resumed_optimizer_state_goes_to_the_parameter_torch_gives_it_and_older_settings_are_filled_in():
    from mnist_lit.checkpoints.resume import _optimizer_misfit

    model = torch.nn.Linear(3, 4)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5, fused=True)
    model(torch.randn(2, 3)).sum().backward()
    sgd.step()
    state = sgd.state_dict()
    state["param_groups"][0]["params"] = [1, 0]  # torch would give the bias's buffer to the weight
    assert "parameter 0's momentum_buffer is not a tensor of shape (4, 3)" in _optimizer_misfit(sgd, state)
    adam = torch.optim.Adam(model.parameters())
    adam.step()
    state = adam.state_dict()
    for newer in ("decoupled_weight_decay", "foreach", "fused"):  # settings an older torch did not write
        state["param_groups"][0].pop(newer, None)
    assert _optimizer_misfit(adam, state) is None
    state["param_groups"][0]["lr"] = float("nan")
    assert "settings.lr is not a finite number" in _optimizer_misfit(adam, state)


def test_every_model_checkpoints_record_of_its_files_keeps_to_its_folder(tmp_path):
    """mnist_lit's Checkpoint and a ModelCheckpoint a user adds alike: ModelCheckpoint removes what it restores."""
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import ModelCheckpoint

    from mnist_lit.checkpoints.resume import keep_own_files

    mine = ModelCheckpoint(dirpath=str(tmp_path / "ck"))
    inside, outside = str(tmp_path / "ck" / "a.ckpt"), f"{tmp_path / 'ck'}/../../victim.ckpt"
    record = {"best_model_path": outside, "last_model_path": inside, "best_k_models": {outside: torch.tensor(1.0)}}
    checkpoint = {"callbacks": {mine.state_key: {**record, "dirpath": 3}}}
    keep_own_files(SimpleNamespace(callbacks=[mine]), checkpoint)
    kept = checkpoint["callbacks"][mine.state_key]
    assert kept["best_model_path"] == "" and kept["last_model_path"] == inside and kept["best_k_models"] == {}
    mine.load_state_dict(kept)  # what Lightning then does with it
    assert mine.best_model_path == ""
