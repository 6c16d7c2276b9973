"""The data: IDX decoding, file layouts, checks, and batches cut from memory in a resumable order."""

from __future__ import annotations

import gzip
import re
import shutil
import socket
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers.mnist import idx_bytes, write_mnist

from mnist_lit.data import MNISTDataModule
from mnist_lit.datasets.batches import BatchLoader, EpochBatches
from mnist_lit.datasets.catalog import FILE_NAMES
from mnist_lit.datasets.idx import normalize
from mnist_lit.errors import DataError


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def datamodule(folder: Path, **kwargs) -> MNISTDataModule:
    kwargs = {"verify_checksums": False, "val_size": 64, "download": False, **kwargs}
    return MNISTDataModule(data_dir=str(folder), **kwargs)


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("nested", [False, True])
def test_reads_each_layout_and_writes_nothing(tmp_path, gz, nested):
    folder = tmp_path / "data"
    write_mnist(folder / "MNIST" / "raw" if nested else folder, train=300, test=100, gz=gz)
    before = snapshot(folder)
    dm = datamodule(folder)
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    assert snapshot(folder) == before
    images, labels = dm.splits["train"]
    assert images.shape == (236, 1, 28, 28) and images.dtype == torch.float32 and labels.dtype == torch.int64
    assert len(dm.splits["val"][0]) == 64 and len(dm.splits["test"][0]) == 100


def test_normalisation_is_bit_identical_to_torchvision():
    from torchvision import transforms

    raw = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8)
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    expected = torch.stack([transform(image.numpy()) for image in raw])
    assert torch.equal(normalize(raw), expected)


def test_validation_split_is_fixed_and_disjoint(tmp_path):
    folder = write_mnist(tmp_path / "d", train=300, test=10)
    splits = []
    for _ in range(2):
        dm = datamodule(folder, val_size=50)
        dm.setup("fit")
        splits.append(dm.splits)
    assert torch.equal(splits[0]["val"][0], splits[1]["val"][0])
    train, val = splits[0]["train"][0].flatten(1), splits[0]["val"][0].flatten(1)
    assert len(train) + len(val) == 300
    assert not (train[:, None, :] == val[None, :, :]).all(-1).any()


def test_val_size_zero_trains_on_everything_in_file_order(tmp_path):
    folder = write_mnist(tmp_path / "d", train=100, test=10)
    dm = datamodule(folder, val_size=0)
    dm.setup("fit")
    assert len(dm.splits["train"][0]) == 100 and dm.val_dataloader() == []


def test_checksum_mismatch_names_the_file(tmp_path):
    folder = write_mnist(tmp_path / "d", train=100, test=10)
    dm = datamodule(folder, verify_checksums=True)
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz is corrupt or truncated"):
        dm.setup("fit")


def corrupt(folder: Path, name: str, how: str) -> None:
    path = folder / f"{name}.gz"
    payload = gzip.decompress(path.read_bytes())
    if how == "truncated-gz":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "short-payload":
        path.write_bytes(gzip.compress(payload[:-100]))
    elif how == "magic":
        path.write_bytes(gzip.compress(b"\x00\x00\x08\x02" + payload[4:]))


@pytest.mark.parametrize(
    ("how", "message"),
    [("truncated-gz", "cannot read"), ("short-payload", "truncated or corrupt"), ("magic", "wrong magic number")],
)
def test_damaged_files_are_named(tmp_path, how, message):
    folder = write_mnist(tmp_path / "d", train=100, test=10)
    corrupt(folder, "train-images-idx3-ubyte", how)
    with pytest.raises(DataError, match=message) as raised:
        datamodule(folder).setup("fit")
    assert "train-images-idx3-ubyte" in str(raised.value)


def test_label_count_must_match(tmp_path):
    folder = write_mnist(tmp_path / "d", train=100, test=10)
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(torch.zeros(99), 2049)))
    with pytest.raises(DataError, match=r"100 images but .* 99 labels"):
        datamodule(folder).setup("fit")


def test_missing_files_without_download_say_where_to_put_them(tmp_path, monkeypatch):
    with pytest.raises(DataError, match=r"MNIST files not found in .*empty.*Put the four files there"):
        datamodule(tmp_path / "empty").prepare_data()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=f"not found in {re.escape(str(tmp_path / 'rel'))}: "):
        datamodule(Path("rel")).prepare_data()  # a relative folder is named by its full path


def test_missing_files_without_network_fail_fast(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network is unreachable (blocked by the test)")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(DataError, match="Downloading them failed"):
        datamodule(tmp_path / "new" / "empty", download=True).prepare_data()
    assert list(tmp_path.iterdir()) == []  # the failed download left no folders behind
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("kept")
    with pytest.raises(DataError, match="Downloading them failed"):
        datamodule(tmp_path / "mine", download=True).prepare_data()
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def test_partial_set_reports_only_the_missing(tmp_path):
    folder = write_mnist(tmp_path / "d", train=10, test=10)
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"not found in .*: t10k-labels-idx1-ubyte \("):
        datamodule(folder).prepare_data()
    assert set(FILE_NAMES) - {"t10k-labels-idx1-ubyte"} <= {p.name.removesuffix(".gz") for p in folder.iterdir()}


# --- batches ----------------------------------------------------------------------------------------------


def all_indices(sampler: EpochBatches) -> list[int]:
    return torch.cat(list(sampler)).tolist()


def test_training_order_is_a_function_of_seed_and_epoch():
    a, b = EpochBatches(1000, 64, shuffle=True, seed=1), EpochBatches(1000, 64, shuffle=True, seed=1)
    assert all_indices(a) == all_indices(b)
    first = all_indices(a)
    a.set_epoch(1)
    assert all_indices(a) != first and sorted(all_indices(a)) == list(range(1000))
    assert all_indices(EpochBatches(1000, 64, shuffle=True, seed=2)) != first


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_training_shards_are_disjoint_equal_and_cover_what_divides(world_size):
    shards = [
        all_indices(EpochBatches(1000, 64, True, seed=1, rank=r, world_size=world_size)) for r in range(world_size)
    ]
    sizes = {len(s) for s in shards}
    assert sizes == {1000 // world_size}
    union = set().union(*shards)
    assert len(union) == sum(len(s) for s in shards)  # disjoint
    assert len(union) == 1000 - 1000 % world_size


@pytest.mark.parametrize("world_size", [1, 3, 7])
def test_evaluation_shards_see_every_sample_exactly_once(world_size):
    shards = [all_indices(EpochBatches(1000, 64, False, rank=r, world_size=world_size)) for r in range(world_size)]
    assert sorted(i for shard in shards for i in shard) == list(range(1000))


def test_resume_mid_epoch_continues_the_same_order():
    images, labels = torch.arange(500.0)[:, None], torch.arange(500)
    full = BatchLoader(images, labels, EpochBatches(500, 64, True, seed=3))
    full.sampler.set_epoch(2)
    expected = [y.tolist() for _, y in full]
    part = BatchLoader(images, labels, EpochBatches(500, 64, True, seed=3))
    part.sampler.set_epoch(2)
    iterator = iter(part)
    seen = [next(iterator)[1].tolist() for _ in range(3)]
    state = part.state_dict()
    resumed = BatchLoader(images, labels, EpochBatches(500, 64, True, seed=3))
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(2)  # Lightning calls it again for the same epoch on resume
    assert seen + [y.tolist() for _, y in resumed] == expected
    resumed.sampler.set_epoch(3)  # and the next epoch starts from its beginning
    assert sum(len(y) for _, y in resumed) == 500


def test_resume_keeps_the_runs_data_order_whatever_the_new_seed_and_batch_size():
    images, labels = torch.arange(500.0)[:, None], torch.arange(500)
    reference = EpochBatches(500, 64, True, seed=3)
    reference.set_epoch(1)
    expected = all_indices(reference)
    part = BatchLoader(images, labels, EpochBatches(500, 64, True, seed=3))
    part.sampler.set_epoch(1)
    iterator = iter(part)
    seen = [i for _ in range(3) for i in next(iterator)[1].tolist()]
    # resumed without --seed_everything (another seed) and with another batch size
    resumed = BatchLoader(images, labels, EpochBatches(500, 100, True, seed=99))
    resumed.load_state_dict(part.state_dict())
    resumed.sampler.set_epoch(1)
    rest = [y.tolist() for _, y in resumed]
    assert [len(y) for y in rest] == [100, 100, 100, 8]
    assert seen + [i for y in rest for i in y] == expected  # every sample once, in the run's order
    reference.set_epoch(2)
    resumed.sampler.set_epoch(2)
    assert all_indices(resumed.sampler) == all_indices(reference)  # later epochs follow the run's seed too


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2), (2, 3)])
def test_resume_with_another_number_of_processes_keeps_the_epoch_length(before, after):
    """The rest of the epoch is dealt out anew; each process still gets its epoch's number of batches."""
    states = []
    for rank in range(before):
        sampler = EpochBatches(960, 32, True, seed=0, rank=rank, world_size=before)
        batches = iter(BatchLoader(torch.zeros(960, 1), torch.arange(960), sampler))
        for _ in range(5):
            next(batches)
        states.append(sampler.state_dict())
    assert len({tuple(s.values()) for s in states}) == 1
    seen = []
    for rank in range(after):
        sampler = EpochBatches(960, 32, True, seed=0, rank=rank, world_size=after)
        sampler.load_state_dict(states[0])
        rest = [y for _, y in BatchLoader(torch.zeros(960, 1), torch.arange(960), sampler)]
        assert len(rest) == len(sampler) - 5
        seen.append(torch.cat(rest))
    seen = torch.cat(seen)
    assert len(seen) == len(set(seen.tolist())) or after < before  # no repeats unless the new processes need more


def test_workers_serve_the_same_batches(tmp_path):
    images, labels = torch.randn(300, 1, 28, 28), torch.arange(300)
    inline = [y for _, y in BatchLoader(images, labels, EpochBatches(300, 64, True, seed=5))]
    workers = [y for _, y in BatchLoader(images, labels, EpochBatches(300, 64, True, seed=5), num_workers=2)]
    assert [y.tolist() for y in inline] == [y.tolist() for y in workers]


def test_datamodule_loaders_follow_the_trainer(tmp_path):
    folder = write_mnist(tmp_path / "d", train=300, test=50)
    dm = datamodule(folder, batch_size=32, test_batch_size=20, num_workers=0)
    dm.setup("fit")
    dm.setup("test")
    train, test = dm.train_dataloader(), dm.test_dataloader()
    assert [len(y) for _, y in train][:1] == [32] and len(train) == -(-236 // 32)
    assert [len(y) for _, y in test] == [20, 20, 10]
    shutil.rmtree(folder)  # the data stays in memory once loaded
    assert sum(len(y) for _, y in dm.train_dataloader()) == 236


def test_mnists_files_in_the_default_folder_do_not_shadow_another_datasets_own(tmp_path, monkeypatch):
    # The Offline advice puts MNIST's four files directly in the default folder; Fashion-MNIST's own folder wins there
    from mnist_lit.datasets import catalog as datasets

    monkeypatch.setattr(datasets, "DEFAULT_DATA_DIR", str(tmp_path))
    write_mnist(tmp_path, gz=False)
    write_mnist(tmp_path / "FashionMNIST" / "raw", gz=False, seed=1)
    own = {tmp_path / "FashionMNIST" / "raw" / name for name in FILE_NAMES}
    assert set(datasets.find_files(tmp_path, "fashion_mnist").values()) == own
    assert set(datasets.find_files(tmp_path, "mnist").values()) == {tmp_path / name for name in FILE_NAMES}
    monkeypatch.setattr(datasets, "DEFAULT_DATA_DIR", str(tmp_path / "elsewhere"))  # a data_dir the user gave: first
    assert set(datasets.find_files(tmp_path, "fashion_mnist").values()) == {tmp_path / name for name in FILE_NAMES}


def test_a_shifted_batch_moves_each_image_by_its_own_offsets_within_the_bound_and_fills_the_border():
    from mnist_lit.data import shifted

    torch.manual_seed(0)
    images = torch.rand(64, 1, 28, 28) + 1  # every pixel > 1: the fill (-0.5) is told apart
    out = shifted(images, 2, -0.5)
    assert out.shape == images.shape
    moves = set()
    for image, moved in zip(images[:, 0], out[:, 0], strict=True):
        found = [
            (dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
            if torch.equal(moved, F.pad(image, (2, 2, 2, 2), value=-0.5)[2 + dy : 30 + dy, 2 + dx : 30 + dx])
        ]  # fmt: skip
        assert len(found) == 1
        moves.add(found[0])
    assert len(moves) > 10  # each image its own draw, not one offset for the batch
    assert torch.equal(shifted(images, 0, -0.5), images)


def test_shift_moves_training_batches_only(tmp_path, mnist_dir):
    from mnist_lit.data import MNISTDataModule

    class Stage:
        training = True

    data = MNISTDataModule(data_dir=str(mnist_dir), verify_checksums=False, val_size=64, shift=1)
    batch = (torch.ones(4, 1, 28, 28), torch.zeros(4, dtype=torch.long))
    data.trainer = Stage()  # type: ignore[assignment]
    torch.manual_seed(3)
    assert not torch.equal(data.on_after_batch_transfer(batch, 0)[0], batch[0])
    Stage.training = False  # validation, test, predict: the images as they are
    assert data.on_after_batch_transfer(batch, 0)[0] is batch[0]
