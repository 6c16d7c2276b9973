"""The command line: LightningCLI's fit, validate, test and predict, plus export; errors as one line."""

from __future__ import annotations

import argparse
import difflib
import inspect
import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, NoReturn

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ProgressBar as ProgressBarBase
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from mnist_lit import __main__
from mnist_lit.checkpoint import (
    Checkpoint,
    CheckpointError,
    Diverged,
    Interrupted,
    check_resumable,
    check_weights,
    checkpoint_dir,
    load_checkpoint,
    newest_checkpoint,
    resolve,
)
from mnist_lit.data import DATASETS, DataError, MNISTDataModule, recorded_dataset
from mnist_lit.model import LitMNIST
from mnist_lit.report import PredictionWriter, ProgressBar, TestReport, TrainingCurves

SUBCOMMANDS = ("fit", "validate", "test", "predict")


def reports(subcommand: str | None) -> list[Callback]:
    """What a subcommand leaves to look at: only its own, as Lightning calls every callback at every step."""
    return {"fit": [TrainingCurves()], "test": [TestReport()], "predict": [PredictionWriter()]}.get(subcommand, [])


def share_cores(processes: int, workers: int) -> None:
    """Give each training process on this machine an equal share of the cores: threads x processes <= cores.

    Two processes that each run as many threads as there are cores slow each other down many times over.
    Every process of a DDP run passes here (Lightning starts each one from this command line). Data loader
    workers, if any, get a core each. OMP_NUM_THREADS, when set, wins.
    """
    if os.environ.get("OMP_NUM_THREADS"):
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // processes - workers))


class SaveConfig(SaveConfigCallback):
    """The run's config.yaml, in the logger's version folder only. Without a logger the folder would be the root
    itself, where a config.yaml may well be the user's own."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if trainer.logger is not None:
            super().setup(trainer, pl_module, stage)


class ConfigError(ValueError):
    """The options parsed, but the objects they describe cannot be built (e.g. an unknown strategy)."""


class MNISTCLI(LightningCLI):
    def instantiate_classes(self) -> None:
        # What Lightning raises here comes from the options given (a strategy or an accelerator this machine
        # lacks, devices it does not have): a user's error, not a program's.
        try:
            super().instantiate_classes()
        except (ValueError, TypeError, ImportError, MisconfigurationException) as err:
            raise ConfigError(_one_line(str(err))) from None

    def _set_seed(self) -> None:
        seed = self._get(self.config, "seed_everything")
        if isinstance(seed, int) and not isinstance(seed, bool) and not 0 <= seed < 2**32:
            raise ConfigError(f"--seed_everything: {seed} is out of range; it must be >= 0 and < 2**32")
        super()._set_seed()

    def before_instantiate_classes(self) -> None:
        # Values the Trainer's signature lets through but that fail later, mid-run, with a ZeroDivisionError
        trainer = self._get(self.config, "trainer")
        for name, low, rule in (
            ("accumulate_grad_batches", 1, ">= 1"),
            ("check_val_every_n_epoch", 1, ">= 1"),
            ("val_check_interval", 1e-9, "> 0"),
        ):
            if (value := trainer.get(name)) is not None and value < low:
                raise ConfigError(f"--trainer.{name}: {value} is out of range; it must be {rule}")

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(Checkpoint, "checkpoint")
        parser.set_defaults({"trainer.max_epochs": 10})

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        # Our bar stands in for Lightning's default one, unless bars are off or the user chose another.
        config = self._get(self.config_init, "trainer")
        callbacks = config.get("callbacks") or []
        callbacks = [*(callbacks if isinstance(callbacks, list) else [callbacks]), *reports(self.subcommand)]
        if config.get("enable_progress_bar") is not False and not any(
            isinstance(c, ProgressBarBase) for c in callbacks
        ):
            callbacks.append(ProgressBar())
        trainer = super().instantiate_trainer(**kwargs, callbacks=callbacks)
        share_cores(trainer.num_devices, self.datamodule.num_workers)
        return trainer

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> Trainer:
        if config.get("enable_checkpointing") is False:  # the --checkpoint group is always built: drop it
            callbacks = [c for c in callbacks if not isinstance(c, Checkpoint)]
        return super()._instantiate_trainer(config, callbacks)

    def _parse_ckpt_path(self) -> None:
        """Resolve --ckpt_path and --model.init_from (and check the files) before anything is built or written;
        the data's dataset is the checkpoint's."""
        config = self.config[self.config.subcommand]
        directory = checkpoint_dir(config.trainer.default_root_dir, config.checkpoint.dirpath)
        fitting = self.config.subcommand == "fit"
        if fitting and directory.exists() and not directory.is_dir():
            raise CheckpointError(f"{directory} is a file, but checkpoints go there: pass another --checkpoint.dirpath")
        if config.model.init_from is not None:
            self._parse_init_from(config, directory)
        earlier = newest_checkpoint(directory) if fitting else None  # a run this fit would write over
        if config.ckpt_path is None:
            if earlier is not None:
                raise CheckpointError(
                    f"{earlier} holds an earlier run, which a new run would overwrite: resume it with --ckpt_path"
                    " last, or start the new run in another --trainer.default_root_dir"
                )
            if not fitting:  # the model's random initial weights would be evaluated as if trained
                raise CheckpointError(
                    f"{self.config.subcommand} needs trained weights: pass --ckpt_path last or a checkpoint file"
                )
        else:
            config.ckpt_path = resolve(config.ckpt_path, directory, fitting)
            checkpoint = load_checkpoint(config.ckpt_path)
            check_weights(config.ckpt_path, checkpoint, LitMNIST())
            if fitting:
                check_resumable(config.ckpt_path, checkpoint)
                if earlier is not None and Path(config.ckpt_path).resolve().parent != directory.resolve():
                    raise CheckpointError(
                        f"{earlier} holds another run, which resuming {config.ckpt_path} here would overwrite: resume"
                        " it in its own --trainer.default_root_dir, or here in an empty one"
                    )
            recorded = recorded_dataset(checkpoint)
            if config.data.dataset not in (None, recorded):
                raise DataError(
                    f"{config.ckpt_path} was trained on {DATASETS[recorded].title} ({recorded}), not on"
                    f" {DATASETS[config.data.dataset].title}: drop --data.dataset {config.data.dataset}"
                    " (the checkpoint's dataset is used)"
                )
            config.data.dataset = recorded
        super()._parse_ckpt_path()

    def _parse_init_from(self, config: Any, directory: Path) -> None:
        """--model.init_from as a checked file; the new run's dataset is that checkpoint's unless given."""
        if config.ckpt_path is not None:
            raise ConfigError(
                "--model.init_from starts a new run from a checkpoint's weights and --ckpt_path continues one: pass"
                " one of them"
            )
        source = checkpoint_dir(config.trainer.default_root_dir, None)
        path = resolve(config.model.init_from, source, fitting=False)
        if config.model.init_from == "last" and source.resolve() == directory.resolve():
            raise CheckpointError(
                f"--model.init_from last is {path}, in the folder this run's checkpoints would overwrite: give the"
                " new run its own --checkpoint.dirpath, or pass init_from the file and use another"
                " --trainer.default_root_dir"
            )
        checkpoint = load_checkpoint(path)
        check_weights(path, checkpoint, LitMNIST())
        config.model.init_from = path
        if config.data.dataset is None:  # a new run may fine-tune on another dataset, but by default its own
            config.data.dataset = recorded_dataset(checkpoint)


def _one_line(message: str) -> str:
    return re.sub(r"\s*\n\s*", " ", message.strip())


def _explain(message: str) -> str:
    """jsonargparse's parse error as one line naming the option, the value given and what would fit."""
    message = _one_line(re.sub(r'Parser key "([^"]+)":', r"--\1:", message))
    if restricted := re.search(r"(--\S+): Not of type \w+: (.*?) does not conform to restriction (.+)", message):
        bounds = re.sub(r"v\s*([<>=]+)\s*", r"\1 ", restricted[3])
        return f"{restricted[1]}: {restricted[2]} is out of range; it must be {bounds}"
    if union := re.search(r"(--\S+): Does not validate against any of .*Given value: (.*)$", message):
        expected = re.findall(r"Expected a (<class '(\w+)'>|typing\.Literal\[([^\]]*)\])", message)
        names = [("null" if cls == "NoneType" else cls) if cls else f"one of {literal}" for _, cls, literal in expected]
        return f"{union[1]}: {union[2]!r} is not valid; it takes {' or '.join(names)}"
    if choice := re.search(r"invalid choice: '([^']*)' \(choose from (.*?)\)", message):
        names = [*re.findall(r"'(\w+)'", choice[2]), "export"]  # export is ours, outside LightningCLI's parser
        close = difflib.get_close_matches(choice[1], names, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        return f"{choice[1]!r} is not a subcommand; choose from {', '.join(names)}{hint}"
    if unknown := re.search(r"unrecognized arguments: (--[\w.]+)", message):
        if close := difflib.get_close_matches(unknown[1], _option_names(), n=1, cutoff=0.75):
            return f"{message}; did you mean {close[0]}?"
    return message


def _option_names() -> list[str]:
    """Every --group.option the CLI takes, for suggestions on a misspelt one."""
    groups = {"model": LitMNIST, "data": MNISTDataModule, "checkpoint": Checkpoint, "trainer": Trainer}
    names = [f"--{g}.{p}" for g, cls in groups.items() for p in inspect.signature(cls.__init__).parameters]
    return [*names, "--config", "--print_config", "--seed_everything", "--ckpt_path", "--weights_only"]


def run_lightning(args: list[str] | None) -> None:
    try:
        _run_lightning(args)
    finally:
        # Lightning leaves the DDP process group up; torn down at interpreter exit instead, gloo's threads can
        # abort the process ("terminate called without an active exception") after a successful run.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _run_lightning(args: list[str] | None) -> None:
    # no abbreviations: --trainer.max_epoch must not silently mean --trainer.max_epochs
    sub_kwargs = {"exit_on_error": False, "allow_abbrev": False}
    parser_kwargs = {**sub_kwargs, "prog": "python -m mnist_lit", "description": __main__.USAGE.split("\n\n")[1]}
    MNISTCLI(
        LitMNIST,
        MNISTDataModule,
        seed_everything_default=1,
        auto_configure_optimizers=False,
        save_config_callback=SaveConfig,
        save_config_kwargs={"overwrite": True},  # a version folder is the run's own
        parser_kwargs={**parser_kwargs, **{name: sub_kwargs for name in SUBCOMMANDS}},
        args=args,
    )


class _ExportParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, like every other error, not usage + error
        raise ConfigError(message)


def run_export(args: list[str]) -> None:
    from mnist_lit.export import ExportError, export  # onnx only when exporting

    parser = _ExportParser(
        prog="python -m mnist_lit export",
        description="Write a trained Net for deployment: .pth (the guide's plain state_dict) or .onnx.",
    )
    parser.add_argument("--ckpt_path", required=True, help="A checkpoint file, or 'last'.")
    parser.add_argument("--output", required=True, help="File to write; its extension picks the format.")
    parser.add_argument(
        "--default_root_dir", default=".", help="Where 'last' is looked for: <this>/checkpoints/last.ckpt."
    )
    options = parser.parse_args(args)
    directory = checkpoint_dir(options.default_root_dir, None)
    ckpt_path = resolve(options.ckpt_path, directory, fitting=False, root_option="--default_root_dir")
    try:
        print(export(ckpt_path, Path(options.output)))
    except ExportError as err:
        sys.exit(f"error: {err}")


def main(args: list[str] | None = None) -> None:
    """Run the command line; user errors end in one line on stderr and a non-zero exit status."""
    # Lightning's nags that say nothing about this run: an advert, and a deprecation inside Lightning itself.
    for name in ("lightning.fabric.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero"):
        logging.getLogger(name).addFilter(lambda record: "💡" not in str(record.msg))
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    # test/validate/predict run without the fit-only curves callback whose state the checkpoint carries.
    warnings.filterwarnings("ignore", message=r".*Please add the following callbacks: \['TrainingCurves'\]\.$")
    argv = sys.argv[1:] if args is None else list(args)
    try:
        if argv[:1] == ["export"]:
            run_export(argv[1:])
        else:
            run_lightning(args)
    # OSError: the machine's, not the program's: a full disk, a folder without write access
    except (DataError, CheckpointError, Diverged, MisconfigurationException, OSError) as err:
        sys.exit(f"error: {_one_line(str(err))}")
    except argparse.ArgumentError as err:
        sys.exit(f"error: {_explain(str(err))} (see --help)")
    except ConfigError as err:
        sys.exit(f"error: {err} (see --help)")
    except ValueError as err:
        # Lightning checks val_check_interval against the epoch's batches only once the data is there
        if "`val_check_interval`" not in str(err):
            raise
        sys.exit(f"error: --trainer.{_one_line(str(err)).replace('`', '')}")
    except Interrupted as err:
        print(f"\n{err}", file=sys.stderr)
        sys.exit(128 + err.signum)  # the shell's convention for "ended by this signal"
