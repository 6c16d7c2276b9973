"""mnist_lit/plain.py, the recipe in one file of plain Lightning: it runs, and the project extends it."""

from __future__ import annotations

import ast
import subprocess
import sys

import torch
from helpers.cli import ROOT, cli_env
from helpers.mnist import write_mnist

from mnist_lit import model, plain


def test_its_net_is_the_projects_net_layer_for_layer():
    shapes = {name: p.shape for name, p in plain.Net().named_parameters()}
    assert shapes == {name: p.shape for name, p in model.Net().named_parameters()}
    assert [type(m) for m in plain.Net().children()] == [type(m) for m in model.Net().children()]
    state = model.Net().state_dict()  # the project's weights load into it, and give the same outputs
    net = plain.Net()
    net.load_state_dict(state)
    reference = model.Net()
    reference.load_state_dict(state)
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(net.eval()(x), reference.eval()(x))


def test_it_imports_nothing_of_the_project():
    tree = ast.parse((ROOT / "mnist_lit" / "plain.py").read_text())
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [name for name in imported if name.split(".")[0] == "mnist_lit"], imported
    assert len((ROOT / "mnist_lit" / "plain.py").read_text().splitlines()) <= 170  # the README says so


def test_it_reads_the_four_files_where_the_rest_of_the_project_keeps_them_or_says_in_one_line_they_are_missing(
    tmp_path,
):
    """Straight in data_dir, compressed (the README's offline advice): decompressed for torchvision, nothing
    downloaded. Nowhere, offline: one line and a non-zero exit, no empty MNIST/raw left behind."""
    write_mnist(tmp_path / "flat")
    args = ["--default_root_dir", str(tmp_path / "run"), "--max_steps", "2", "--num_workers", "0", "--val_size", "64"]
    assert set(plain.main(["--data_dir", str(tmp_path / "flat"), *args])) == {"test/loss", "test/acc"}
    (tmp_path / "empty").mkdir()
    offline = {**cli_env(), "https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"}  # refused
    result = subprocess.run([sys.executable, "-m", "mnist_lit.plain", "--data_dir", str(tmp_path / "empty"), *args],
                            env=offline, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: no MNIST in {tmp_path / 'empty'} (Error down")
    assert list((tmp_path / "empty").iterdir()) == []


def test_it_trains_checkpoints_and_tests_on_synthetic_files(tmp_path):
    write_mnist(tmp_path / "data" / "MNIST" / "raw", gz=False)  # where torchvision looks: nothing is downloaded
    args = ["--data_dir", str(tmp_path / "data"), "--default_root_dir", str(tmp_path / "run"), "--max_steps", "12"]
    results = plain.main([*args, "--num_workers", "0", "--val_size", "64"])
    assert set(results) == {"test/loss", "test/acc"} and 0 <= results["test/acc"] <= 1
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    # Plain Lightning saves every 10 steps and not when the run stops: steps 11 and 12 are in no file. Saving at the
    # stop (and on Ctrl-C) is one of the things mnist_lit/checkpoints/callback.py adds.
    assert checkpoint["global_step"] == 10 and checkpoint["hyper_parameters"] == {"lr": 0.01, "momentum": 0.5}
    assert (tmp_path / "run" / "checkpoints" / "epoch=1-step=10.ckpt").is_file()  # every 10 steps (9 an epoch)
    assert checkpoint["optimizer_states"][0]["param_groups"][0]["momentum"] == 0.5
