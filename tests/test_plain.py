"""mnist_lit/plain.py, the recipe in one file of plain Lightning: it runs, and the project extends it."""

from __future__ import annotations

import ast

import torch
from conftest import ROOT, write_mnist

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
    assert len((ROOT / "mnist_lit" / "plain.py").read_text().splitlines()) <= 150


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
