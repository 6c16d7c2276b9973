"""mnist_lit's own subcommands beside Lightning's, export and serve: functions whose typed, documented parameters
are their options and their --help (jsonargparse reads them); `run_command` parses a command line for one. Their
errors are raised, and reported as one line by mnist_lit.__main__ with every other."""

from __future__ import annotations

import inspect
import re
import socket
import sys
from argparse import ArgumentError
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from jsonargparse import ArgumentParser
from jsonargparse.typing import PositiveInt, restricted_number_type

from mnist_lit.checkpoints import checkpoint_dir
from mnist_lit.errors import CheckpointError, ConfigError

# The ranges of serve's options, checked by jsonargparse as it parses them (cli/messages.py describes each type)
Port = restricted_number_type("Port", int, [(">=", 1024), ("<=", 65535)])
BatchTimeout = restricted_number_type("BatchTimeout", float, [(">=", 0), ("<", 1)])
BodyTimeout = restricted_number_type("BodyTimeout", float, [(">", 0), ("<=", 3600)])


def export(ckpt_path: str, output: Path, default_root_dir: str = ".") -> None:
    """Write a trained Net for deployment: .pth (the guide's plain state_dict) or .onnx.

    Args:
        ckpt_path: A checkpoint file, or 'last'.
        output: File to write; its extension picks the format.
        default_root_dir: The run's folder, as in fit: 'last' is <this>/checkpoints/last.ckpt.
    """
    from mnist_lit.export import export as write

    print(write(ckpt_path, Path(output), checkpoint_dir(default_root_dir, None)))


def serve(
    ckpt_path: str | None = None,
    default_root_dir: str = ".",
    host: Literal["127.0.0.1", "0.0.0.0", "::"] = "127.0.0.1",
    port: Port = 8000,
    max_batch_size: PositiveInt = 1,
    batch_timeout: BatchTimeout = 0.005,
    workers: PositiveInt = 1,
    accelerator: Literal["auto", "cpu", "cuda", "mps"] = "auto",
    body_timeout: BodyTimeout = 30.0,
) -> None:
    """Serve a trained Net with LitServe: a page to draw digits on at /, POST /predict, GET /health.

    Args:
        ckpt_path: A checkpoint file, 'last', or a .pth that export wrote.
        default_root_dir: Where 'last' is: <this>/checkpoints/last.ckpt.
        host: Interface to listen on (127.0.0.1: this machine only; 0.0.0.0 or :: let any machine in).
        port: 1024 to 65535.
        max_batch_size: Run up to this many waiting requests as one batch (1: no batching, as it was not
            consistently faster on a 2-core CPU, and a batching worker polls its queue even when idle).
        batch_timeout: Seconds a batch waits to fill.
        workers: Model processes per device, and as many HTTP server processes.
        accelerator: Where the model runs (auto: a GPU if there is one).
        body_timeout: Seconds a request's body may take to arrive (a client that stalls is answered 408).
    """
    if ckpt_path is None:
        raise CheckpointError("serve needs trained weights: pass --ckpt_path last or a checkpoint file")
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(accelerator, True):  # LitServe would fail later, with a traceback
        raise ConfigError(f"--accelerator {accelerator}: this machine has no such device")
    try:
        from mnist_lit.serve import load_net
        from mnist_lit.serve import serve as run_server
    except ImportError as err:  # litserve is an optional extra
        raise ConfigError(f"serve needs {err.name}: pip install -e '.[serve]' in the project's folder") from None
    net, dataset, ckpt_path = load_net(ckpt_path, checkpoint_dir(default_root_dir, None))
    # Checked here, before any process starts: uvicorn would report a port in use as a log line and exit.
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            sock.bind((host, port))
        except OSError as err:
            raise ConfigError(f"--port: cannot listen on {host} port {port}: {err.strerror}") from None
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}/"
    print(f"serving {ckpt_path} at {url} in a few seconds; Ctrl-C stops", file=sys.stderr)
    # plain numbers: jsonargparse's range types are made at run time, and the server's processes cannot unpickle them
    run_server(
        net, dataset, host, int(port), int(max_batch_size), float(batch_timeout), int(workers), accelerator,
        float(body_timeout),
    )  # fmt: skip
    print("stopped", file=sys.stderr)


ENTRIES: dict[str, Callable[..., None]] = {"export": export, "serve": serve}


def run_command(command: str, args: list[str]) -> None:
    """Parse args for export or serve and run it."""
    function = ENTRIES[command]
    doc = function.__doc__ or ""
    # no abbreviations, as for fit: --out must not silently mean --output
    parser = ArgumentParser(
        prog=f"python -m mnist_lit {command}", description=doc.split("\n")[0], exit_on_error=False, allow_abbrev=False
    )
    parser.add_function_arguments(function, as_group=False, skip={"default_root_dir"})
    # The run's folder under the name fit gives it, its help from the function's docstring
    folder = re.search(r"default_root_dir: (.*)", doc)
    parser.add_argument("--trainer.default_root_dir", default=".", help=folder[1] if folder else None)
    try:
        options = parser.parse_args(args).as_dict()
    except ArgumentError as err:  # reported by mnist_lit.__main__, with a "did you mean" among this command's options
        names = [f"--{name}" for name in inspect.signature(function).parameters if name != "default_root_dir"]
        err.option_names = [*names, "--trainer.default_root_dir"]  # type: ignore[attr-defined]
        raise
    options["default_root_dir"] = options.pop("trainer")["default_root_dir"]
    function(**options)
