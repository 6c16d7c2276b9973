"""Every kind of error a user can cause, and how any message reaches the terminal: as one line, with whatever came
from elsewhere (a file's name, a library's text) escaped. Imports nothing of mnist_lit, so every module may use it.

The command line's boundary (mnist_lit.__main__) turns a UserError into `error: <message>` and exit status 1 (74 for
the machine's: a file it could not write)."""

from __future__ import annotations

import re
import sys


class UserError(Exception):
    """A failure the user caused or can fix; its message says which and how, in one line."""


class ConfigError(UserError, ValueError):
    """The options parsed, but what they ask for cannot be done (a value out of range, a device this machine lacks)."""


class DataError(UserError, RuntimeError):
    """A problem with the data that the user can fix; its message says how."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used or written; the message says which and why."""


class WriteFailed(CheckpointError):
    """A checkpoint the machine could not write (a full disk, a folder without write access): what was saved before
    it is intact, so the same command resumes once the machine is fixed. Exit status EX_IOERR (74), not 1."""


EX_IOERR = 74  # sysexits.h: an error doing I/O on a file; a sweep takes a trial that ends so as stopped, not failed


class ExportError(UserError, RuntimeError):
    """An export that cannot be done or did not check out; the message says why."""


class Diverged(UserError, RuntimeError):
    """Training produced weights that are not finite numbers; they were not saved."""


class PeerLost(UserError, RuntimeError):
    """Another process of a DDP run stopped, so this one cannot go on."""


class Untrusted(ValueError):
    """A file from elsewhere names something it may not: the message says what, and how to allow it."""


def one_line(message: str) -> str:
    """A message of several lines (a library's, say) as one."""
    return re.sub(r"\s*\n\s*", " ", message.strip())


def first_line(err: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def printable(text: str) -> str:
    """Text from elsewhere (a file's name, a study's record), safe to print as one line: control characters (a
    newline, a terminal's escape sequences) shown escaped."""
    return re.sub(r"[\x00-\x1f\x7f-\x9f]", lambda m: f"\\x{ord(m[0]):02x}", text)


def write_line(line: str) -> None:
    """One line to stderr in one write. The processes of a DDP run share one stream (torchrun's, srun's), and Python
    writes `sys.exit(message)`'s message and its newline apart: two processes' lines ran together in CI."""
    sys.stderr.write(f"{line}\n")
    sys.stderr.flush()
