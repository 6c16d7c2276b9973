"""LightningCLI's fit, validate, test and predict with the project's checks: the options checked and the run's
checkpoints opened (mnist_lit.runs) before anything is built. Errors are raised; mnist_lit.__main__ reports each in
one line."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
from pathlib import Path
from typing import Any

import torch
from jsonargparse.typing import PositiveFloat
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.callbacks import ProgressBar as ProgressBarBase
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.environments import SLURMEnvironment

from mnist_lit import LIGHTNING_COMMANDS, USAGE, nodes, runs, signals, slurm
from mnist_lit.checkpoints import LOG_VERSION, THREADS, Checkpoint, ResumeCheck, checkpoint_dir, refuse_link
from mnist_lit.cli import options
from mnist_lit.cli.cores import BusyWatch, share_cores
from mnist_lit.cli.help import HelpFormatter
from mnist_lit.cli.logfolder import RunLogger, SaveConfig, claim_version
from mnist_lit.cli.messages import config_key_error, explain_accelerator, explain_class_option, quiet_lightning
from mnist_lit.cli.probes import check_optimizer, check_scheduler
from mnist_lit.data import MNISTDataModule
from mnist_lit.errors import CheckpointError, ConfigError, PeerLost, UserError, one_line
from mnist_lit.lean import QuietProfiler
from mnist_lit.model import NET_SPEC, LitMNIST
from mnist_lit.report import PredictionWriter, ProgressBar, ResultsTable, TestReport, TrainingCurves
from mnist_lit.trust import check_spec

INIT_FROM_HELP = (
    "Fine-tune: start fit from the weights of this checkpoint ('last': the newest one in"
    " <trainer.default_root_dir>/checkpoints), with a new optimizer and new step counts (to continue a run instead,"
    " use --ckpt_path). Its network is taken unless --model.net is given."
)


def reports(subcommand: str | None) -> list[Callback]:
    """What a subcommand checks and leaves to look at: only its own, as Lightning calls every callback at every step
    (a fit's resume check, whatever the run's other callbacks)."""
    return {"fit": [ResumeCheck(), TrainingCurves(), BusyWatch()], "validate": [ResultsTable()],
            "test": [TestReport(), ResultsTable()], "predict": [PredictionWriter()]}.get(subcommand, [])  # fmt: skip


class MNISTCLI(LightningCLI):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.run: runs.Run | None = None  # what this command starts from; holds fit's run lock until the end
        self.resumed_step: int | None = None
        self.claimed: Path | None = None  # the log version folder this run created
        try:
            super().__init__(*args, **kwargs)
        finally:
            if self.run is not None:
                self.run.close()
            if self.claimed is not None:  # a run that failed before writing a file there leaves no empty folder
                with contextlib.suppress(OSError):
                    self.claimed.rmdir()
                    self.claimed.parent.rmdir()

    def instantiate_classes(self) -> None:
        # What Lightning raises here comes from the options given (a strategy or an accelerator this machine
        # lacks, devices it does not have): a user's error, not a program's.
        model = self.config[self.subcommand].model
        init_from = model.pop("init_from")  # the command line's option, not LitMNIST's: its weights come below
        try:
            super().instantiate_classes()
        except (ValueError, TypeError, ImportError, MisconfigurationException) as err:
            device = explain_accelerator(str(err), options.origin(self.args, "trainer.accelerator"))
            raise self.from_the_checkpoint(device or explain_class_option(str(err)) or one_line(str(err))) from None
        finally:
            model.init_from = init_from  # in the run's config.yaml, as given
        if self.run is not None and self.run.init is not None:
            self.run.init.weights_into(self.model)

    def from_the_checkpoint(self, message: str) -> UserError:
        """The error for a refused option: a ConfigError, or, where the value came from the checkpoint being
        resumed or evaluated (not from this command line), a CheckpointError naming that file."""
        option = re.match(r"--([\w.]+)", message)
        if self.run is None or self.run.resume is None or option is None or not option[1].startswith("model."):
            return ConfigError(message)
        parts = option[1].split(".")
        if any(options.origin(self.args, ".".join(parts[:n])) for n in range(2, len(parts) + 1)):
            return ConfigError(message)
        return CheckpointError(f"{self.run.resume.path} holds {message} (from its hyperparameters)")

    def check_trainer_options(self) -> None:
        # Values the Trainer's signature lets through but that fail later, mid-run, with a ZeroDivisionError
        trainer = self.config[self.config.subcommand].trainer
        for name, low, rule in (
            ("accumulate_grad_batches", 1, ">= 1"),
            ("check_val_every_n_epoch", 1, ">= 1"),
            ("val_check_interval", 1e-9, "> 0"),
        ):
            if (value := trainer.get(name)) is not None and value < low:
                raise ConfigError(f"--trainer.{name}: {value} is out of range; it must be {rule}")
        # ... and values that make fit train nothing, then end as if it had succeeded
        if self.config.subcommand == "fit":
            for name, rule in (("max_epochs", ">= 1, or -1 for no limit"), ("max_steps", ">= 1, or -1 for no limit"),
                               ("limit_train_batches", "> 0")):  # fmt: skip
                if (value := trainer.get(name)) is not None and value == 0:
                    raise ConfigError(f"--trainer.{name}: {value} trains nothing; it must be {rule}")

    def after_fit(self) -> None:
        # Resuming a finished run is not a failure (a requeued job, a script run twice), but it must not pass for a
        # run that trained: say so, and leave no log folder for a run that did nothing.
        trainer = self.trainer
        if self.resumed_step is not None and trainer.global_step == self.resumed_step and trainer.is_global_zero:
            for callback in trainer.callbacks:
                if isinstance(callback, SaveConfig):
                    callback.discard(trainer)
            print(
                runs.nothing_to_train(
                    self.config.fit.ckpt_path, trainer.global_step, trainer.current_epoch, trainer.max_epochs,
                    trainer.max_steps,
                ),
                file=sys.stderr,
            )  # fmt: skip

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(Checkpoint, "checkpoint")
        parser.set_defaults({"trainer.max_epochs": 10, "model.net": NET_SPEC})  # --print_config shows the Net
        parser.groups["model"].add_argument("--model.init_from", type=str | None, default=None, help=INIT_FROM_HELP)
        parser.add_argument("--ddp_timeout", type=PositiveFloat, default=nodes.DEFAULT_TIMEOUT, help=nodes.TIMEOUT_HELP)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        # Our bar stands in for Lightning's default one, unless bars are off or the user chose another.
        config = self.config_init[self.subcommand].trainer
        callbacks = config.get("callbacks") or []
        callbacks = [*(callbacks if isinstance(callbacks, list) else [callbacks]), *reports(self.subcommand)]
        if config.get("enable_progress_bar") is not False and not any(
            isinstance(c, ProgressBarBase) for c in callbacks
        ):
            callbacks.append(ProgressBar())
        claimed = False
        if config.get("logger") in (None, True) and rank_zero_only.rank == 0 and SLURMEnvironment.job_id() is None:
            # Lightning's default logger, with its version folder taken now (mkdir: one winner), not when it is first
            # written: two runs started together in one root must not both pick the same version_N.
            folder = Path(config.get("default_root_dir") or os.getcwd()) / "lightning_logs"
            version = self._resumed_version(folder)
            if version is None:
                version = claim_version(folder)
                self.claimed = folder / f"version_{version}"
                claimed = True
            kwargs["logger"] = RunLogger(save_dir=folder.parent, version=version)
        if config.get("profiler") is None:  # Lightning's default, less its cost per hook call (mnist_lit.lean)
            kwargs["profiler"] = QuietProfiler()
        trainer = super().instantiate_trainer(**kwargs, callbacks=callbacks)
        if self.subcommand == "fit":
            self._check_monitors(trainer)
            saving = any(isinstance(c, ModelCheckpoint) and (c.save_last or c.save_top_k) for c in trainer.callbacks)
            if not saving and rank_zero_only.rank == 0:
                # a choice (a benchmark, a throwaway run), but one that loses the run's work: said, not silent
                print(
                    "note: this fit saves no checkpoint (--trainer.enable_checkpointing false, or"
                    " --checkpoint.save_last false with save_top_k 0): what it trains is not kept",
                    file=sys.stderr,
                )
        if self.subcommand == "fit":
            for callback in trainer.callbacks:
                if isinstance(callback, Checkpoint):
                    callback.resume_command = options.resume_command(self.args)
        recorded = (
            self.run.resume.checkpoint.get(THREADS)
            if self.run and self.run.resume and self.subcommand == "fit"
            else None
        )
        main, alone = rank_zero_only.rank == 0, trainer.world_size == 1
        fixed = share_cores(trainer.num_devices, self.datamodule.num_workers, recorded, main=main, alone=alone)
        for callback in trainer.callbacks:
            if isinstance(callback, BusyWatch):
                callback.fixed = fixed
        config = self.config[self.config.subcommand]
        directory = checkpoint_dir(config.trainer.default_root_dir, config.checkpoint.dirpath)
        nodes.set_up(trainer, config.ddp_timeout, config.ckpt_path, directory)
        signals.silence_lightning(trainer)  # mnist_lit.signals owns SIGINT and SIGTERM
        if self.subcommand == "fit":
            plugins = self.config_init[self.subcommand].trainer.get("plugins")
            slurm.take_requeue_signal(trainer, plugins, self.ckpt_path_given)  # in a SLURM job, its end's warning
        if trainer.logger is not None and rank_zero_only.rank == 0 and trainer.logger.log_dir is not None:
            # The logger fixes its version folder here; one that is already there holds an earlier run's files.
            new = claimed or not os.path.exists(trainer.logger.log_dir)
            if not new:  # a folder reused (a logger given its version): Lightning writes hparams.yaml there itself
                refuse_link(os.path.join(trainer.logger.log_dir, "hparams.yaml"))
            for callback in trainer.callbacks:
                if isinstance(callback, SaveConfig):
                    callback.own_folder, callback.resuming = new, self.run is not None and self.run.resume is not None
        return trainer

    def _resumed_version(self, folder: Path) -> int | None:
        """A resumed fit's own log folder, which it goes on writing to (one run, one line in TensorBoard): the
        version its checkpoint records, while that folder is there, a folder and not a link. None: a new one."""
        if self.subcommand != "fit" or self.run is None or self.run.resume is None or folder.is_symlink():
            return None
        version = self.run.resume.checkpoint.get(LOG_VERSION)
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            return None
        found = folder / f"version_{version}"
        return version if found.is_dir() and not found.is_symlink() else None

    def _check_monitors(self, trainer: Trainer) -> None:
        """A callback watching a metric the run never logs (EarlyStopping, ModelCheckpoint): refused now, not
        with a traceback at the first validation, after checkpoints a corrected command would refuse to overwrite."""
        validating = self.datamodule.val_size > 0 and trainer.limit_val_batches != 0
        logged = [*LitMNIST.TRAIN_METRICS, *(LitMNIST.VAL_METRICS if validating else ())]
        scheduler = self.config[self.subcommand].model.lr_scheduler
        if not validating and str(getattr(scheduler, "class_path", "")).endswith(".ReduceLROnPlateau"):
            raise ConfigError("--model.lr_scheduler ReduceLROnPlateau watches val/loss, and this run has no validation")
        for callback in trainer.callbacks:
            monitor = getattr(callback, "monitor", None)
            if isinstance(monitor, str) and monitor not in logged:
                why = "" if validating or monitor not in LitMNIST.VAL_METRICS else " (this run has no validation)"
                raise ConfigError(
                    f"--trainer.callbacks {type(callback).__name__}: monitor {monitor!r} is not a metric this run"
                    f" logs{why}; it logs {', '.join(logged)}"
                )

    # private-lightning[LightningCLI._instantiate_trainer]: where the callbacks list is final
    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> Trainer:
        if config.get("enable_checkpointing") is False:  # the --checkpoint group is always built: drop it
            callbacks = [c for c in callbacks if not isinstance(c, Checkpoint)]
        return super()._instantiate_trainer(config, callbacks)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        # Everything a command can be refused for, checked here, after parsing and before anything is built or
        # written: the options, then the run's checkpoints (mnist_lit.runs), whose hyperparameters and dataset
        # become the options' except where the command line gives them.
        self.check_options(parser, args)
        subcommand = self.config.subcommand
        config = self.config[subcommand]
        root = config.trainer.default_root_dir
        self.ckpt_path_given = config.ckpt_path  # before 'auto' and 'last' are resolved: a SLURM requeue needs it
        self.run = runs.open_run(
            subcommand,
            config.ckpt_path,
            checkpoint_dir(root, config.checkpoint.dirpath),
            init_from=config.model.init_from,
            init_directory=checkpoint_dir(root, None),
            dataset=config.data.dataset,
            main_process=rank_zero_only.rank == 0 and os.environ.get("NODE_RANK", "0") == "0",
        )
        if self.run.init is not None:
            self._take_init_from(self.run.init)
        if self.run.resume is not None:
            self._take_checkpoint(self.run.resume)
            if subcommand != "fit":
                self._beside_the_run(self.run.resume.path)
            else:  # the optimizer and schedule the checkpoint gives, probed as the command line's were
                model = self.config[subcommand].model
                try:
                    check_optimizer(model.optimizer.as_dict())
                    schedule = model.lr_scheduler.as_dict() if model.lr_scheduler is not None else None
                    check_scheduler(model.optimizer.as_dict(), schedule)
                except ValueError as err:
                    raise self.from_the_checkpoint(str(err)) from None
        else:
            self.config[subcommand].ckpt_path = None  # fit's 'auto' where there was no run to resume: a new one
            if subcommand == "fit":
                slurm.refuse_lightnings_checkpoint(root)
        self._check_seed()  # again: a resume's seed is the checkpoint's

    def check_options(self, parser: LightningArgumentParser, args: Any) -> None:
        """The command line parsed into self.config, and every option checked that can be without a run's files."""
        self.args = options.checked_args(list(sys.argv[1:] if args is None else args))
        try:
            self.config = parser.parse_args(self.args)
        except argparse.ArgumentError as err:
            raise config_key_error(str(err), self.args) or err from None
        config = self.config[self.config.subcommand]
        try:  # a bad optimizer option first, whatever else may be wrong
            check_optimizer(config.model.optimizer.as_dict())
            scheduler = config.model.lr_scheduler
            check_scheduler(config.model.optimizer.as_dict(), scheduler.as_dict() if scheduler is not None else None)
            net = config.model.net
            check_spec("net", net.as_dict() if hasattr(net, "as_dict") else net)  # its size, before it is built
        except ValueError as err:
            raise ConfigError(str(err)) from None
        self.check_trainer_options()
        if config.get("weights_only") is False:
            raise ConfigError(
                "--weights_only false: mnist_lit reads every checkpoint as data (weights only); leave it out"
            )
        self._check_seed()

    def _check_seed(self) -> None:
        seed = self.config[self.config.subcommand].seed_everything
        if isinstance(seed, int) and not isinstance(seed, bool) and not 0 <= seed < 2**32:
            raise ConfigError(f"--seed_everything: {seed} is out of range; it must be >= 0 and < 2**32")

    def _beside_the_run(self, ckpt_path: str) -> None:
        """What evaluating a run's checkpoint leaves (its log folder, figures, predictions) goes beside that run:
        the root of <root>/checkpoints/<file>, unless the command line gives a root, or the run's is not ours to
        write to (a colleague's, read only)."""
        config = self.config[self.config.subcommand]
        folder = Path(ckpt_path).absolute().parent
        given = options.origin(self.args, "trainer.default_root_dir") or config.checkpoint.dirpath is not None
        elsewhere = folder.parent.resolve() != Path.cwd().resolve()
        if not given and elsewhere and folder.name == "checkpoints" and os.access(folder.parent, os.W_OK):
            config.trainer.default_root_dir = str(folder.parent)

    # private-lightning[LightningCLI._parse_ckpt_path]: switched off. It would load --ckpt_path unverified and put
    # its hyperparameters over the command line's; parse_arguments has done both right (mnist_lit.runs).
    def _parse_ckpt_path(self) -> None:
        pass

    def _take_init_from(self, init: runs.Trained) -> None:
        """--model.init_from's network, unless one is given; its dataset, unless one is given."""
        subcommand = self.config.subcommand
        if self.config[subcommand].model.net.as_dict() == NET_SPEC and init.net_spec != NET_SPEC:
            self.config = self.parser.parse_object({subcommand: {"model": {"net": init.net_spec}}}, self.config)
        config = self.config[subcommand]
        config.model.init_from = init.path
        if config.data.dataset is None:  # a new run may fine-tune on another dataset, but by default its own
            config.data.dataset = init.dataset

    def _take_checkpoint(self, trained: runs.Trained) -> None:
        """The model's hyperparameters and the data's dataset from the checkpoint, except those given on this command
        line (Lightning's own overlay puts the checkpoint's over them, silently); a resume's rules applied."""
        subcommand = self.config.subcommand
        hparams: dict[str, Any] = {subcommand: {"model": trained.hparams}}
        if (split := runs.run_split(trained.checkpoint, subcommand)) is not None:  # the run's own held-out images
            hparams[subcommand]["data"] = {"val_size": split}
        # The command line once more, over the defaults and the checkpoint's hyperparameters: what it gives wins.
        # (Over the defaults, not over the config parsed already, where `--trainer.callbacks+=X` would add X twice.)
        base = self.parser.parse_object(hparams, self.parser.get_defaults())
        final = self.parser.parse_args(self.args, namespace=base, defaults=False)
        if subcommand == "fit":
            before = self.parser.parse_object(hparams, self.config)[subcommand].model.as_dict()
            runs.check_resume_changes(trained.path, before, final[subcommand].model.as_dict())
            given = any(a == "--seed_everything" or a.startswith("--seed_everything=") for a in self.args)
            given = given or options.given_in_config(self.args, "seed_everything")
            final[subcommand].seed_everything = runs.resumed_seed(trained, final[subcommand].seed_everything, given)
            self.resumed_step = trained.checkpoint.get("global_step")
            epoch, limit = runs.restored_epoch(trained.checkpoint), final[subcommand].trainer.max_epochs
            if epoch is not None and limit not in (None, -1) and epoch > limit:
                # Lightning would refuse it in its own words, after the model's summary: here, before anything
                if rank_zero_only.rank == 0:
                    step, steps = self.resumed_step, final[subcommand].trainer.max_steps
                    print(runs.nothing_to_train(trained.path, step, epoch, limit, steps), file=sys.stderr)
                sys.exit(0)
        final[subcommand].ckpt_path = trained.path
        final[subcommand].data.dataset = trained.dataset
        runs.check_split(trained.path, split, final[subcommand].data.val_size, subcommand)
        self.config = final


def run_lightning(args: list[str], cli: type[MNISTCLI] = MNISTCLI) -> None:
    """fit, validate, test or predict: LightningCLI with the project's checks (errors raised; mnist_lit.__main__
    reports them). cli: MNISTCLI, or a subclass that stops early (mnist_lit.cli.fit_options)."""
    quiet_lightning()
    distributed = torch.distributed.is_available
    try:
        _run_lightning(args, cli)
    except signals.Interrupted as err:
        if (requeue := slurm.requeued(err.signum)) is None:
            raise
        raise signals.Interrupted(f"{err}; {requeue}", err.signum) from None
    except RuntimeError as err:
        # A collective with a process that died, stopped or went silent fails here (gloo: "Connection closed by
        # peer", "Timed out"), as does a start where the processes cannot reach each other.
        if (lost := nodes.lost_peer(err)) is None:
            raise
        raise PeerLost(lost) from None
    finally:
        # Lightning leaves the DDP process group up; torn down at interpreter exit instead, gloo's threads can
        # abort the process ("terminate called without an active exception") after a successful run.
        if distributed() and torch.distributed.is_initialized():
            with contextlib.suppress(Exception):
                torch.distributed.destroy_process_group()


def _run_lightning(args: list[str], cli: type[MNISTCLI]) -> None:
    # no abbreviations: --trainer.max_epoch must not silently mean --trainer.max_epochs
    sub_kwargs = {"exit_on_error": False, "allow_abbrev": False, "formatter_class": HelpFormatter}
    parser_kwargs = {**sub_kwargs, "prog": "python -m mnist_lit", "description": USAGE.split("\n\n")[1]}
    cli(
        LitMNIST,
        MNISTDataModule,
        seed_everything_default=1,
        auto_configure_optimizers=False,
        save_config_callback=SaveConfig,
        save_config_kwargs={"overwrite": True},  # a version folder is the run's own
        parser_kwargs={**parser_kwargs, **{name: sub_kwargs for name in LIGHTNING_COMMANDS}},
        args=args,
    )
