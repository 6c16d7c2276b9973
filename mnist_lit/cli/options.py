"""The command line's words before jsonargparse parses them: the options' old names, the --config files (read and
bounded by the one reader of config files, errors named by file and line, class paths checked as data), and a
--config that overrides options given before it."""

from __future__ import annotations

import os
import re
import shlex
import sys
from typing import Any

import yaml

from mnist_lit.errors import ConfigError, Untrusted, one_line
from mnist_lit.trust import KINDS, check_spec, trust_command_line

# The options before the optimizer became injectable still mean the guide's SGD's own (on the command line; in
# YAML it is model.optimizer.init_args.lr).
RENAMED = (("--model.lr", "--model.optimizer.lr"), ("--model.momentum", "--model.optimizer.momentum"))


def checked_args(args: list[str]) -> list[str]:
    """The command line as jsonargparse is to parse it, its files checked first; a warning line for every --config
    that overrides options given before it (jsonargparse applies the words in order: the last one wins)."""
    for old, new in RENAMED:
        args = [new + a[len(old) :] if a == old or a.startswith(f"{old}=") else a for a in args]
    trust_command_line(args)
    for path in config_files(args):
        check_config_file(path)
    for path in other_yaml_files(args):  # --data FILE, --model.optimizer FILE: jsonargparse loads them too
        read_nested_yaml(path)
    warn_overridden(args)
    return args


YAML_SUFFIXES = (".yaml", ".yml", ".json")


def other_yaml_files(args: list[str]) -> list[str]:
    """Files of options given as the value of an option other than --config (jsonargparse takes a group's or a
    class's options from a file: --data my_data.yaml, --model.optimizer adam.yaml)."""
    values = [a.partition("=")[2] if "=" in a else b for a, b in zip(args, [*args[1:], ""], strict=True)
              if a.startswith("--") and a != "--config" and not a.startswith("--config=")]  # fmt: skip
    return [v for v in values if v.lower().endswith(YAML_SUFFIXES) and os.path.isfile(v)]


def read_nested_yaml(path: str, depth: int = 0) -> Any:
    """A file of options through the one reader, and every file of options it names in turn (a value that is the
    path of a YAML file, which jsonargparse would load), each bounded, at most 5 files deep."""
    config = read_yaml(path)
    if depth >= 5:
        raise ConfigError(f"--config {path}: names files of options over 5 deep")
    stack = [config]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            stack += list(value.values())
        elif isinstance(value, list):
            stack += value
        elif isinstance(value, str) and value.lower().endswith(YAML_SUFFIXES):
            for candidate in (value, os.path.join(os.path.dirname(path), value)):
                if os.path.isfile(candidate):
                    read_nested_yaml(candidate, depth + 1)
                    break
    return config


def config_files(args: list[str]) -> list[str]:
    """The files --config names on a command line."""
    return [path for _, path in _configs(args)]


def _configs(args: list[str]) -> list[tuple[int, str]]:
    """(position, file) of each --config on a command line."""
    found = []
    for i, arg in enumerate(args):
        if arg == "--config" and i + 1 < len(args):
            found.append((i, args[i + 1]))
        elif arg.startswith("--config="):
            found.append((i, arg.partition("=")[2]))
    return found


# What a --config file may be: a few options, not a data set. Bounded here, before anything parses it further (a
# YAML alias "bomb" of 850 bytes names a billion values, and jsonargparse would walk them all).
MAX_CONFIG_BYTES = 2**20
MAX_CONFIG_VALUES = 100_000  # counted as they are used: an alias counts every time it is named
MAX_CONFIG_DEPTH = 50


def read_yaml(path: str) -> Any:
    """A --config file's contents, the one reader of config files: UTF-8 YAML, bounded in size, nesting and the
    values its aliases expand to, every error one line naming the file (and the line, for YAML's own). None where
    the file cannot be read at all: jsonargparse says why."""
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        return None  # jsonargparse says so, as for any other file it cannot find
    except OSError as err:
        raise ConfigError(f"--config {path}: {err.strerror}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"--config {path}: over {MAX_CONFIG_BYTES // 2**20} MiB, not a file of options")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"--config {path}: not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}:" if mark is not None else ""
        problem = getattr(err, "problem", None) or one_line(str(err))
        raise ConfigError(f"--config {path}:{where} not valid YAML ({problem})") from None
    except RecursionError:
        raise ConfigError(f"--config {path}: nested over {MAX_CONFIG_DEPTH} deep") from None
    except (ValueError, TypeError) as err:  # a value YAML's own types refuse, a date of month 13 say
        raise ConfigError(f"--config {path}: not valid YAML ({one_line(str(err))})") from None
    if problem := _oversized(config):
        raise ConfigError(f"--config {path}: {problem}")
    return config


def _oversized(config: Any) -> str | None:
    """Why a loaded config is too large to be options (None: it is not), walked with a budget: an alias counts
    every time it is named, as jsonargparse would walk it."""
    budget = MAX_CONFIG_VALUES
    stack = [(config, 0)]
    while stack:
        value, depth = stack.pop()
        budget -= 1
        if budget < 0:
            return f"over {MAX_CONFIG_VALUES:,} values (counting each use of an alias), not a file of options"
        if depth > MAX_CONFIG_DEPTH:
            return f"nested over {MAX_CONFIG_DEPTH} deep"
        if isinstance(value, dict):
            stack += [(item, depth + 1) for pair in value.items() for item in pair]
        elif isinstance(value, list):
            stack += [(item, depth + 1) for item in value]
    return None


def check_config_file(path: str) -> None:
    """A --config file's class paths for the model's optimizer and schedule, checked as a checkpoint's are
    (mnist_lit.trust) before jsonargparse imports or calls what they name; the files it names read as it is."""
    config = read_nested_yaml(path)
    model = config.get("model") if isinstance(config, dict) else None
    if not isinstance(model, dict):
        return
    for field in KINDS:
        try:
            check_spec(field, model.get(field), partial=True)
        except Untrusted as err:
            raise ConfigError(f"--config {path}: {err}") from None


def given_in_config(args: list[str], key: str) -> bool:
    """Whether a --config file on the command line sets key (a top-level name such as seed_everything)."""
    return any(isinstance(c := read_yaml(path), dict) and key in c for path in config_files(args))


def option_names(config: Any, prefix: str = "") -> list[str]:
    """The option names a YAML mapping sets, as on the command line: trainer.max_epochs, model.optimizer.lr (a
    class's init_args are its options; its class_path is the option itself)."""
    if not isinstance(config, dict):
        return [prefix] if prefix else []
    names = []
    for key, value in config.items():
        if key == "init_args":
            names += option_names(value, prefix)
        elif key == "class_path":
            names.append(prefix)
        else:
            names += option_names(value, f"{prefix}.{key}" if prefix else str(key))
    return names


def warn_overridden(args: list[str]) -> None:
    """One line on stderr for each --config that sets options given before it on the command line, naming them:
    the file wins there, which is seldom what was meant. Said once: not again by each process of a DDP run."""
    if os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("NODE_RANK", "0") != "0":
        return
    for position, path in _configs(args):
        in_file = set(option_names(read_yaml(path)))
        before = [m[1] for a in args[:position] if (m := re.match(r"--([\w.]+)(?:=|$)", a)) and m[1] != "config"]
        overridden = [
            f"--{name}" for name in dict.fromkeys(before)
            if any(name == n or name.startswith(f"{n}.") or n.startswith(f"{name}.") for n in in_file)
        ]  # fmt: skip
        if overridden:
            them, s = ("it", "") if len(overridden) == 1 else ("them", "s")
            print(
                f"warning: --config {path} comes after {', '.join(overridden)} and sets {them} again, so the file's"
                f" value{s} {'is' if not s else 'are'} used: put --config first for the option{s} to win",
                file=sys.stderr,
            )


def origin(args: list[str], name: str) -> str | None:
    """Where the command line sets an option (name: trainer.accelerator): "--trainer.accelerator gpu", or "--config
    FILE" for a file that sets it; the last of them, the one that wins. None: its default."""
    found = None
    for i, arg in enumerate(args):
        if arg == f"--{name}" and i + 1 < len(args):
            found = f"--{name} {args[i + 1]}"
        elif arg.startswith(f"--{name}="):
            found = f"--{name} {arg.partition('=')[2]}"
        elif (path := dict(_configs(args)).get(i)) is not None and name in option_names(read_yaml(path)):
            found = f"--config {path}"
    return found


def resume_command(args: list[str]) -> str:
    """The command that resumes a fit started with args, in the folder it was started in: the same options (the
    run's root and config files among them), --ckpt_path last in place of any --ckpt_path, and no --model.init_from
    (a resume takes its weights from the run itself)."""
    words, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in ("--ckpt_path", "--model.init_from"):
            skip = True
        elif not arg.startswith(("--ckpt_path=", "--model.init_from=")):
            words.append(arg)
    return shlex.join(["python", "-m", "mnist_lit", *words, "--ckpt_path", "last"])
