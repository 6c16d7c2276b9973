"""A PostgreSQL server of the sweep tests' own."""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from helpers.server import free_port


def _postgres_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@pytest.fixture
def postgres():
    """A PostgreSQL server of its own, on a Unix socket in a temporary folder (no TCP), stopped and removed after
    the test, whatever happens: yields the storage URL of an empty database."""
    pytest.importorskip("psycopg", reason="psycopg is not installed: pip install -e '.[sweep]'")
    bindir = _postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL's server binaries are not installed (Debian: apt-get install postgresql)")
    as_user: list[str] = []
    user = getpass.getuser()
    if os.geteuid() == 0:  # initdb refuses root: run the server as Debian's postgres user
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser: cannot start PostgreSQL as another user")
        as_user, user = ["runuser", "-u", "postgres", "--"], "postgres"
    folder = Path(tempfile.mkdtemp(prefix="mnist_lit_pg"))
    folder.chmod(0o755)
    if as_user:
        shutil.chown(folder, "postgres")
    data, port = folder / "data", free_port()

    def pg(*command: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([*as_user, *command], capture_output=True, text=True, timeout=timeout, check=True)

    try:
        pg(str(bindir / "initdb"), "-D", str(data), "--auth=trust", "-U", user, timeout=120)
        options = f"-c listen_addresses='' -k {folder} -p {port}"
        pg(str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(folder / "log"), "-w", "start")
        pg(str(bindir / "createdb"), "-h", str(folder), "-p", str(port), "-U", user, "sweep")
        yield f"postgresql://{user}@/sweep?host={folder}&port={port}"
    finally:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            pg(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(folder, ignore_errors=True)
