"""Your own network by class path: trained from the command line and from YAML, then tested, predicted, exported,
served and resumed from its checkpoint with no option repeated; and a checkpoint naming a network is rebuilt only
by the trust rules."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.checkpoints import reseal, spec
from helpers.cli import KILLPOINTS, QUIET, ROOT, SYNTHETIC, assert_clean_error, cli_env, run_cli

from mnist_lit import runs
from mnist_lit.errors import CheckpointError
from mnist_lit.model import BatchNormNet, ConvNet, LitMNIST, Net, check_contract

TINY = ["--model.net", "helpers.tinynet.TinyNet", "--model.net.width", "3"]


def data_args(mnist_dir: Path) -> list[str]:
    return ["--data.data_dir", str(mnist_dir), *SYNTHETIC, *QUIET]


@pytest.fixture
def trusting(monkeypatch):
    """What a user of their own network sets once: MNIST_LIT_TRUST names its module (tests/ is on the path)."""
    monkeypatch.setenv("MNIST_LIT_TRUST", "helpers.tinynet")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, mnist_dir) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    env = {**cli_env(), "PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{cli_env()['PYTHONPATH']}"}
    command = [sys.executable, "-m", "mnist_lit", "fit", *TINY, *data_args(mnist_dir), "--trainer.max_epochs", "1"]
    import subprocess

    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return root


@pytest.mark.slow  # whole runs: in the slow suite, so the default one stays under 4 minutes
def test_the_nets_own_checkpoint_tests_predicts_and_exports_with_no_option_repeated(
    tiny_run, tmp_path, mnist_dir, run_main, trusting
):
    root = tmp_path / "run"
    shutil.copytree(tiny_run, root)
    status, out, err = run_main("test", "--ckpt_path", "last", *data_args(mnist_dir), cwd=root)
    assert status == 0 and "test/acc" in out, err[-2000:]
    from helpers.images import digit

    digit().save(tmp_path / "seven.png")
    status, out, err = run_main("predict", "--ckpt_path", "last", "--data.predict_path", str(tmp_path / "seven.png"),
                                *data_args(mnist_dir), cwd=root)  # fmt: skip
    assert status == 0 and out.count("\t") == 2, err[-2000:]
    status, out, err = run_main("export", "--ckpt_path", "last", "--output", "tiny.onnx", cwd=root)
    assert status == 0, err[-2000:]
    import onnxruntime

    model = LitMNIST.load_from_checkpoint(root / "checkpoints" / "last.ckpt").eval()
    assert type(model.net).__name__ == "TinyNet" and model.net.conv.out_channels == 3
    images = torch.randn(4, 1, 28, 28)
    session = onnxruntime.InferenceSession(str(root / "tiny.onnx"), providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(None, {"image": images.numpy()})
    with torch.inference_mode():
        expected = model(images).numpy()  # log-probabilities: the logits the net gives, log_softmax applied
    np.testing.assert_allclose(onnx_out, expected, atol=1e-5)
    status, out, err = run_main("export", "--ckpt_path", "last", "--output", "tiny.pth", cwd=root)
    assert status == 0 and "init_args" in out, err[-2000:]
    from mnist_lit.serve import load_net

    served, dataset, _ = load_net(str(root / "tiny.pth"))
    assert type(served).__name__ == "TinyNet" and dataset == "mnist"
    torch.testing.assert_close(served.state_dict(), {k: v.contiguous() for k, v in model.net.state_dict().items()})


def test_from_yaml_and_a_resume_takes_the_net_from_the_checkpoint(tmp_path, mnist_dir, run_main, trusting):
    (tmp_path / "tiny.yaml").write_text(
        "model:\n  net:\n    class_path: helpers.tinynet.TinyNet\n    init_args:\n      width: 2\n"
    )
    fit = ["fit", *data_args(mnist_dir), "--trainer.max_steps", "4"]
    status, _, err = run_main(*fit, "--config", "tiny.yaml", cwd=tmp_path)
    assert status == 0, err[-2000:]
    status, _, err = run_main(*fit[:-1], "7", "--ckpt_path", "last", cwd=tmp_path)  # no --config, no --model.net
    assert status == 0, err[-2000:]
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 7 and checkpoint["state_dict"]["net.conv.weight"].shape[0] == 2
    status, _, err = run_main(*fit[:-1], "9", "--ckpt_path", "last", "--model.net", "mnist_lit.model.Net", cwd=tmp_path)
    assert status != 0 and "--model.net cannot change when resuming" in err, err[-2000:]


def test_without_trust_a_checkpoint_naming_a_users_module_is_refused_and_nothing_imported(
    tiny_run, tmp_path, mnist_dir, run_main
):
    sys.modules.pop("helpers.tinynet", None)
    status, _, err = run_main("test", "--ckpt_path", str(tiny_run / "checkpoints" / "last.ckpt"),
                              *data_args(mnist_dir), cwd=tmp_path)  # fmt: skip
    assert status != 0 and "helpers.tinynet.TinyNet was not imported: a file may name classes of" in err, err[-2000:]
    assert "MNIST_LIT_TRUST" in err and "helpers.tinynet" not in sys.modules


# A checkpoint's network spec, each refused in one line with nothing run and nothing imported.
HOSTILE_NETS = {
    "os.system": (spec("os.system", command="touch MARKER"), "os.system"),
    "subprocess.Popen": (spec("subprocess.Popen", args=["touch", "MARKER"]), "subprocess.Popen"),
    "builtins.exec": (spec("builtins.exec", source="open('MARKER', 'w')"), "builtins.exec"),
    "a function of an allowed module": (spec("torch.nn.functional.relu"), "is not a torch.nn.Module"),
    "a class that is not a Module": (spec("torch.nn.Parameter"), "is not a torch.nn.Module"),
    "an importable module that is not allowed": (spec("this.Zen"), "this.Zen"),
    "arguments that would take all memory": (
        spec("torch.nn.Linear", in_features=10**6, out_features=10**6),
        "over the limit",
    ),
    "a kernel of a million pixels": (
        spec("torch.nn.Conv2d", in_channels=1, out_channels=99, kernel_size=10**5),
        "over the limit",
    ),
    "a width of 0 for a ranged width": (
        spec("mnist_lit.model.BatchNormNet", width=0),
        "--model.net.width: 0 is out of range; it must be > 0",
    ),
    "a container of modules named by a file": (spec("torch.nn.Sequential", args=["os.system"]), "no argument"),
    "a layer whose output would take all memory": (spec("torch.nn.Upsample", scale_factor=1000.0), "over the limit"),
}

# Legal torch layers with one large number in their arguments: small in weights, huge when run (each took GBs and
# up to a minute before the contract check refused it), or slow to build even on the meta device.
BOUNDED_NETS = {
    "an upsampling by 1000": (spec("torch.nn.Upsample", scale_factor=1000.0), "(Upsample) gives 1,568,000,000 numbers"),
    "a padding of 10,000": (spec("torch.nn.ZeroPad2d", padding=10000), "(ZeroPad2d) gives 802,241,568 numbers"),
    "a transposed convolution's stride": (
        spec("torch.nn.ConvTranspose2d", in_channels=1, out_channels=1, kernel_size=3, stride=1000),
        "(ConvTranspose2d) gives 1,458,324,018 numbers",
    ),
    "a million transformer blocks": (
        spec(
            "torchvision.models.VisionTransformer",
            image_size=28,
            patch_size=4,
            num_layers=10**6,
            num_heads=1,
            hidden_dim=4,
            mlp_dim=4,
        ),
        "makes over 10,000 layers",
    ),
    "34 billion operations for 2 images": (
        spec("torch.nn.Conv2d", in_channels=1, out_channels=15000, kernel_size=27, padding=13),
        "operations for a batch of 2 images, over the limit of 20,000,000,000",
    ),
    "the ConvNet of configs/convnet.yaml": (spec("mnist_lit.model.ConvNet", width=32), None),  # passes
}


@pytest.mark.parametrize("case", list(BOUNDED_NETS))
def test_a_networks_forward_pass_is_sized_on_the_meta_device_before_it_runs(case):
    from mnist_lit.errors import Untrusted
    from mnist_lit.trust import check_spec

    value, words = BOUNDED_NETS[case]
    start = time.monotonic()
    if words is None:
        check_spec("net", value)
    else:
        with pytest.raises(Untrusted, match=re.escape(words)):
            check_spec("net", value, trusted=("torchvision",))
    assert time.monotonic() - start < 30


# A network's ranged numbers (jsonargparse's PositiveInt and the like) set by a file: refused as the command line
# refuses them, before the class is built (where torch would warn, or pass a nan by).
OUT_OF_RANGE = {
    "width 0": ({"width": 0}, "--model.net.width: 0 is out of range; it must be > 0"),
    "width -3": ({"width": -3}, "--model.net.width: -3 is out of range; it must be > 0"),
    "width 1.5": ({"width": 1.5}, "--model.net.width: 1.5 is not valid; it takes an int"),
    "width true": ({"width": True}, "--model.net.width: True is not valid; it takes an int"),
    "width null": ({"width": None}, "--model.net.width: None is not valid; it takes an int"),
    "hidden 0": ({"hidden": 0}, "--model.net.hidden: 0 is out of range; it must be > 0"),
    "dropout nan": ({"dropout": float("nan")}, "--model.net.dropout: nan is out of range; it must be >= 0 and <= 1"),
    "dropout -0.1": ({"dropout": -0.1}, "--model.net.dropout: -0.1 is out of range"),
    "dropout an int past any float": ({"dropout": 10**400}, "is out of range; it is too large for a float"),
    "dropout 1": ({"dropout": 1.0}, "a dropout of 1 zeroes every input of the linear layer, which then never learns"),
}


@pytest.mark.parametrize("case", list(OUT_OF_RANGE))
def test_a_files_number_out_of_a_networks_range_is_refused_as_on_the_command_line_with_no_warning(case, recwarn):
    from mnist_lit.errors import Untrusted
    from mnist_lit.trust import check_spec

    init_args, words = OUT_OF_RANGE[case]
    net = "mnist_lit.model.ConvNet" if "dropout" in init_args else "mnist_lit.model.BatchNormNet"
    with pytest.raises(Untrusted, match=re.escape(words)):
        check_spec("net", spec(net, **init_args))
    assert not recwarn.list, [str(w.message) for w in recwarn.list]


def test_a_config_files_width_of_0_is_one_line_and_no_warning(tmp_path, mnist_dir):
    (tmp_path / "my.yaml").write_text("model:\n  net:\n    class_path: mnist_lit.model.BatchNormNet\n"
                                      "    init_args: {width: 0}\n")  # fmt: skip
    result = run_cli("fit", "--config", "my.yaml", *data_args(mnist_dir), cwd=tmp_path)
    assert_clean_error(result, "--config my.yaml: --model.net.width: 0 is out of range; it must be > 0")
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my.yaml"]  # refused before anything was written


@pytest.mark.parametrize("case", list(HOSTILE_NETS))
def test_a_checkpoint_naming_a_hostile_network_is_refused_before_anything_is_imported_or_built(
    case, trained_run, tmp_path, mnist_dir, run_main
):
    value, words = HOSTILE_NETS[case]
    value = {**value, "init_args": {k: str(v).replace("MARKER", str(tmp_path / "PWNED")) if isinstance(v, str) else v
                                    for k, v in value["init_args"].items()}}  # fmt: skip
    hostile = reseal(trained_run / "checkpoints" / "last.ckpt", tmp_path / "hostile.ckpt",
                     lambda c: c["hyper_parameters"].__setitem__("net", value))  # fmt: skip
    for command in (["test", *data_args(mnist_dir)], ["export", "--output", "out.onnx"], ["serve"]):
        status, _, err = run_main(command[0], "--ckpt_path", str(hostile), *command[1:], cwd=tmp_path)
        assert status != 0 and "refusing to load" in err and words in err, (command, err[-2000:])
    with pytest.raises(CheckpointError, match="refusing to load"):
        runs.load(hostile).model()  # a user's own code
    assert not (tmp_path / "PWNED").exists() and "this" not in sys.modules


def test_the_contract_is_checked_once_early_in_one_line(tmp_path, mnist_dir, run_main):
    check_contract(Net())
    check_contract(ConvNet())
    check_contract(BatchNormNet())
    with pytest.raises(
        ValueError, match=r"gives \(2, 784\) for a batch of 2 images of 1x28x28; it must give \(2, 10\)"
    ):
        check_contract(torch.nn.Flatten())
    status, _, err = run_main("fit", "--model.net", "torch.nn.Flatten", *data_args(mnist_dir), cwd=tmp_path)
    assert_clean_error(subprocess.CompletedProcess([], status, "", err), "--model.net Flatten: gives (2, 784)")
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_log_softmax_is_applied_to_logits_and_never_again_to_the_nets_log_probabilities():
    from mnist_lit.model import log_probabilities

    x = torch.randn(3, 10)
    assert torch.equal(log_probabilities(Net(), x), x)  # the guide's numbers, bit for bit
    assert torch.allclose(log_probabilities(ConvNet(), x).exp().sum(1), torch.ones(3))
    assert torch.allclose(log_probabilities(BatchNormNet(), x).exp().sum(1), torch.ones(3))
    model = LitMNIST(net={"class_path": "mnist_lit.model.ConvNet", "init_args": {"width": 4}}, freeze=("block1",))
    assert model.hparams["net"]["init_args"] == {"width": 4}
    assert not any(p.requires_grad for p in model.net.block1.parameters())
    with pytest.raises(ValueError, match="conv1 is not a layer of the ConvNet; it has block1, block2, fc"):
        LitMNIST(net={"class_path": "mnist_lit.model.ConvNet"}, freeze=("conv1",))


@pytest.mark.slow  # a server, and three runs
def test_a_users_network_serves_and_resumes_bit_for_bit(tiny_run, tmp_path, mnist_dir, monkeypatch):
    from helpers.checkpoints import assert_same_run
    from helpers.images import mnist_digits, png
    from helpers.server import Server

    monkeypatch.setenv("MNIST_LIT_TRUST", "helpers.tinynet")
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "tests"))  # where a user's own package would be installed
    server = Server(tiny_run, "--ckpt_path", "last")
    try:
        status, answer = server.predict(png(mnist_digits(mnist_dir, 1)[0]))
        assert status == 200 and sum(answer["probabilities"]) == pytest.approx(1, abs=1e-5), answer
    finally:
        server.stop()
    fit = ["fit", *TINY, *data_args(mnist_dir), "--trainer.max_epochs", "2", "--checkpoint.every_n_train_steps", "3"]
    (tmp_path / "whole").mkdir()
    assert run_cli(*fit, cwd=tmp_path / "whole").returncode == 0
    (tmp_path / "killed").mkdir()
    killed = run_cli("step", "11", *fit, cwd=tmp_path / "killed", script=KILLPOINTS)
    assert killed.returncode != 0
    resumed = run_cli(fit[0], *fit[5:], "--ckpt_path", "last", cwd=tmp_path / "killed")  # no --model.net
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_run(tmp_path / "whole", tmp_path / "killed")


@pytest.mark.slow  # 5 epochs of the 24-channel ConvNet on the real files: about 3 minutes here
def test_the_built_in_convnet_with_its_config_reaches_99_5_percent(tmp_path, real_mnist):
    """What the README promises, on any machine: another processor moves a run as another seed does, and seeds 1-3
    gave 99.58, 99.56 and 99.59% on an AMD EPYC, the lowest 6 test images above the bar (seed 1, run here: 8)."""
    from helpers.cli import printed_metrics

    data = ["--data.data_dir", str(real_mnist), *QUIET]
    fit = run_cli("fit", "--config", str(ROOT / "configs" / "convnet.yaml"), *data, cwd=tmp_path, timeout=2400)
    assert fit.returncode == 0, fit.stderr[-2000:]
    test = run_cli("test", "--ckpt_path", "last", *data, cwd=tmp_path)  # the network comes with the checkpoint
    assert test.returncode == 0, test.stderr[-2000:]
    accuracy = printed_metrics(test.stdout)["test/acc"]
    print(f"ConvNet, configs/convnet.yaml: test/acc {accuracy:.4f}")
    assert accuracy >= 0.995, test.stdout[-2000:]


@pytest.mark.slow  # one epoch, then six, of BatchNormNet on the real files: about a minute here
@pytest.mark.parametrize(("config", "bar"), [("bn99", 0.989), ("bn995", 0.994)])
def test_batchnormnet_with_its_configs_reaches_99_and_99_5_percent(tmp_path, real_mnist, config, bar):
    """What the README promises, on any machine: another processor moves a run as another seed does. Seeds 1-3 gave
    99.11, 99.25 and 99.18% with configs/bn99.yaml, 99.58, 99.58 and 99.52% with configs/bn995.yaml (seed 1 runs
    here), on an AMD EPYC; the bars leave one seed's room below the promised mean."""
    from helpers.cli import printed_metrics

    data = ["--data.data_dir", str(real_mnist), *QUIET]
    fit = run_cli("fit", "--config", str(ROOT / "configs" / f"{config}.yaml"), *data, cwd=tmp_path, timeout=1200)
    assert fit.returncode == 0, fit.stderr[-2000:]
    test = run_cli("test", "--ckpt_path", "last", *data, cwd=tmp_path)  # the network comes with the checkpoint
    assert test.returncode == 0, test.stderr[-2000:]
    accuracy = printed_metrics(test.stdout)["test/acc"]
    print(f"BatchNormNet, configs/{config}.yaml: test/acc {accuracy:.4f}")
    assert accuracy >= bar, test.stdout[-2000:]
