"""`python -m mnist_lit sweep`: a hyperparameter search with Optuna, each trial an ordinary `fit` in its own folder.

Every trial runs as `python -m mnist_lit fit --config <root>/trials/<n>/config.yaml` in a subprocess, so every
promise of fit (the run lock, digests, exact resume, signals) holds for it unchanged; the study lives in an RDB
storage (SQLite in the root, or PostgreSQL shared by several machines). A trial that stopped (Ctrl-C, SIGTERM, a
killed worker, found dead by its process id on this machine or by its stale heartbeat from any) is failed and
enqueued again with the same parameters (Optuna's RetryHeartbeatStaleTrialCallback); the worker that picks it up
resumes it from its folder's last.ckpt.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Literal

import yaml
from jsonargparse.typing import NonNegativeInt, PositiveInt

from mnist_lit.checkpoints import write_atomically
from mnist_lit.cli import error_line, fit_config, read_yaml
from mnist_lit.errors import ConfigError
from mnist_lit.sweep.study import FINGERPRINT, open_study


class Sweep:
    def __init__(
        self,
        space: dict[str, Any] | None = None,
        trials: PositiveInt = 16,
        metric: Literal["val/acc", "val/loss"] = "val/acc",
        direction: Literal["maximize", "minimize"] | None = None,
        seed: int = 1,
        pruner: Literal["median", "none"] = "median",
        startup_trials: NonNegativeInt = 4,
        warmup_epochs: NonNegativeInt = 0,
        workers: PositiveInt = 1,
        storage: str | None = None,
        study_name: str = "mnist_lit",
        heartbeat_interval: PositiveInt = 10,
        grace_period: PositiveInt = 60,
    ) -> None:
        """Search the fit options named in `space` with Optuna; each trial is a fit in <root>/trials/<n>/.

        Args:
            space: Fit options by their config keys, each a list of choices (`data.batch_size: [64, 128]`) or a
                range (`model.optimizer.init_args.lr: {low: 0.001, high: 0.5, log: true}`; `step` too).
            trials: Trials to finish (completed, pruned or failed with an error), counted over every worker.
            metric: What a trial is judged by: its last validation's value.
            direction: maximize or minimize the metric (default: maximize val/acc, minimize val/loss).
            seed: The sampler's seed (TPE).
            pruner: median: stop a trial at an epoch's end when its metric is worse than the median of the
                earlier trials at that epoch; none: never.
            startup_trials: Trials that finish before the pruner stops any.
            warmup_epochs: Epochs every trial trains before the pruner may stop it (a one-cycle schedule's trials
                look worst at their peak learning rate, mid-run).
            workers: Trials run at once on this machine; the cores are shared out between them.
            storage: Optuna storage URL (default: the MNIST_LIT_SWEEP_STORAGE environment variable, else
                sqlite:///<root>/sweep.db); postgresql://... to run workers on several machines against one study.
            study_name: The study's name in the storage.
            heartbeat_interval: Seconds between a running trial's heartbeats in the storage.
            grace_period: Seconds without a heartbeat after which another worker takes a trial over.
        """
        if grace_period <= heartbeat_interval:
            raise ConfigError(f"--sweep.grace_period: {grace_period} must be > --sweep.heartbeat_interval")
        self.space = space or {}
        self.trials, self.metric, self.seed, self.workers = trials, metric, seed, workers
        self.direction = direction or ("minimize" if metric == "val/loss" else "maximize")
        self.pruner, self.startup_trials, self.warmup_epochs = pruner, startup_trials, warmup_epochs
        self.storage, self.study_name = storage, study_name
        self.heartbeat_interval, self.grace_period = heartbeat_interval, grace_period


# --- the command line ---------------------------------------------------------------------------------------------


def _parser() -> Any:
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(
        prog="python -m mnist_lit sweep",
        description="Search fit options with Optuna. Every fit option (--model.*, --data.*, --trainer.*, and"
        " --config files, which may hold a `sweep:` section) sets the base recipe of every trial; trials go to"
        " <--trainer.default_root_dir>/trials/<n>/. Run the same command again to resume.",
        exit_on_error=False,
    )
    parser.add_argument("--config", action=ActionConfigFile, help="A YAML file: fit options and a sweep: section.")
    parser.add_argument("--report", action="store_true", help="Print the table, write best.yaml and figures; no run.")
    parser.add_class_arguments(Sweep, "sweep", instantiate=False)
    return parser


def split_args(args: list[str], scratch: Path) -> tuple[list[str], list[str], bool]:
    """(fit's arguments, the sweep's, --report): a config file's `sweep:` section goes to the sweep, the rest to fit."""
    fit, sweep, report = [], [], False
    i = 0
    while i < len(args):
        arg, value = args[i], None
        if arg == "--config" or (arg.startswith("--sweep.") and "=" not in arg):
            if i + 1 >= len(args):
                raise ConfigError(f"{arg} needs a value")
            value, i = args[i + 1], i + 1
        elif arg.startswith(("--config=", "--sweep.")):
            arg, _, value = arg.partition("=")
        if arg == "--report":
            report = True
        elif arg == "--config":
            config = read_yaml(value)
            if config is None and not Path(value).is_file():
                raise ConfigError(f"--config {value}: no such file")
            config = config or {}
            if not isinstance(config, dict):
                raise ConfigError(f"--config {value}: not a YAML mapping of options")
            for part, target in ((config.pop("sweep", None), sweep), (config, fit)):
                if part:
                    name = scratch / f"{len(fit) + len(sweep)}.yaml"
                    text = yaml.safe_dump({"sweep": part} if target is sweep else part)
                    write_atomically(str(name), text.encode())
                    target += ["--config", str(name)]
        elif arg.startswith("--sweep."):
            sweep += [arg, value]
        else:
            fit.append(arg)
        i += 1
    return fit, sweep, report


def parse_fit(args: list[str]) -> str | dict[str, Any]:
    """fit's complete config for these arguments, parsed and checked in this process by fit's own parse path; or
    its one-line error."""
    try:
        return fit_config(args)
    except SystemExit as exit_:
        return f"fit's options are not valid (exit {exit_.code})"
    except Exception as err:
        if (line := error_line(err)) is None:
            raise
        return line.removeprefix("error: ").removesuffix(" (see --help)")


def run_sweep(args: list[str]) -> None:
    from mnist_lit.sweep.space import Space
    from mnist_lit.sweep.worker import Sweeper

    if any(a in ("-h", "--help") for a in args):
        _parser().parse_args(["--help"])
        return
    with tempfile.TemporaryDirectory(prefix="mnist_lit_sweep") as scratch:
        fit_args, sweep_args, report = split_args(args, Path(scratch))
        printing = [a for a in fit_args if a.split("=")[0] == "--print_config"]
        fit_args = [a for a in fit_args if a not in printing]
        parser = _parser()
        options = parser.parse_args(sweep_args)
        sweep = Sweep(**options.sweep.as_dict())
        base = parse_fit(fit_args)
        if isinstance(base, str):
            raise ConfigError(base)
        if printing:  # the whole config, a file for --config: every trial's base and the sweep: section
            section = yaml.safe_load(parser.dump(options, skip_none=False))["sweep"]  # (its ranged ints as plain ones)
            print(yaml.safe_dump({**base, "sweep": section}, sort_keys=False), end="")
            return
        root = Path(base["trainer"].get("default_root_dir") or ".").absolute()
        base["trainer"]["default_root_dir"] = None
        if base.get("ckpt_path") is not None:
            raise ConfigError("--ckpt_path: a sweep resumes its trials itself; run the same command again")
        if base.get("checkpoint", {}).get("dirpath") is not None:
            raise ConfigError("--checkpoint.dirpath: each trial keeps its checkpoints in its own folder; leave it out")
        if report:
            from mnist_lit.sweep.report import report as print_report

            if (root / FINGERPRINT).is_file():  # (else open_study says there is no sweep here)
                own = json.loads((root / FINGERPRINT).read_text()).get("study", {}).get("name", sweep.study_name)
                if own != sweep.study_name:
                    raise ConfigError(f"{root} holds the sweep of the study {own!r}: pass --sweep.study_name {own}")
            study, _ = open_study(sweep, root, create=False)
            print_report(study, root, sweep.metric, Space.from_fingerprint(root))
            return
        space = Space(sweep.space, base)
        space.validate(parse_fit, Path(scratch), sweep.metric)
        Sweeper(sweep, space, base, root).run()
