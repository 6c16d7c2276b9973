"""The command line: LightningCLI's fit, validate, test and predict with the project's checks (lightning), fit's
checked options handed to the sweep (fit_options), export and serve as typed functions (commands), the words before
parsing (options), other libraries' messages rewritten as one line (messages), the optimizer's and schedule's options
tried on a probe (probes) and the run's log folder (logfolder). Errors are raised; mnist_lit.__main__ reports them."""

from mnist_lit.cli.commands import run_command
from mnist_lit.cli.fit_options import fit_config
from mnist_lit.cli.lightning import run_lightning
from mnist_lit.cli.messages import error_line
from mnist_lit.cli.options import read_yaml
from mnist_lit.cli.probes import check_optimizer, check_scheduler

__all__ = [
    "check_optimizer",
    "check_scheduler",
    "error_line",
    "fit_config",
    "read_yaml",
    "run_command",
    "run_lightning",
]
