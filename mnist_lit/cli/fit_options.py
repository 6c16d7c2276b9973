"""fit's options for the sweep, whose trials are fits: parsed and checked by fit's own parse path, and handed
out before a run is opened or anything is built."""

from __future__ import annotations

from typing import Any

import yaml
from lightning.pytorch.cli import LightningArgumentParser

from mnist_lit.cli.lightning import MNISTCLI, run_lightning


class _Parsed(Exception):
    """fit's checked options, carried out of LightningCLI's __init__ before anything is built or opened."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config


class _FitOptions(MNISTCLI):
    """fit's parse path, stopped once its options are checked: no run opened, nothing built or written."""

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        self.check_options(parser, args)
        raise _Parsed(yaml.safe_load(parser.dump(self.config, skip_none=False))["fit"])


def fit_config(args: list[str]) -> dict[str, Any]:
    """fit's complete config for these arguments, parsed and checked in this process by fit's own parse path
    (MNISTCLI.check_options), without opening a run or building anything. A bad option raises what `fit` would."""
    try:
        run_lightning(["fit", *args], _FitOptions)
    except _Parsed as parsed:
        return parsed.config
    raise AssertionError("fit's options were not handed out")  # (parse_arguments always raises)
