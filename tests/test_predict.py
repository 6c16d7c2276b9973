"""predict on a person's own images, export for deployment, and what a run leaves to look at."""

from __future__ import annotations

import csv
import re
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.cli import QUIET, SYNTHETIC, printed_metrics, run_cli
from helpers.guide import Net as GuideNet
from helpers.images import digit
from PIL import Image

from mnist_lit.datasets.catalog import DATASETS
from mnist_lit.datasets.images import expand
from mnist_lit.datasets.images import prepare as prepare_as
from mnist_lit.errors import DataError
from mnist_lit.report import results_table

MNIST = DATASETS["mnist"]


def unnormalised(tensor: torch.Tensor) -> torch.Tensor:
    return tensor[0] * MNIST.std + MNIST.mean


def prepare(image: Image.Image) -> torch.Tensor:
    return prepare_as(image, MNIST.mean, MNIST.std, MNIST.box)


def test_prepare_gives_mnist_like_tensors():
    out = prepare(digit())
    assert out.shape == (1, 28, 28)
    pixels = unnormalised(out)
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6
    rows, cols = (pixels > 0.3).any(1).nonzero(), (pixels > 0.3).any(0).nonzero()
    assert max(rows.max() - rows.min(), cols.max() - cols.min()) + 1 <= 21  # inside the 20x20 box
    mass = pixels.sum()
    cy = (pixels.sum(1) * torch.arange(28)).sum() / mass
    cx = (pixels.sum(0) * torch.arange(28)).sum() / mass
    assert abs(cy - 14) <= 1 and abs(cx - 14) <= 1  # centred by centre of mass


def test_a_scan_becomes_the_same_digit():
    """Dark ink on light paper, three times larger, off-centre, in colour: prepared like the original."""
    small = digit()
    big = Image.eval(small.resize((84, 84), Image.Resampling.BICUBIC), lambda v: 255 - v)
    page = Image.new("L", (300, 200), 240)
    page.paste(big, (190, 20))
    a, b = unnormalised(prepare(small)), unnormalised(prepare(page.convert("RGB")))
    assert torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1] > 0.9


def test_prepare_keeps_the_aspect_ratio():
    bar = Image.new("L", (100, 100), 0)
    bar.paste(255, (45, 10, 55, 90))  # 10 wide, 80 tall
    pixels = unnormalised(prepare(bar))
    rows, cols = (pixels > 0.5).any(1).nonzero(), (pixels > 0.5).any(0).nonzero()
    assert rows.max() - rows.min() + 1 == 20 and cols.max() - cols.min() + 1 <= 4


def test_blank_image_is_not_a_digit():
    with pytest.raises(ValueError, match="no digit"):
        prepare(Image.new("L", (40, 40), 200))


def test_a_16_bit_scan_is_read_at_full_depth():
    eight = digit()
    sixteen = Image.fromarray(np.asarray(eight, dtype=np.uint16) * 257)  # the same picture, 16 bits per pixel
    assert sixteen.mode.startswith("I")
    assert torch.allclose(prepare(sixteen), prepare(eight), atol=1e-3)


def test_expand_file_folder_glob(tmp_path):
    for name in ("b.png", "a.jpg", ".hidden.png", "c[1].png"):
        digit().save(tmp_path / name)
    assert [p.name for p in expand(str(tmp_path))] == ["a.jpg", "b.png", "c[1].png"]
    assert [p.name for p in expand(str(tmp_path / "*.png"))] == ["b.png", "c[1].png"]
    assert [p.name for p in expand(str(tmp_path / "a.jpg"))] == ["a.jpg"]
    assert [p.name for p in expand(str(tmp_path / "c[1].png"))] == ["c[1].png"]  # a name, not a glob
    with pytest.raises(DataError, match="no such file"):
        expand(str(tmp_path / "nope"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mnist_dir):
    root = tmp_path_factory.mktemp("trained")
    args = ["fit", "--data.data_dir", str(mnist_dir), *SYNTHETIC, *QUIET, "--trainer.max_epochs", "2"]
    result = run_cli(*args, "--model.lr", "0.1", "--trainer.log_every_n_steps", "2", cwd=root)
    assert result.returncode == 0, result.stderr[-2000:]
    return root


def test_class_folders_given_as_predict_path_point_to_image_dir(tmp_path):
    for label in ("3", "7"):
        (tmp_path / "my_digits" / label).mkdir(parents=True)
        digit().save(tmp_path / "my_digits" / label / "a.png")
    with pytest.raises(DataError, match=r"no files directly in it, only folders \(3, 7\).*--data.image_dir's layout"):
        expand(str(tmp_path / "my_digits"))
    assert len(expand(str(tmp_path / "my_digits" / "*" / "*.png"))) == 2  # the glob the message suggests


@pytest.mark.slow  # whole runs: in the slow suite, so the default one stays under 4 minutes
def test_predict_prints_a_line_per_image_writes_a_csv_and_skips_what_is_not_an_image(trained, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    digit().save(folder / "seven.png")
    digit(56).convert("RGB").save(folder / "seven.jpg", quality=90)
    Image.eval(digit(40), lambda v: 255 - v).save(folder / "seven-on-paper.bmp")
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + zlib.compress(b"x"))
    Image.new("1", (20000, 10000)).save(folder / "huge.png")  # 200M pixels: PIL's decompression-bomb guard
    result = run_cli("predict", "--ckpt_path", "last", "--data.predict_path", str(folder), *QUIET, cwd=trained)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line.split("\t") for line in result.stdout.splitlines() if line.count("\t") == 2]
    assert sorted(Path(path).name for path, _, _ in lines) == ["seven-on-paper.bmp", "seven.jpg", "seven.png"]
    assert all(0 <= int(d) <= 9 and 0 < float(p) <= 1 for _, d, p in lines)
    assert "skipped" in result.stderr and "notes.txt" in result.stderr and "broken.png" in result.stderr
    assert "huge.png" in result.stderr and "Traceback" not in result.stderr
    csv_path = next(trained.glob("lightning_logs/version_*/predictions.csv"))
    assert str(csv_path) in result.stderr  # stdout holds the prediction lines only
    rows = list(csv.DictReader(csv_path.open()))
    assert [r["path"] for r in rows] == sorted(path for path, _, _ in lines)
    assert list(rows[0]) == ["path", "digit", "probability", *(f"p{d}" for d in range(10))]
    probabilities = [float(rows[0][f"p{d}"]) for d in range(10)]
    assert sum(probabilities) == pytest.approx(1, abs=1e-3)
    assert float(rows[0]["probability"]) == pytest.approx(max(probabilities), abs=1e-4)


def test_predict_with_no_readable_image_is_an_error(trained, tmp_path, run_main):
    (tmp_path / "notes.txt").write_text("not an image")
    status, out, err = run_main("predict", "--ckpt_path", "last", "--data.predict_path", str(tmp_path), cwd=trained)
    assert status != 0 and "skipped" in err and "error: no readable images among the files" in err
    assert "notes.txt\t" not in out


def test_export_pth_loads_into_the_guides_net_without_lightning(trained, tmp_path):
    result = run_cli("export", "--ckpt_path", "last", "--output", str(tmp_path / "model.pth"), cwd=trained)
    assert result.returncode == 0, result.stderr
    state = torch.load(tmp_path / "model.pth", weights_only=True)
    net = GuideNet()
    net.load_state_dict(state)  # strict, as in the guide
    checkpoint = torch.load(trained / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(state[k], checkpoint[f"net.{k}"]) for k in state)
    assert all(t.is_contiguous() for t in state.values())


@pytest.mark.slow  # whole runs: in the slow suite, so the default one stays under 4 minutes
def test_export_onnx_runs_in_onnxruntime_like_pytorch(trained, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    result = run_cli("export", "--ckpt_path", "last", "--output", str(tmp_path / "model.onnx"), cwd=trained)
    assert result.returncode == 0, result.stderr
    net = GuideNet().eval()
    state = torch.load(trained / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    net.load_state_dict({k.removeprefix("net."): v for k, v in state.items()})
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 7, 64):
        images = torch.randn(batch, 1, 28, 28)
        (out,) = session.run(None, {"image": images.numpy()})
        assert (torch.from_numpy(out) - net(images).detach()).abs().max() <= 1e-4


def test_tensorboard_reads_the_logged_scalars(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next(trained.glob("lightning_logs/version_0"))))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "val/loss", "val/acc"} <= tags
    assert len(events.Scalars("train/loss")) == 9  # every 2 steps of 18
    assert events.Scalars("train/lr")[0].value == pytest.approx(0.1)


def test_checkpoint_names_and_curves_count_what_is_done_tensorboard_the_steps_before(trained):
    # 2 epochs of 9 steps. A checkpoint's name and curves.png count what is done (epoch=2-step=18 after both
    # epochs); the bar names the epoch running from 0 (Epoch 0, Epoch 1); TensorBoard puts a step's loss at the
    # number of steps done before it (Lightning logs it before counting the step): step 18's loss at 17.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert (trained / "checkpoints" / "epoch=1-step=10.ckpt").is_file()  # saved in the second epoch, one done
    last = torch.load(trained / "checkpoints" / "last.ckpt", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (2, 18)
    curves = last["callbacks"]["TrainingCurves"]
    assert curves["train"][:, 0].tolist() == [2, 4, 6, 8, 9, 10, 12, 14, 16, 18]  # and each epoch's end
    assert curves["val"][:, 0].tolist() == [9, 18]
    events = EventAccumulator(str(next(trained.glob("lightning_logs/version_0"))))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 3, 5, 7, 9, 11, 13, 15, 17]
    assert [e.step for e in events.Scalars("val/acc")] == [8, 17]


@pytest.mark.slow  # whole runs: in the slow suite, so the default one stays under 4 minutes
def test_figures_are_png_files_after_fit_and_test(trained, mnist_dir):
    curves = trained / "lightning_logs" / "version_0" / "curves.png"
    result = run_cli("test", "--ckpt_path", "last", "--data.data_dir", str(mnist_dir), *SYNTHETIC, *QUIET, cwd=trained)
    assert result.returncode == 0, result.stderr[-2000:]
    version = max(trained.glob("lightning_logs/version_*"), key=lambda p: int(p.name.split("_")[1]))
    assert re.search(r"^\s*test/acc\s+\d\.\d{4}$", result.stdout, re.M), result.stdout  # rounded, not float32 noise
    assert not re.search(r"\.\d{10}", result.stdout), result.stdout
    for path in (curves, version / "confusion.png", version / "mistakes.png"):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
        with Image.open(path) as image:
            assert image.width > 300 and image.height > 150
    assert str(version / "confusion.png") in result.stdout


def test_result_tables_round_accuracies_to_4_decimals_and_losses_to_6_digits():
    metrics = {"test/loss": torch.tensor(0.045123456), "test/acc": torch.tensor(0.9857), "test/acc_3": 0.913043478}
    table = results_table(metrics, "Test")
    assert "0.9857000112533569" == f"{torch.tensor(0.9857).item()}"  # what Lightning's own table would print
    assert printed_metrics(table) == {"test/acc": 0.9857, "test/acc_3": 0.9130, "test/loss": 0.0451235}
    lines = table.splitlines()
    assert lines[0] == lines[2] == lines[-1] and set(lines[0]) == {"─"} and "Test metric" in lines[1]
    assert [line.split()[0] for line in lines[3:-1]] == ["test/acc", "test/acc_3", "test/loss"]  # name order


def test_validate_prints_the_rounded_table_once(trained, mnist_dir, run_main):
    args = ["--ckpt_path", "last", "--data.data_dir", str(mnist_dir), *SYNTHETIC, *QUIET]
    status, out, err = run_main("validate", *args, cwd=trained)
    assert status == 0, err[-2000:]
    assert out.count("Validate metric") == 1 and re.search(r"^\s*val/acc\s+\d\.\d{4}$", out, re.M), out
    assert not re.search(r"\.\d{10}", out), out
    status, out, err = run_main("validate", *args, "--verbose", "false", cwd=trained)
    assert status == 0 and "val/acc" not in out, out


@pytest.mark.filterwarnings("ignore:The dirpath has changed")  # the run was copied: expected
def test_a_resumed_finished_run_names_no_curves_file(trained, mnist_dir, tmp_path, run_main):
    # its version folder is discarded: no line may name a file in it
    shutil.copytree(trained, tmp_path / "run")
    args = ["--data.data_dir", str(mnist_dir), *SYNTHETIC, *QUIET, "--trainer.max_epochs", "2"]
    status, out, err = run_main("fit", *args, "--ckpt_path", "last", cwd=tmp_path / "run")
    assert status == 0 and "nothing to train" in err, err[-2000:]
    assert "Training curves" not in out + err
    status, out, err = run_main("fit", *args[:-1], "3", "--ckpt_path", "last", cwd=tmp_path / "run")
    assert status == 0, err[-2000:]
    (line,) = [line for line in out.splitlines() if line.startswith("Training curves: ")]
    assert Path(line.removeprefix("Training curves: ")).is_file()
