"""`python -m mnist_lit` and the `mnist-lit` command: the subcommands' registry, dispatch, and the one boundary
where every user error becomes one line on stderr and a non-zero exit status."""

from __future__ import annotations

import gc
import os
import signal
import sys
from collections.abc import Callable

from mnist_lit import USAGE
from mnist_lit.errors import write_line
from mnist_lit.signals import stop_at_once


def _lightning(args: list[str]) -> None:
    from mnist_lit.cli import run_lightning

    run_lightning(args)


def _own(command: str) -> Callable[[list[str]], None]:
    def run(args: list[str]) -> None:
        from mnist_lit.cli import run_command

        run_command(command, args)

    return run


def _sweep(args: list[str]) -> None:
    from mnist_lit.errors import ConfigError

    try:
        from mnist_lit.sweep import run_sweep
    except ImportError as err:  # optuna is an optional extra
        raise ConfigError(f"sweep needs {err.name}: pip install -e '.[sweep]' in the project's folder") from None
    run_sweep(args)


# What runs each of mnist_lit's own subcommands (mnist_lit.COMMANDS has every subcommand's line of help). Lightning's
# own, and any word that is none of these, go to LightningCLI whole: it parses the subcommand and says which it takes.
RUNNERS: dict[str, Callable[[list[str]], None]] = {"export": _own("export"), "serve": _own("serve"), "sweep": _sweep}


def run(args: list[str]) -> None:
    """Run one command line; a user error ends in one line on stderr and exit status 1 (SystemExit), or 74 for a file
    the machine could not write or read (EX_IOERR)."""
    from mnist_lit import signals
    from mnist_lit.cli import error_line
    from mnist_lit.errors import EX_IOERR, WriteFailed, printable

    runner = RUNNERS.get(args[0]) if args else None
    try:
        with signals.handling():  # Ctrl-C and SIGTERM: see mnist_lit.signals
            if runner is None:
                _lightning(args)
            else:
                runner(args[1:])
    except signals.Interrupted as err:
        write_line(f"\n{printable(str(err))}")
        sys.exit(128 + err.signum)  # the shell's convention for "ended by this signal"
    except Exception as err:
        if (line := error_line(err)) is None:
            raise
        if isinstance(err, (OSError, WriteFailed)):  # the machine's: a sweep resumes such a trial, not fails it
            write_line(line)
            sys.exit(EX_IOERR)
        sys.exit(line)


def main(args: list[str] | None = None) -> None:
    """The command: args, or the command line's. Every line it ends with reaches stderr in one write."""
    try:
        _main(sys.argv[1:] if args is None else args)
        sys.stdout.flush()  # here, where a closed pipe can still be answered quietly, not at interpreter exit
    except BrokenPipeError:  # `mnist-lit --help | head -3`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        sys.exit(141)  # 128 + SIGPIPE, what the shell reports for a command a closed pipe ended
    except SystemExit as exit_:
        if not isinstance(exit_.code, str):
            raise
        write_line(exit_.code)  # not Python's own printing, which writes the message and its newline apart
        sys.exit(1)


def _main(args: list[str]) -> None:
    # Listing the subcommands needs neither torch nor Lightning: answer at once instead of in seconds.
    if args in (["-h"], ["--help"]):
        print(USAGE)
        return
    if not args:
        sys.exit(f"{USAGE}\n\nerror: choose a subcommand")
    # Until the command line installs its own handler (after the imports), a signal stops at once, in one line
    # (mnist_lit.signals lists every place a signal is handled).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop_at_once)
    try:
        _import_uncollected()
        run(args)
    except KeyboardInterrupt as err:  # before anything was built: nothing to save
        signum = err.args[0] if err.args and isinstance(err.args[0], int) else signal.SIGINT
        write_line(f"\n{signal.Signals(signum).name}: stopped at once; nothing new was saved")
        sys.exit(128 + signum)


def _import_uncollected() -> None:
    """Import what every subcommand starts with (torch, Lightning, jsonargparse, the command line) with Python's cycle
    collector off, then freeze what the imports built.

    Those imports build ~400k objects that live as long as the process and make next to no garbage: the collector's
    passes over them, each longer than the last as they grow, freed next to nothing and made `fit --help` take 5.8 s
    against 3.7 s (medians of 7 runs alternated, 2 cores). Frozen (gc.freeze), they are left out of every later pass;
    what the command builds after is collected as usual (with the collector off until the command ends instead,
    the parser's own garbage piled up and `fit --help` took 4.6 s).
    """
    if "torch" in sys.modules:  # not a fresh process (a test calling main again): its objects are not all start-up's
        return
    gc.disable()
    try:
        import mnist_lit.cli  # noqa: F401
    finally:
        gc.freeze()
        gc.enable()


if __name__ == "__main__":
    main()
