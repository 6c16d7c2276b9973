"""`python -m mnist_lit` and the `mnist-lit` command: the subcommands' registry, dispatch, and the one boundary
where every user error becomes one line on stderr and a non-zero exit status."""

from __future__ import annotations

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
        run(args)
    except KeyboardInterrupt as err:  # before anything was built: nothing to save
        signum = err.args[0] if err.args and isinstance(err.args[0], int) else signal.SIGINT
        write_line(f"\n{signal.Signals(signum).name}: stopped at once; nothing new was saved")
        sys.exit(128 + signum)


if __name__ == "__main__":
    main()
