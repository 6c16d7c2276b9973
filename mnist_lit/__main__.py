"""`python -m mnist_lit` and the `mnist-lit` command."""

from __future__ import annotations

import os
import signal
import sys

from mnist_lit import USAGE
from mnist_lit.signals import stop_at_once


def main() -> None:
    try:
        _main()
        sys.stdout.flush()  # here, where a closed pipe can still be answered quietly, not at interpreter exit
    except BrokenPipeError:  # `mnist-lit --help | head -3`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        sys.exit(141)  # 128 + SIGPIPE, what the shell reports for a command a closed pipe ended


def _main() -> None:
    args = sys.argv[1:]
    # Listing the subcommands needs neither torch nor Lightning: answer at once instead of in seconds.
    if args in (["-h"], ["--help"]):
        print(USAGE)
        return
    if not args:
        sys.exit(f"{USAGE}\n\nerror: choose a subcommand")
    # Until the command line installs its own handler (after the imports), a signal stops at once, in one line
    # (mnist_lit.signals lists every place a signal is handled).
    signal.signal(signal.SIGTERM, stop_at_once)
    try:
        from mnist_lit.cli import main as run

        run()
    except KeyboardInterrupt as err:  # before anything was built: nothing to save
        signum = err.args[0] if err.args and isinstance(err.args[0], int) else signal.SIGINT
        print(f"\n{signal.Signals(signum).name}: stopped at once; nothing new was saved", file=sys.stderr)
        sys.exit(128 + signum)


if __name__ == "__main__":
    main()
