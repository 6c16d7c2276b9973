"""End to end on the real MNIST files (../shared/mnist): slow, run with `python -m pytest -m slow`."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from helpers.cli import QUIET, ROOT, printed_metrics, run_cli
from helpers.mnist import guide_evaluation
from PIL import Image, ImageFilter

from mnist_lit.datasets.idx import parse_idx, read_idx

pytestmark = pytest.mark.slow


def test_300_batches_then_test_in_another_process(tmp_path, real_mnist):
    data = ["--data.data_dir", str(real_mnist), *QUIET]
    fit = run_cli("fit", *data, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "300", cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr[-2000:]
    test = run_cli("test", "--ckpt_path", "last", *data, cwd=tmp_path)
    assert test.returncode == 0, test.stderr[-2000:]
    metrics = printed_metrics(test.stdout)
    assert metrics["test/acc"] >= 0.75  # random weights score 0.10
    # the net.* weights load strictly into the guide's own Net, and its own test code gives the printed numbers
    acc, loss = guide_evaluation(tmp_path / "checkpoints" / "last.ckpt", real_mnist, verify=True)
    assert metrics["test/acc"] == pytest.approx(acc, abs=1e-6)
    assert metrics["test/loss"] == pytest.approx(loss, rel=1e-5)


# The default recipe's test accuracy, seed 1, on every machine of this kind. A processor with other float kernels
# takes another path from the first step, as another seed does: seeds 1-3 gave 98.57, 98.32 and 98.68% on an AMD EPYC,
# seed 1 gave 98.53% on an Intel Xeon. The bar is 0.32 points under the lowest of them (32 test images).
DEFAULT_RECIPE_BAR = 0.980


def test_the_guides_recipe_for_ten_epochs_reaches_its_accuracy(tmp_path, real_mnist):
    data = ["--data.data_dir", str(real_mnist), *QUIET]
    fit = run_cli("fit", *data, cwd=tmp_path, timeout=1200)
    assert fit.returncode == 0, fit.stderr[-2000:]
    test = run_cli("test", "--ckpt_path", "last", *data, cwd=tmp_path)
    accuracy = printed_metrics(test.stdout)["test/acc"]
    print(f"the default recipe, seed 1: test/acc {accuracy:.4f}")
    assert accuracy >= DEFAULT_RECIPE_BAR, test.stdout[-2000:]


def test_the_guides_net_with_configs_net99_reaches_99_percent(tmp_path, real_mnist):
    """What configs/net99.yaml promises: seeds 1-3 gave 99.14, 99.04 and 99.10% on an AMD EPYC (mean 99.09%). One
    run on another processor moves as another seed does, so one seed's bar here is 98.9%."""
    data = ["--data.data_dir", str(real_mnist), *QUIET]
    fit = run_cli("fit", "--config", str(ROOT / "configs" / "net99.yaml"), *data, cwd=tmp_path, timeout=1200)
    assert fit.returncode == 0, fit.stderr[-2000:]
    test = run_cli("test", "--ckpt_path", "last", *data, cwd=tmp_path)
    accuracy = printed_metrics(test.stdout)["test/acc"]
    print(f"the guide's Net, configs/net99.yaml, seed 1: test/acc {accuracy:.4f}")
    assert accuracy >= 0.989, test.stdout[-2000:]


def scan(image: Image.Image, seed: int) -> Image.Image:
    """A re-drawing of an MNIST digit as a scan: dark ink on light grey paper, 4x larger, off-centre, noisy."""
    generator = torch.Generator().manual_seed(seed)
    big = image.resize((112, 112), Image.Resampling.BICUBIC)
    page = Image.new("L", (240, 180), 230)
    x, y = (int(v) for v in torch.randint(5, 60, (2,), generator=generator))
    page.paste(Image.new("L", big.size, 0), (x + 60, y), mask=big)
    page = page.filter(ImageFilter.GaussianBlur(0.8))
    pixels = torch.frombuffer(bytearray(page.tobytes()), dtype=torch.uint8).view(180, 240).int()
    pixels = (pixels + torch.randint(-12, 12, pixels.shape, generator=generator)).clamp(0, 255).to(torch.uint8)
    return Image.frombytes("L", (240, 180), pixels.numpy().tobytes()).convert("RGB")


@pytest.fixture(scope="module")
def one_epoch_model(tmp_path_factory, real_mnist):
    """The guide's loop for one epoch: all 60k training images."""
    root = tmp_path_factory.mktemp("one-epoch")
    args = ["fit", "--data.data_dir", str(real_mnist), *QUIET, "--trainer.max_epochs", "1", "--data.val_size", "0"]
    result = run_cli(*args, cwd=root)
    assert result.returncode == 0, result.stderr[-2000:]
    return root


def test_predict_on_png_digits_as_stored_and_as_scans(one_epoch_model, real_mnist, tmp_path):
    images = parse_idx(read_idx(real_mnist / "t10k-images-idx3-ubyte.gz", True), Path("t10k"), 2051)
    labels = parse_idx(read_idx(real_mnist / "t10k-labels-idx1-ubyte.gz", True), Path("t10k"), 2049)
    for folder in ("stored", "scan"):
        (tmp_path / folder).mkdir()
    truth = {}
    for i in range(0, 10_000, 10):  # 1000 digits from all over the test set
        digit = Image.frombytes("L", (28, 28), images[i].numpy().tobytes())
        name = f"{i:05d}.png"
        digit.save(tmp_path / "stored" / name)
        scan(digit, i).save(tmp_path / "scan" / name)
        truth[name] = int(labels[i])
    accuracy = {}
    for folder in ("stored", "scan"):
        result = run_cli("predict", "--ckpt_path", "last", "--data.predict_path", str(tmp_path / folder), *QUIET,
                         cwd=one_epoch_model)  # fmt: skip
        assert result.returncode == 0, result.stderr[-2000:]
        lines = [line.split("\t") for line in result.stdout.splitlines() if line.count("\t") == 2]
        assert len(lines) == 1000
        accuracy[folder] = sum(int(d) == truth[Path(p).name] for p, d, _ in lines) / len(lines)
    assert accuracy["stored"] >= 0.93, accuracy
    assert accuracy["scan"] >= 0.85, accuracy
    shutil.rmtree(tmp_path / "scan")
