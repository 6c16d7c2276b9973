"""The model: the guide's Net, layer for layer, and the LightningModule around it."""

from __future__ import annotations

import re

import pytest
import torch
from helpers.guide import Net as GuideNet

from mnist_lit.cli import check_optimizer
from mnist_lit.model import LitMNIST, Net

GUIDE_KEYS = [f"{layer}.{p}" for layer in ("conv1", "conv2", "fc1", "fc2") for p in ("weight", "bias")]


def test_net_has_the_guides_layers_shapes_and_parameter_count():
    net = Net()
    assert sum(p.numel() for p in net.parameters()) == 21_840
    assert list(net.state_dict()) == GUIDE_KEYS
    assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == {
        k: tuple(v.shape) for k, v in GuideNet().state_dict().items()
    }
    assert isinstance(net.conv2_drop, torch.nn.Dropout2d)


def test_output_is_log_probabilities_of_ten_classes():
    out = Net().eval()(torch.randn(7, 1, 28, 28))
    assert out.shape == (7, 10)
    torch.testing.assert_close(out.exp().sum(1), torch.ones(7))


def test_state_dict_interchangeable_with_the_guides_net_both_ways():
    torch.manual_seed(0)
    guide, ours = GuideNet().eval(), LitMNIST().eval()
    ours.net.load_state_dict(guide.state_dict(), strict=True)
    x = torch.randn(16, 1, 28, 28)
    torch.testing.assert_close(ours(x), guide(x), rtol=1e-5, atol=1e-5)
    other = GuideNet().eval()
    other.load_state_dict(ours.net.state_dict(), strict=True)
    torch.testing.assert_close(other(x), guide(x), rtol=0, atol=0)


def test_channels_last_changes_layout_not_results():
    torch.manual_seed(0)
    fast, plain = LitMNIST(channels_last=True).eval(), LitMNIST(channels_last=False).eval()
    plain.load_state_dict(fast.state_dict())
    x = torch.randn(32, 1, 28, 28)
    torch.testing.assert_close(fast(x), plain(x), rtol=1e-5, atol=1e-5)
    assert fast.net.conv1.weight.is_contiguous(memory_format=torch.channels_last)


def test_optimizer_is_the_guides_fused_sgd_unless_another_is_given():
    optimizer = LitMNIST().configure_optimizers()
    assert type(optimizer) is torch.optim.SGD
    group = optimizer.param_groups[0]
    assert (group["lr"], group["momentum"], group["nesterov"], group["fused"]) == (0.01, 0.5, False, True)
    adam = LitMNIST(optimizer={"class_path": "torch.optim.Adam", "init_args": {"lr": 0.003}}).configure_optimizers()
    assert type(adam) is torch.optim.Adam and adam.defaults["lr"] == 0.003


def test_frozen_parameters_stay_out_of_the_optimizer():
    model = LitMNIST()
    model.net.conv1.requires_grad_(False)
    optimized = {id(p) for group in model.configure_optimizers().param_groups for p in group["params"]}
    assert id(model.net.conv1.weight) not in optimized and id(model.net.conv1.bias) not in optimized
    assert id(model.net.fc1.weight) in optimized and len(optimized) == 6


def test_bad_optimizer_options_are_refused_before_the_model_is_built():
    """The command line tries the optimizer's options on a probe (mnist_lit.cli.probes) before LitMNIST is built."""
    for init_args, words in (
        ({"lr": -1.0}, "Invalid learning rate"),
        ({"lr": 0.0}, "--model.optimizer.lr: 0.0 is out of range"),
        ({"lr": float("inf")}, "--model.optimizer.lr: inf"),
        ({"lr": 0.1, "momentum": 1.5}, "--model.optimizer.momentum: 1.5 is out of range"),
    ):
        with pytest.raises(ValueError, match=re.escape(words)):
            check_optimizer({"class_path": "torch.optim.SGD", "init_args": init_args})
