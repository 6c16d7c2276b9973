"""Signals, process-wide: who handles SIGINT and SIGTERM when, and how a process dies with its parent.

Where each signal is handled, and why:

- `python -m mnist_lit` starts (__main__.py, before the slow imports): `stop_at_once` takes SIGINT and SIGTERM and
  ends the process there, in one line ("stopped at once; nothing new was saved") and status 128 + signal, instead
  of Python's silent death or a KeyboardInterrupt lost inside an import.
- Any command (mnist_lit.__main__.run, `handling()`): `_on_signal` owns SIGINT and SIGTERM until the command
  ends, then the handlers before it come back. It raises `Interrupted`: one line and the shell's status 128 + signal.
- A fit's training loop (checkpoints.Checkpoint, `arm`/`disarm`): the armed callback takes the first signal and
  stops at the next batch boundary with a checkpoint (under DDP every process stops at the same batch); a second
  signal, or one before or after the loop, stops at once, naming the newest checkpoint saved.
- Lightning's own SIGTERM handler is switched off (`silence_lightning`): it broadcasts from inside the handler (one
  signalled DDP process hangs every process) and ends the run with exit status 0.
- A fit in a SLURM job (mnist_lit.slurm): SLURM's warning of the job's end (`--signal`; SIGUSR1 unless
  Lightning's SLURMEnvironment names another) is handled as SIGTERM is (`stop_on_warning`), then the job requeued.
  Lightning's own handler for it is off with the rest (it saves from inside the handler).
- serve (serve.py): its main process turns SIGTERM into Ctrl-C (`stop_server_on_signals`), which LitServer
  handles by stopping its processes; those it forks keep SIGTERM's default and die with their parent
  (`die_with_parent`, PR_SET_PDEATHSIG); the model processes ignore SIGINT (the main process stops them).
- sweep (sweep/worker.py, its own): the sweep passes a signal on to its trials' fits and waits for their
  checkpoints; each trial's fit dies with its worker thread's process (the same PDEATHSIG, in _ORPHAN_GUARD).

Imports nothing heavy: __main__ uses it before torch is imported.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any, Protocol

from mnist_lit.errors import write_line

STOPPING = (signal.SIGINT, signal.SIGTERM)
PR_SET_PDEATHSIG = 1  # prctl option, from <linux/prctl.h>


class Interrupted(Exception):
    """A command stopped on Ctrl-C or SIGTERM; the message says what was saved."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


class Catcher(Protocol):
    """A fit's checkpoint callback, as the handler sees it."""

    def catch(self, signum: int) -> bool: ...  # take the signal: True to stop at the next batch, False if not

    def newest_saved(self) -> str | None: ...


_warning: dict[int, Any] = {}  # SLURM's warning signal for this command, if taken -> its handler before
_warned = False  # the warning came during this command: the end it announces follows as SIGTERM
# Set by a process that runs fits and manages their stops (the sweep, for its trials), which may pass on a signal
# that SLURM also sent them directly: there a second signal while training stops is the same stop, not one to stop
# at once, and a SLURM job is the manager's to requeue (mnist_lit.slurm).
MANAGED_ENV = "MNIST_LIT_MANAGED"
_catcher: Catcher | None = None  # the callback whose training loop takes the next signal, if any
_saver: Catcher | None = None  # the callback of this process's fit, armed or not: what it saved, for the message


def stop_at_once(signum: int, frame: FrameType | None) -> None:
    """Until a command installs its handler: stop at once, in one line, with the shell's status for the signal.

    The process ends here, before anything is built. An exception raised this early is not reliable: one raised in
    a callback of the import machinery is printed and dropped (the command ran on), and one raised inside torch's
    initialisation can leave Python exiting as if killed by SIGINT after the line was printed."""
    write_line(f"\n{signal.Signals(signum).name}: stopped at once; nothing new was saved")
    os._exit(128 + signum)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    if signum in _warning:
        warned()
    if _catcher is not None and (_catcher.catch(signum) or os.environ.get(MANAGED_ENV)):
        return
    newest = _saver.newest_saved() if _saver is not None else None  # also after training, while figures are drawn
    done = f"the newest checkpoint is {newest}" if newest else "nothing new was saved"
    raise Interrupted(f"{signal.Signals(signum).name}: stopped at once; {done}", signum)


@contextlib.contextmanager
def handling() -> Iterator[None]:
    """SIGINT and SIGTERM handled by mnist_lit for the length of a command, then as they were (SIGTERM ignored
    instead, once SLURM's warning came: see stop_on_warning)."""
    global _saver, _warned
    _saver, _warned = None, False  # a new command: nothing of its own saved yet
    previous = {sig: signal.signal(sig, _on_signal) for sig in STOPPING}
    try:
        yield
    finally:
        for sig, handler in [*_warning.items(), *previous.items()]:  # the warning first: once SIGTERM is
            # no longer ours, a late warning must not reach _on_signal (it would set SIGTERM again)
            signal.signal(sig, handler)
        _warning.clear()
        if _warned:  # the process exits next, and SLURM's SIGTERM may come while it does
            signal.signal(signal.SIGTERM, signal.SIG_IGN)


def warned() -> None:
    """SLURM's warning came: the end it announces (the requeue this process asks for, the time limit) comes as
    SIGTERM while the process stops, and would cut it short before its last line. Ignored until the process exits;
    SIGKILL still ends it."""
    global _warned
    _warned = True
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def stop_on_warning(signum: int) -> None:
    """SLURM's warning before the end of a job (mnist_lit.slurm) handled as SIGTERM is, until the command ends.
    Once it came, SIGTERM is ignored until the process exits (see warned)."""
    if signum not in _warning:
        _warning[signum] = signal.signal(signum, _on_signal)


def arm(catcher: Catcher) -> None:
    """A training loop starts: catcher takes the next signal."""
    global _catcher, _saver
    _catcher = _saver = catcher


def disarm(catcher: Catcher) -> None:
    """The training loop ends (or failed): signals stop at once again."""
    global _catcher
    if _catcher is catcher:
        _catcher = None


def silence_lightning(trainer: Any) -> None:
    """Lightning's own SIGTERM handler never installed for this trainer (see the index above);
    tests/checkpoints/test_faults.py checks the run ends as ours says."""
    # private-lightning[Trainer._signal_connector]: no public switch for Lightning's own SIGTERM handler
    trainer._signal_connector.register_signal_handlers = lambda: None


def die_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this process as soon as its parent ends, however it ends (serve's main process
    SIGKILLed, say, which cannot stop its children itself); and end now if the parent already has."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux: nothing to ask for
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent ended before the request above: nobody would stop this one
        os.kill(os.getpid(), signal.SIGKILL)


_forking = 0  # the process that forks, as its child sees it


def _before_fork() -> None:
    global _forking
    _forking = os.getpid()


def children_die_with_this_process() -> None:
    """Every process forked from here on dies with the process that forked it."""
    os.register_at_fork(before=_before_fork, after_in_child=lambda: die_with_parent(_forking))


def stop_server_on_signals(on_stop: Callable[[], None]) -> None:
    """SIGTERM (docker stop, kill) and SIGINT raise KeyboardInterrupt in this process, which LitServer answers by
    stopping its processes cleanly; on_stop is told first. Its forked processes inherit the handler: there it
    restores SIGTERM's default and dies of the signal."""
    main = os.getpid()

    def stop(signum: int, frame: FrameType | None) -> None:
        if os.getpid() == main:
            on_stop()
            raise KeyboardInterrupt
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    for sig in STOPPING:
        signal.signal(sig, stop)


def ignore_ctrl_c() -> None:
    """A serve model process: Ctrl-C, sent to the whole process group, would interrupt it inside LitServe's queue
    read and print a traceback; the main process stops it (SIGTERM) instead."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
