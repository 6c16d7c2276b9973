"""Two machines on one: two Linux network namespaces joined by a veth pair, each a node of a DDP run.

Each node runs its commands in its own network namespace, with its own hostname (a UTS namespace) and its own
/etc/hosts (bind-mounted in a mount namespace), and shares the file system with the other: one folder holds the
data and the checkpoints, as nodes on a shared file system see them. Needs root and iproute2's `ip`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers.cli import QUIET, SYNTHETIC

ROOT = Path(__file__).resolve().parents[2]
SUBNET = "10.213.0"  # only ever inside the namespaces made here
MASTER_PORT = 29500


def unavailable() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "unshare", "mount", "hostname"):
        if shutil.which(tool) is None:
            return f"`{tool}` is missing (apt-get install iproute2 util-linux hostname)"
    probe = f"mnlprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot make a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


class Node:
    def __init__(self, namespace: str, veth: str, address: str, hostname: str, hosts: Path) -> None:
        self.namespace, self.veth, self.address, self.hostname, self.hosts = namespace, veth, address, hostname, hosts
        self.processes: list[subprocess.Popen] = []

    def start(self, command: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
        """command in this node's namespaces, in a process group of its own, in log's folder (not this checkout:
        `python -m` would import the package from the working directory), its output in log."""
        inside = 'hostname "$1" && mount --bind "$2" /etc/hosts && shift 2 && exec "$@"'
        wrapped = ["ip", "netns", "exec", self.namespace, "unshare", "--uts", "--mount", "--propagation", "private",
                   "sh", "-c", inside, "sh", self.hostname, str(self.hosts), *command]  # fmt: skip
        with log.open("w") as out:
            process = subprocess.Popen(wrapped, cwd=log.parent, env=env, stdout=out, stderr=subprocess.STDOUT,
                                       start_new_session=True)  # fmt: skip
        self.processes.append(process)
        return process

    def pids(self) -> list[int]:
        """Every process in this node's network namespace (zombies, ended but not yet reaped, left out)."""
        listed = subprocess.run(["ip", "netns", "pids", self.namespace], capture_output=True, text=True, timeout=30)
        alive = []
        for pid in map(int, listed.stdout.split()):
            with contextlib.suppress(OSError):
                if "\tZ" not in Path(f"/proc/{pid}/status").read_text():
                    alive.append(pid)
        return alive

    def kill(self) -> None:
        """The node vanishes: every process in it SIGKILLed at once."""
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for process in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(10)

    def cut(self) -> None:
        """The node's network link goes down: nothing is sent to the other node any more, not even a reset."""
        ip("-n", self.namespace, "link", "set", self.veth, "down")

    def wait_gone(self, timeout: float) -> float | None:
        """Seconds until no process is left in this node, None if some still are after timeout."""
        return wait_gone([self], timeout)[0]


def wait_gone(nodes: list[Node], timeout: float) -> list[float | None]:
    """Seconds until no process is left in each node, None for one where some still are after timeout."""
    start = time.monotonic()
    gone: list[float | None] = [None] * len(nodes)
    while time.monotonic() - start < timeout and None in gone:
        for i, node in enumerate(nodes):
            for process in node.processes:
                process.poll()  # reaps the launcher
            if gone[i] is None and not node.pids():
                gone[i] = time.monotonic() - start
        time.sleep(0.1)
    return gone


class TwoNodes:
    """Two namespaces joined by a veth pair. hostnames: "own" (each node's hostname resolves to its address),
    or "loopback" (one /etc/hosts shared by both, where their common hostname resolves to a loopback address)."""

    made_here = 0  # beds made by this process: each gets names of its own

    def __init__(self, folder: Path, hostnames: str) -> None:
        TwoNodes.made_here += 1
        tag = f"{os.getpid() % 100000}{TwoNodes.made_here % 100}"  # names of at most 15 characters
        folder.mkdir(parents=True, exist_ok=True)
        self.nodes: list[Node] = []
        if hostnames == "own":
            hosts = folder / "hosts"
            hosts.write_text(f"127.0.0.1 localhost\n{SUBNET}.1 node0\n{SUBNET}.2 node1\n")
            names, files = ["node0", "node1"], [hosts, hosts]
        else:
            hosts = folder / "hosts"
            hosts.write_text("127.0.0.1 localhost node\n")  # the machine's name is a loopback address
            names, files = ["node", "node"], [hosts, hosts]
        for i in range(2):
            self.nodes.append(Node(f"mnl{tag}n{i}", f"mnl{tag}v{i}", f"{SUBNET}.{i + 1}", names[i], files[i]))
        self.made: list[str] = []

    def __enter__(self) -> TwoNodes:
        try:
            a, b = self.nodes
            for node in self.nodes:
                ip("netns", "add", node.namespace)
                self.made.append(node.namespace)
            ip("link", "add", a.veth, "type", "veth", "peer", "name", b.veth)
            for node in self.nodes:
                ip("link", "set", node.veth, "netns", node.namespace)
                ip("-n", node.namespace, "addr", "add", f"{node.address}/24", "dev", node.veth)
                ip("-n", node.namespace, "link", "set", node.veth, "up")
                ip("-n", node.namespace, "link", "set", "lo", "up")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for node in self.nodes:
            if node.namespace in self.made:
                node.kill()
        for namespace in self.made:
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=30)
        self.made = []


def env(root: Path = ROOT) -> dict[str, str]:
    """The environment of a node's commands: this checkout's mnist_lit, one thread per process."""
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "VIRTUAL_ENV")
    return {**{k: v for k, v in os.environ.items() if k in keep}, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1",
            "PYTHONWARNINGS": "ignore"}  # fmt: skip


def torchrun(node_rank: int, nproc: int, *args: str, elastic: int | None = None) -> list[str]:
    """torchrun on one of two nodes, running args: a static rendezvous at the first node, or with elastic=N a c10d
    rendezvous there and up to N restarts."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", str(nproc)]
    if elastic is None:
        command += ["--node_rank", str(node_rank), "--master_addr", f"{SUBNET}.1", "--master_port", str(MASTER_PORT)]
    else:
        command += ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"{SUBNET}.1:{MASTER_PORT}", "--rdzv-id", "mnist",
                    "--max-restarts", str(elastic)]  # fmt: skip
    return [*command, *args]


# --- runs across the two nodes, as the tests start them ---------------------------------------------------------

NODES = ["--trainer.strategy", "ddp", "--trainer.accelerator", "cpu", "--trainer.num_nodes", "2"]
LIMIT = 180  # seconds any one command of these tests may take


def fit(data: Path, root: Path, *extra: str) -> list[str]:
    return ["fit", "--data.data_dir", str(data), *SYNTHETIC, *QUIET, *NODES, "--trainer.default_root_dir", str(root),
            "--checkpoint.every_n_train_steps", "3", "--trainer.max_epochs", "3", *extra]  # fmt: skip


def launch(
    bed: TwoNodes,
    folder: Path,
    *commands: list[str],
    environment: dict | None = None,
    nproc: int = 1,
    elastic: int | None = None,
) -> list[subprocess.Popen]:
    """One command per node (or the same on both), under torchrun with nproc processes (see torchrun for elastic),
    in environment (env()'s by default); logs in folder/node<I>.log."""
    folder.mkdir(parents=True, exist_ok=True)
    commands = commands * 2 if len(commands) == 1 else commands
    return [
        node.start(torchrun(i, nproc, *command, elastic=elastic), folder / f"node{i}.log", environment or env())
        for i, (node, command) in enumerate(zip(bed.nodes, commands, strict=True))
    ]  # fmt: skip


def mnist_lit(*args: str) -> list[str]:
    return ["-m", "mnist_lit", *args]


def finish(processes: list[subprocess.Popen], folder: Path, timeout: float = LIMIT) -> list[int]:
    deadline = time.monotonic() + timeout
    for process in processes:
        try:
            process.wait(max(1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pytest.fail(f"a node ran past {timeout} s: {logs(folder)[-3000:]}")
    return [process.returncode for process in processes]


def logs(folder: Path) -> str:
    return "\n".join(f"--- {log.name}\n{log.read_text()}" for log in sorted(folder.glob("node*.log")))


def weights(root: Path) -> dict[str, torch.Tensor]:
    return torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


def reference_run(folder: Path, data: Path) -> Path:
    """An uninterrupted two-node run of fit()'s training, in folder: how every interrupted one must end."""
    with TwoNodes(folder / "bed", "own") as bed:
        codes = finish(launch(bed, folder, mnist_lit(*fit(data, folder))), folder)
    assert codes == [0, 0], logs(folder)[-3000:]
    return folder
