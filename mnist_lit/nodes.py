"""Runs on several machines: the address each node advertises, how long a collective waits for a lost node, what
a lost node looks like, and that every node resumes from the same checkpoint."""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import re
import socket
import struct
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from mnist_lit.checkpoints import DIGEST_KEY, load_checkpoint
from mnist_lit.errors import CheckpointError, one_line

# Long enough for what makes processes wait for each other in a healthy run (a checkpoint on a slow shared disk,
# loading the data, a validation); short enough that a lost node ends the run in minutes, not gloo's 30.
DEFAULT_TIMEOUT = 120.0
TIMEOUT_HELP = (
    "Seconds a process of a DDP run (several processes or nodes) waits in a collective for the others before the"
    " run stops, naming what was lost (default: 120). A node that vanishes without a word (its network cut, its"
    " machine off) is noticed this long after; a shorter value notices it sooner but stops a healthy run whose"
    " processes fall that far out of step (a first run that downloads MNIST while the others wait, a slow shared"
    " disk). A process that dies is noticed at once, whatever this is."
)

SIOCGIFADDR = 0x8915  # Linux's ioctl for an interface's IPv4 address
_nodes: dict[str, set[int]] = {}  # each process's address -> the node ranks there, once the run has started
_node: int | None = None  # this process's node rank
_timeout: float | None = None  # --ddp_timeout, once a DDP run is being prepared


def interface_for(address: str) -> tuple[str, str] | None:
    """The network interface, and this machine's address on it, through which this machine reaches `address`;
    None for a loopback address or where it cannot be told."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        target = socket.getaddrinfo(address, None, socket.AF_INET, socket.SOCK_DGRAM)[0][4][0]
        if ipaddress.ip_address(target).is_loopback:
            return None
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((target, 9))  # a UDP connect sends nothing: the kernel only picks the route
            local = probe.getsockname()[0]
        for _, name in socket.if_nameindex():
            if ipv4_of(name) == local:
                return name, local
    return None


def ipv4_of(interface: str) -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            packed = fcntl.ioctl(sock.fileno(), SIOCGIFADDR, struct.pack("256s", interface.encode()[:15]))
        except OSError:
            return None
    return socket.inet_ntoa(packed[20:24])


def advertised_address() -> str:
    """The address gloo advertises to the other processes: GLOO_SOCKET_IFNAME's, else what the hostname resolves
    to (gloo falls back to loopback when it resolves to nothing)."""
    if interface := os.environ.get("GLOO_SOCKET_IFNAME", "").split(",")[0]:
        return ipv4_of(interface) or f"interface {interface}"
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def set_up(trainer: Trainer, timeout: float, ckpt_path: str | None, directory: Path) -> None:
    """Before a DDP run's processes connect: advertise the interface that reaches the main node, wait `timeout`
    seconds in a collective, and check that every node resumes from the same checkpoint."""
    global _timeout
    strategy = trainer.strategy
    if trainer.world_size <= 1 or not hasattr(strategy, "cluster_environment"):
        return
    # A machine whose hostname resolves to 127.0.0.1 (a common default) makes gloo advertise that to the other
    # nodes, which then cannot connect ("Connection refused" in every process). The interface that routes to
    # the main node is the one the others can reach this node at. A user's own choice stays.
    if not os.environ.get("GLOO_SOCKET_IFNAME") and (found := interface_for(strategy.cluster_environment.main_address)):
        os.environ["GLOO_SOCKET_IFNAME"] = found[0]
    _timeout = timeout
    if hasattr(strategy, "_timeout"):
        # private-lightning[DDPStrategy._timeout]: DDPStrategy takes the timeout only in __init__
        strategy._timeout = timedelta(seconds=timeout)
    trainer.callbacks.insert(0, SameStart(ckpt_path, directory))


class SameStart(Callback):
    """Every process of a run starts from the same checkpoint, or all from scratch: a node that cannot see the
    run's checkpoint folder (no shared file system) must not train from scratch beside nodes that resume."""

    def __init__(self, ckpt_path: str | None, directory: Path) -> None:
        self.ckpt_path, self.directory = ckpt_path, directory

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if trainer.world_size <= 1 or not torch.distributed.is_initialized():
            return
        found = interface_for(os.environ.get("MASTER_ADDR", "127.0.0.1"))
        mine = {
            "node": trainer.node_rank,
            "host": socket.gethostname(),
            # to name a lost node by the address gloo reports; a run on one machine needs no name (nor a DNS lookup)
            "address": found[1] if found else "127.0.0.1",
            "start": describe(self.ckpt_path) if stage == "fit" else None,
            "directory": str(self.directory),
        }
        everyone: list[Any] = [None] * trainer.world_size
        torch.distributed.all_gather_object(everyone, mine)
        global _node
        _node = trainer.node_rank
        for p in everyone:
            _nodes.setdefault(p["address"], set()).add(p["node"])
        starts = {(p["start"] or {}).get("id") for p in everyone}
        if len(starts) > 1:
            views = {p["node"]: (p["start"], p["directory"]) for p in everyone}
            told = "; ".join(f"node {node} {_from(*view)}" for node, view in sorted(views.items()))
            raise CheckpointError(
                f"the nodes of this run would start from different checkpoints: {told}. Every node must see the"
                f" run's checkpoint folder (a shared file system); this is node {trainer.node_rank}"
            )


def _from(start: dict[str, Any] | None, directory: str) -> str:
    return f"from {start['path']} (step {start['step']})" if start else f"from scratch (no checkpoint in {directory})"


def describe(ckpt_path: str | None) -> dict[str, Any] | None:
    """What a resume starts from, comparable across nodes whatever path each mounts the folder at."""
    if ckpt_path is None:
        return None
    checkpoint = load_checkpoint(ckpt_path)
    step = checkpoint.get("global_step")
    return {"path": ckpt_path, "step": step, "id": checkpoint.get(DIGEST_KEY) or f"step {step}"}


# gloo's and NCCL's words for a peer gone (a timeout in DDP's gradient hook: "Application timeout caused pair closure")
# their-words[gloo]: gloo's and the TCP store's messages, here and in lost_peer() below
PEER_FAILURES = (
    r"Connection closed by peer|Connection reset by peer|Broken pipe|pair closure|gloo|NCCL|timed out|timeout"
)
START_FAILURES = r"Connection refused|connectFullMesh|Timed out|timed out|No route to host|waiting for clients"


def lost_peer(err: BaseException) -> str | None:
    """One line for a DDP run's process that lost the others (or never reached them); None for other errors."""
    if not torch.distributed.is_available() or not isinstance(err, RuntimeError):
        return None
    text = one_line(str(err))
    cause = re.sub(r"^\[[^\]]*\]\s*", "", text).split(". ")[0][:200]  # gloo's first sentence, its source file off
    if torch.distributed.is_initialized():
        if not (isinstance(err, torch.distributed.DistError) or re.search(PEER_FAILURES, text, re.I)):
            return None
        if re.search(r"timed out|timeout", text, re.I):
            waited = f" within --ddp_timeout {_timeout:g} s" if _timeout is not None else ""
            return (
                f"no answer from another process of this DDP run{waited} (a node lost or cut off, or a process"
                f" hung), so this one stops ({cause})"
            )
        peer = re.search(r"\[([0-9.]+)\]:\d+", text)  # gloo names the peer's address: "[10.0.0.2]:4321"
        nodes = _nodes.get(peer[1], set()) if peer else set()
        if len(nodes) == 1 and _node not in nodes:  # an address of one other node only: that node is named
            return f"lost node {next(iter(nodes))} ({peer[1]}) of this DDP run, so this process stops too ({cause})"
        return f"another process of this DDP run stopped, so this one stops too ({cause})"
    if _timeout is not None and re.search(r"wait timeout|waiting for clients", text, re.I):
        return (
            f"not every process of this DDP run joined within --ddp_timeout {_timeout:g} s ({cause}): a node stopped"
            " before it joined (its own output says why), or was not started"
        )
    if _timeout is not None and re.search(START_FAILURES, text):  # a DDP run that had not started
        if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0" and os.environ.get(
            "TORCHELASTIC_USE_AGENT_STORE"
        ) == str(True):
            # torchrun's shared rendezvous store keeps the previous attempt's addresses (pytorch issue 135712)
            return (
                f"the processes of this DDP run could not connect to each other after torchrun restarted them"
                f" ({cause}): start torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in its environment, so that"
                " a restart does not read the addresses of the processes it replaced"
            )
        return (
            f"the processes of this DDP run could not connect to each other ({cause}); this node advertised"
            f" {advertised_address()} to them. If the other nodes cannot reach it there, set GLOO_SOCKET_IFNAME"
            " (NCCL_SOCKET_IFNAME on GPUs) to the interface they can reach, or make this machine's hostname resolve"
            " to that address in /etc/hosts"
        )
    return None
