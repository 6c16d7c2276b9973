"""Other libraries' messages about a bad option, rewritten as one line that names the option, the value given and
what would fit (with a "did you mean" for a misspelt option or subcommand); and Lightning's warnings that say
nothing true about this project's runs, filtered out."""

from __future__ import annotations

import argparse
import difflib
import inspect
import logging
import re
import warnings

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Trainer

from mnist_lit import COMMANDS
from mnist_lit.checkpoints import Checkpoint
from mnist_lit.cli import options
from mnist_lit.data import MNISTDataModule
from mnist_lit.errors import ConfigError, UserError, one_line, printable
from mnist_lit.model import GUIDE_SGD, LitMNIST
from mnist_lit.trust import range_rule

# jsonargparse's restricted number types, as a value of each is described
_RESTRICTED = {
    "PositiveInt": "an int > 0",
    "NonNegativeInt": "an int >= 0",
    "PositiveFloat": "a number > 0",
    "NonNegativeFloat": "a number >= 0",
    "ClosedUnitInterval": "a number >= 0 and <= 1",
    "OpenUnitInterval": "a number > 0 and < 1",
    # serve's own (cli/commands.py)
    "Port": "an int >= 1024 and <= 65535",
    "BatchTimeout": "a number >= 0 and < 1",
    "BodyTimeout": "a number > 0 and <= 3600",
}


def _finite(names: list[str], value: str) -> list[str]:
    """jsonargparse takes no inf or nan where a float goes: for those, "it takes float" would puzzle."""
    if re.fullmatch(r"[+-]?(inf|infinity|nan)", value.strip(), re.IGNORECASE):
        return ["a finite float" if name == "float" else name for name in names]
    return names


def explain(message: str, classes: bool = True, names: list[str] | None = None) -> str:
    """jsonargparse's parse error as one line naming the option, the value given and what would fit (names: the
    options the command takes, for a "did you mean"; default: the Lightning subcommands')."""
    if classes and (classy := explain_class_option(message)) is not None:
        return classy
    message = one_line(re.sub(r'Parser key "([^"]+)":', r"--\1:", message))
    # their-words[jsonargparse.restriction]: a restricted type's refusal, read for the option, value and bounds
    if restricted := re.search(r"(--\S+): Not of type \w+: (.*?) does not conform to restriction (.+)", message):
        return f"{restricted[1]}: {restricted[2]} is out of range; it must be {range_rule(restricted[3])}"
    # their-words[jsonargparse.union]: a union's refusal, read for the types it takes
    if union := re.search(
        r"(--\S+): (?:- Expected a path but .*?)?Does not validate against any of .*Given value: (.*)$", message
    ):
        expected = re.findall(r"Expected a (<class '(\w+)'>|typing\.Literal\[([^\]]*)\])", message)
        names = [("null" if cls == "NoneType" else cls) if cls else f"one of {literal}" for _, cls, literal in expected]
        return f"{union[1]}: {union[2]!r} is not valid; it takes {' or '.join(_finite(names, union[2]))}"
    # their-words[jsonargparse.type]: a plain type's refusal
    if typed := re.search(r"(--\S+): Expected a <class '(\w+)'>\. Got value: (.*)$", message):
        return f"{typed[1]}: {typed[3]!r} is not valid; it takes {' or '.join(_finite([typed[2]], typed[3]))}"
    # their-words[jsonargparse.not-a-number]: int() and float()'s own words, inside jsonargparse's
    if restricted := re.search(r"(--\S+): Not of type (\w+): (?:invalid literal for int\(\) with base 10|could not "
                               r"convert string to float): (.*)$", message):  # fmt: skip
        return (
            f"{restricted[1]}: {restricted[3]} is not valid; it takes {_RESTRICTED.get(restricted[2], restricted[2])}"
        )
    # their-words[jsonargparse.literal]: a Literal's refusal, read for its choices
    if literal := re.search(r"(--\S+): Expected a typing\.Literal\[(.*)\]\. Got value: (.*)$", message):
        return f"{literal[1]}: {literal[3]!r} is not valid; it takes one of {literal[2]}"
    # their-words[argparse.required]: argparse's missing options
    if required := re.fullmatch(r"the following arguments are required: (.*)", message):
        return f"the following options are required: {', '.join('--' + n.lstrip('-') for n in required[1].split(', '))}"
    # their-words[argparse.choice]: argparse's unknown subcommand
    if choice := re.search(r"invalid choice: '([^']*)' \(choose from (.*?)\)", message):
        names = list(COMMANDS)
        close = difflib.get_close_matches(choice[1], names, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        return f"{choice[1]!r} is not a subcommand; choose from {', '.join(names)}{hint}"
    # their-words[argparse.unrecognized]: argparse's unknown option, for a "did you mean"
    if unknown := re.search(r"unrecognized arguments: (--[\w.-]+)", message):
        names = names or _option_names()
        given = unknown[1].replace("-", "_").replace("__", "--", 1)  # --ckpt-path: the option is --ckpt_path
        tail = given.rpartition(".")[2].lstrip("-")  # --lr: an option that ends in .lr
        close = [n for n in names if n == given] or [n for n in names if n.endswith(f".{tail}")][:1]
        if close := close or difflib.get_close_matches(given, names, n=1, cutoff=0.75):
            return f"{message}; did you mean {close[0]}?"
    return message


def explain_accelerator(message: str, origin: str | None) -> str | None:
    """Lightning's "No supported gpu backend found!" (and its like for cuda, mps) as one line naming the option or
    the config file that asked for a device this machine lacks, and the fix. origin: where the command line set
    --trainer.accelerator (mnist_lit.cli.options.origin)."""
    # their-words[lightning.accelerator]: the two ways Lightning refuses a device this machine lacks
    if found := re.search(r"No supported (\w+) backend found", message):
        wanted = found[1].lower()
    elif found := re.search(r"`(\w+)Accelerator` can not run on your system", message):
        wanted = found[1].lower()
    else:
        return None
    device = {"gpu": "a GPU (CUDA or Apple MPS)", "cuda": "a CUDA GPU", "mps": "an Apple MPS GPU"}.get(wanted, wanted)
    if origin is None or origin.startswith("--config"):
        where = origin.removeprefix("--config ") if origin else f"--trainer.accelerator {wanted}"
        fix = "use configs/cpu.yaml instead, or add --trainer.accelerator cpu after it"
    else:
        where, fix = origin, "drop it, or pass --trainer.accelerator cpu"
    return f"{where} needs {device}; this machine has none: {fix}"


def explain_class_option(message: str) -> str | None:
    """The real cause of a bad class-typed option (a logger, a callback, the optimizer, the scheduler), which
    jsonargparse buries under the other types the option would also take: a missing argument of the class, its
    missing package, a class it cannot find, a bad value of one of its arguments."""
    # their-words[jsonargparse.class]: every pattern below; jsonargparse nests a class option's real cause
    key = re.search(r'Parser key "([^"]+)"', message)
    option = f"--{key[1]}" if key else _option_of_type(message)
    end = r"(?=\n\s*- |\n\s*Given value|\. Got value: |\Z)"
    if ambiguous := re.search(r"(Multiple subclasses with name [^\n]*)", message):
        return f"{option}: {ambiguous[1].rstrip('.')}"
    if problem := re.search(rf"Problem with given class_path '([^']+)':\s*(.*?){end}", message, re.S):
        cls, cause = problem[1].rpartition(".")[2], one_line(problem[2])
        if inner := re.match(r'Parser key "([^"]+)":\s*(.*)', cause):  # one of the class's own arguments
            return explain(f'Parser key "{option[2:]}.{inner[1]}":\n{inner[2]}', classes=False)
    elif callable_ := re.search(rf"expects a function or a callable class: (.*?){end}", message, re.S):
        cause = callable_[1].strip()
        # one of the class's own arguments: its message, less the last "Got value" (the whole class's)
        if inner := re.search(
            r'callable class: Parser key "([^"]+)":\s*(.*?)(?:\. Got value: (?:(?!\. Got value: ).)*)?\Z', message, re.S
        ):
            return explain(f'Parser key "{option[2:]}.{inner[1]}":\n{inner[2]}', classes=False)
        if re.search(r"has no attribute|No module named", cause):
            given = re.search(r"Got value: (\S+)\Z", message)
            return f"{option}: no class named {given[1] if given else '?'!r} ({one_line(cause)})"
        given = re.search(r"class_path='([^']+)'", message)
        cls, cause = given[1].rpartition(".")[2] if given else "", one_line(cause)
    elif unknown := re.search(r"Expected a dot import path string: (\S+)", message):
        return f"{option}: no class named {unknown[1]!r} (give the name of a class it takes, or its import path)"
    else:
        return None
    if required := re.match(r"the following arguments are required: (.*)", cause):
        names = [name.strip() for name in required[1].split(",")]
        needed = " ".join(f"{option}.{name} VALUE" for name in names)
        return f"{option} {cls} needs {', '.join(names)}: add {needed}"
    if unaccepted := re.match(r"Option '(\w+)' is not accepted", cause):
        return f"{option}.{unaccepted[1]}: {cls} has no option {unaccepted[1]!r}"
    return f"{option} {cls}: {cause}"


def _option_of_type(message: str) -> str:
    """The option a type error without a parser key is about, from the types it names."""
    for pattern, option in (
        (r"callbacks\.callback\.Callback", "--trainer.callbacks"),
        (r"loggers\.logger\.Logger", "--trainer.logger"),
        (r"lr_scheduler", "--model.lr_scheduler"),
        (r"optim\.optimizer\.Optimizer", "--model.optimizer"),
    ):
        if re.search(pattern, message):
            return option
    return "an option"


def _option_names() -> list[str]:
    """Every --group.option the CLI takes, for suggestions on a misspelt one."""
    groups = {"model": LitMNIST, "data": MNISTDataModule, "checkpoint": Checkpoint, "trainer": Trainer}
    names = [f"--{g}.{p}" for g, cls in groups.items() for p in inspect.signature(cls.__init__).parameters]
    optimizer = [f"--model.optimizer.{name}" for name in GUIDE_SGD["init_args"]]  # --lr: --model.optimizer.lr
    general = ["--config", "--print_config", "--seed_everything", "--ckpt_path", "--weights_only", "--ddp_timeout"]
    return [*names, *optimizer, *general]


def error_line(err: BaseException) -> str | None:
    """The one line a user error is reported in (`error: ...`), or None for an error that is the program's own.
    Every line escapes control characters: it may name a file from elsewhere, whose name may hold a terminal's
    escape sequences (or a newline that would forge a second line)."""
    if isinstance(err, OSError):  # the machine's, not the program's: a full disk, a folder without write access
        where = f"{err.filename}: " if err.filename else ""
        return printable(f"error: {where}{err.strerror or one_line(str(err))}")
    if isinstance(err, argparse.ArgumentError):
        return printable(f"error: {explain(str(err), names=getattr(err, 'option_names', None))} (see --help)")
    if isinstance(err, ConfigError):
        return printable(f"error: {err} (see --help)")
    if isinstance(err, (UserError, MisconfigurationException)):
        return printable(f"error: {one_line(str(err))}")
    # their-words[lightning.val_check_interval]: a ValueError only this option's check raises
    if isinstance(err, ValueError) and "`val_check_interval`" in str(err):
        # Lightning checks val_check_interval against the epoch's batches only once the data is there
        return printable(f"error: --trainer.{one_line(str(err)).replace('`', '')}")
    return None


def config_key_error(message: str, args: list[str]) -> ConfigError | None:
    """An option a --config file sets that the subcommand does not take, named with its file and what was meant (a
    typo there got neither), or the file named as a sweep's config; None for any other error."""
    # their-words[jsonargparse.config-key]: a config file's key the subcommand does not take
    found = re.search(r"Subcommand '(\w+)' does not accept option '([^']+)'", message)
    if found is None:
        return None
    subcommand, key = found[1], found[2]
    for path in reversed(options.config_files(args)):
        config = options.read_yaml(path)
        if key.startswith("sweep.") and isinstance(config, dict) and "sweep" in config:
            return ConfigError(
                f"--config {path} is a sweep's config (it has a sweep: section): run it with `python -m mnist_lit"
                f" sweep --config {path}`"
            )
        if key in options.option_names(config):
            close = difflib.get_close_matches(f"--{key}", _option_names(), n=1, cutoff=0.75)
            hint = f"; did you mean {close[0].removeprefix('--')}?" if close else ""
            return ConfigError(f"--config {path}: {key} is not an option of {subcommand}{hint}")
    return None


def quiet_lightning() -> None:
    """Lightning's warnings and log lines that say nothing true about this project's runs, filtered out."""
    # Lightning's nags that say nothing about this run: an advert, and a deprecation inside Lightning itself.
    # their-words[lightning.warnings]: each filter below matches a message of Lightning's (or torch's, through it)
    for name in ("lightning.fabric.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero"):
        logging.getLogger(name).addFilter(lambda record: "💡" not in str(record.msg))
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    # test/validate/predict run without the fit-only curves callback whose state the checkpoint carries.
    # ... and a resume or test whose checkpoint callback had other settings: its state is keyed by them, and what a
    # resume needs of it (the random state, the epoch's place) rides at the checkpoint's top level instead.
    warnings.filterwarnings("ignore", message=r".*Please add the following callbacks: \[.*(TrainingCurves|Checkpoint)")
    # A new fit never writes over an earlier run's checkpoints (it is refused) and a resume expects them: Lightning's
    # "exists and is not empty" would only ever be seen about the run lock's own file.
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    # No validation set (val_size 0) is an empty list of loaders by design; and a run shorter than the logging
    # interval still gets its curve (TrainingCurves adds a point at the end): neither warning says anything true.
    warnings.filterwarnings("ignore", message=r"Total length of `list` across ranks is zero")
    warnings.filterwarnings("ignore", message=r"The number of training batches \(\d+\) is smaller than the logging")
    # On any machine with SLURM's tools installed (a cluster's login node, a laptop with slurm-wlm), every run not
    # started by srun is told to prepend srun, with a command line that is not the one typed (sys.argv[0] for
    # `-m mnist_lit`). A run that wanted several nodes and was not started on them stops after --ddp_timeout,
    # naming the processes that did not join; one that wanted one process is right as it is.
    warnings.filterwarnings("ignore", message=r"The `srun` command is available on your system but is not used")
