"""mnist_lit's own subcommands (mnist_lit.cli.commands) and the command line's words before parsing
(mnist_lit.cli.options): parse-only checks, in process, no training."""

from __future__ import annotations

import inspect

import pytest
import torch
from helpers.cli import ROOT

from mnist_lit import COMMANDS, LIGHTNING_COMMANDS, USAGE
from mnist_lit.cli import commands, options
from mnist_lit.errors import ConfigError


def test_the_commands_are_listed_in_one_place():
    assert set(COMMANDS) == {*LIGHTNING_COMMANDS, *commands.ENTRIES, "sweep"}
    assert all(f"  {name} " in USAGE for name in COMMANDS)


@pytest.mark.parametrize("command", list(commands.ENTRIES))
def test_each_commands_options_and_help_come_from_its_signature(command, tmp_path, run_main):
    status, out, _ = run_main(command, "--help", cwd=tmp_path)
    assert status == 0
    for name in inspect.signature(commands.ENTRIES[command]).parameters:
        option = "--trainer.default_root_dir" if name == "default_root_dir" else f"--{name}"
        assert option in out, out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["export", "--ckpt_path", "last"], "error: the following options are required: --output (see --help)"),
        (
            ["serve", "--port", "x"],
            "error: --port: 'x' is not valid; it takes an int >= 1024 and <= 65535 (see --help)",
        ),
        (["serve", "--ckpt_path", "last", "--workers", "0"], "error: --workers: 0 is out of range; it must be > 0"),
        (["serve", "--colour", "red"], "error: unrecognized arguments: --colour red (see --help)"),
        (["serve", "--prot", "9000"], "error: unrecognized arguments: --prot 9000; did you mean --port? (see --help)"),
        (["export", "--outptu", "m.pth"], "error: unrecognized arguments: --outptu m.pth; did you mean --output?"),
        (["export", "--out", "m"], "error: unrecognized arguments: --out m; did you mean --output?"),
        (["serve", "--work", "0"], "error: unrecognized arguments: --work 0; did you mean --workers?"),
    ],
)
def test_a_bad_option_of_an_own_command_is_one_line(args, message, tmp_path, run_main):
    status, _, err = run_main(*args, cwd=tmp_path)
    assert status != 0 and err.strip().splitlines() == [message.removesuffix(" (see --help)") + " (see --help)"], err


def test_a_config_after_the_options_it_overrides_says_so_in_one_line(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("trainer:\n  max_epochs: 5\nmodel:\n  optimizer:\n    init_args:\n      lr: 0.1\n")
    args = ["fit", "--trainer.max_epochs", "3", "--model.lr", "0.2", "--data.batch_size", "8", "--config", str(config)]
    assert options.checked_args(args)[3] == "--model.optimizer.lr"  # the old name, renamed
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        f"warning: --config {config} comes after --trainer.max_epochs, --model.optimizer.lr and sets them again, so"
        " the file's values are used: put --config first for the options to win"
    ]
    # first: the option wins, silently
    options.checked_args(["fit", "--config", str(config), "--trainer.max_epochs", "3"])
    assert capsys.readouterr().err == ""


def test_a_config_that_is_not_yaml_is_named_by_file_and_line(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("trainer:\n  max_epochs: [5\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: line 3, column 1: not valid YAML"):
        options.checked_args(["fit", "--config", str(config)])


def test_where_an_option_was_set_is_the_last_word_that_sets_it(tmp_path):
    config = tmp_path / "gpu.yaml"
    config.write_text("trainer:\n  accelerator: gpu\n")
    assert options.origin(["fit"], "trainer.accelerator") is None
    assert options.origin(["fit", "--config", str(config)], "trainer.accelerator") == f"--config {config}"
    given = ["fit", "--config", str(config), "--trainer.accelerator=cuda"]
    assert options.origin(given, "trainer.accelerator") == "--trainer.accelerator cuda"


@pytest.mark.skipif(torch.cuda.is_available() or torch.backends.mps.is_available(), reason="this machine has a GPU")
def test_the_gpu_config_without_a_gpu_is_one_line_naming_the_file_and_the_fix(tmp_path, mnist_dir, run_main):
    gpu = ROOT / "configs" / "gpu.yaml"
    status, _, err = run_main("fit", "--data.data_dir", str(mnist_dir), "--config", str(gpu), cwd=tmp_path)
    assert status != 0 and err.strip().splitlines() == [
        f"error: {gpu} needs a GPU (CUDA or Apple MPS); this machine has none: use configs/cpu.yaml instead, or add"
        " --trainer.accelerator cpu after it (see --help)"
    ], err
    assert list(tmp_path.iterdir()) == []  # nothing left behind
    status, _, err = run_main("fit", "--data.data_dir", str(mnist_dir), "--trainer.accelerator", "cuda", cwd=tmp_path)
    assert err.strip().endswith(
        "error: --trainer.accelerator cuda needs a CUDA GPU; this machine has none: drop it, or pass"
        " --trainer.accelerator cpu (see --help)"
    ), err


def test_fit_help_is_readable_and_its_texts_mean_what_mnist_lit_does(tmp_path, run_main):
    status, out, _ = run_main("fit", "--help", cwd=tmp_path)
    assert status == 0
    lines = out.splitlines()
    assert len(lines) < 700, len(lines)  # 1,346 when every importable nn.Module was listed
    assert "torch.nn.Identity" not in out and "importable now, any of them by" in out
    ckpt = out[out.index("  --ckpt_path CKPT_PATH") :].split("\n  --")[0]
    assert "'last': the newest checkpoint" in ckpt and "registry" not in ckpt and "hpc" not in ckpt, ckpt
    assert "Not taken" in out[out.index("  --weights_only") :], out[-1000:]
    assert "torch.optim.lr_scheduler.StepLR" in out  # a list short enough to read is kept


def test_weights_only_false_is_refused_in_one_line(tmp_path, run_main):
    status, _, err = run_main("fit", "--weights_only", "false", cwd=tmp_path)
    assert status == 1 and err.strip() == (
        "error: --weights_only false: mnist_lit reads every checkpoint as data (weights only); leave it out"
        " (see --help)"
    ), err


def test_the_resume_hint_is_the_command_typed_less_its_checkpoint_and_init_from():
    from mnist_lit.cli.options import resume_command

    typed = ["fit", "--config", "my runs/a.yaml", "--model.init_from=base/last.ckpt", "--ckpt_path", "auto"]
    assert resume_command(typed) == "python -m mnist_lit fit --config 'my runs/a.yaml' --ckpt_path last"
    assert resume_command(["fit", "--model.init_from", "x", "--trainer.max_epochs", "3"]) == (
        "python -m mnist_lit fit --trainer.max_epochs 3 --ckpt_path last"
    )


@pytest.mark.parametrize(
    "scheduler",
    [
        {"class_path": "torch.optim.lr_scheduler.OneCycleLR", "init_args": {"max_lr": 0.1, "total_steps": 2}},
        {"class_path": "torch.optim.lr_scheduler.OneCycleLR",
         "init_args": {"max_lr": 0.1, "epochs": 1, "steps_per_epoch": 1}},
        {"class_path": "torch.optim.lr_scheduler.StepLR", "init_args": {"step_size": 1}},
    ],
)  # fmt: skip
def test_the_schedule_probe_takes_what_a_run_takes(scheduler):
    from mnist_lit.cli import check_scheduler
    from mnist_lit.model import GUIDE_SGD

    check_scheduler(GUIDE_SGD, scheduler)
    if scheduler["class_path"].endswith("StepLR"):  # LBFGS's step takes a closure
        check_scheduler({"class_path": "torch.optim.LBFGS", "init_args": {}}, scheduler)


@pytest.mark.parametrize("command", ["fit", "sweep"])
def test_a_config_that_is_a_folder_or_holds_a_bad_date_is_one_line(command, tmp_path, run_main):
    (tmp_path / "folder.yaml").mkdir()
    (tmp_path / "date.yaml").write_text("trainer:\n  max_epochs: 2001-13-01\n")
    for name, needle in (("folder.yaml", "Is a directory"), ("date.yaml", "not valid YAML (month must be in 1..12)")):
        status, _, err = run_main(command, "--config", str(tmp_path / name), cwd=tmp_path)
        assert status == 1 and len(err.strip().splitlines()) == 1, err
        assert f"--config {tmp_path / name}: {needle}" in err, err


def test_a_typo_in_a_config_file_is_named_with_its_file_and_what_was_meant(tmp_path, run_main):
    (tmp_path / "my.yaml").write_text("trainer:\n  max_epoch: 3\n")
    status, _, err = run_main("fit", "--config", str(tmp_path / "my.yaml"), cwd=tmp_path)
    assert status == 1 and err.strip() == (
        f"error: --config {tmp_path / 'my.yaml'}: trainer.max_epoch is not an option of fit; did you mean"
        " trainer.max_epochs? (see --help)"
    ), err


def test_a_sweeps_config_given_to_fit_says_to_run_sweep(tmp_path, run_main):
    config = ROOT / "configs" / "sweep.yaml"
    status, _, err = run_main("fit", "--config", str(config), cwd=tmp_path)
    assert status == 1 and f"--config {config} is a sweep's config" in err, err
    assert f"`python -m mnist_lit sweep --config {config}`" in err and len(err.strip().splitlines()) == 1, err
