"""Two nodes for real: two network namespaces joined by a veth pair, a torchrun "node" in each, one shared folder
for data and checkpoints. A node killed or cut off, a relaunch that resumes exactly, torchrun's elastic restarts,
a node that cannot see the checkpoints, and the address each node advertises."""

from __future__ import annotations

import inspect
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import netns
from helpers.cli import KILLPOINTS, QUIET, SYNTHETIC
from helpers.mnist import write_mnist
from helpers.netns import LIMIT, finish, fit, launch, logs, mnist_lit, weights

from mnist_lit.checkpoints.files import load_checkpoint
from mnist_lit.checkpoints.resume import check_resumable


@pytest.fixture
def two_nodes(tmp_path):
    """A factory of test beds; each is torn down when the test ends, however it ends."""
    if why := netns.unavailable():
        pytest.skip(why)
    beds: list[netns.TwoNodes] = []

    def make(hostnames: str) -> netns.TwoNodes:
        bed = netns.TwoNodes(tmp_path / f"bed{len(beds)}", hostnames).__enter__()
        beds.append(bed)
        return bed

    yield make
    for bed in beds:
        bed.__exit__()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_mnist(tmp_path_factory.mktemp("nodes-data"))


def worker_errors(log: str) -> list[str]:
    """mnist_lit's one-line errors in a node's output (torchrun's own report of a failed worker aside)."""
    return [line for line in log.splitlines() if line.startswith("error: ")]


def tracebacks_of_workers(log: str) -> int:
    """Python tracebacks other than torchrun's report that a worker failed (ChildFailedError, its own)."""
    blocks = log.split("Traceback (most recent call last):")[1:]
    return sum("ChildFailedError" not in block for block in blocks)


def wait_for_checkpoint(root: Path, processes: list[subprocess.Popen], timeout: float = LIMIT) -> None:
    deadline = time.monotonic() + timeout
    while not (root / "checkpoints" / "last.ckpt").exists():
        assert all(p.poll() is None for p in processes) and time.monotonic() < deadline, "no checkpoint came"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data) -> Path:
    """An uninterrupted two-node run (3 epochs), as every interrupted one must end."""
    if why := netns.unavailable():
        pytest.skip(why)
    return netns.reference_run(tmp_path_factory.mktemp("reference"), data)


@pytest.mark.slow  # whole runs: in the slow suite, so the default one stays under 4 minutes
def test_each_node_advertises_the_interface_that_reaches_the_main_node(two_nodes, tmp_path):
    """Where the machine's hostname resolves to a loopback address (Debian's default), gloo would advertise that
    to the other nodes; mnist_lit picks the interface that routes to MASTER_ADDR instead."""
    bed = two_nodes("loopback")
    probe = "from mnist_lit import nodes; print(nodes.advertised_address(), nodes.interface_for('10.213.0.1'))"
    processes = [node.start([sys.executable, "-c", probe], tmp_path / f"node{i}.log", netns.env())
                 for i, node in enumerate(bed.nodes)]  # fmt: skip
    assert finish(processes, tmp_path, timeout=60) == [0, 0], logs(tmp_path)
    for i, node in enumerate(bed.nodes):
        printed = (tmp_path / f"node{i}.log").read_text().split()
        assert printed[-3:] == ["127.0.0.1", f"('{node.veth}',", f"'{node.address}')"], printed


@pytest.mark.slow
def test_a_killed_node_stops_the_other_at_once_and_a_relaunch_resumes_exactly(two_nodes, tmp_path, data, reference):
    bed = two_nodes("loopback")  # the hostnames resolve to 127.0.0.1: the interface is mnist_lit's choice
    run = tmp_path / "run"
    slow = [*KILLPOINTS, "slow", "300", *fit(data, run, "--ddp_timeout", "20")]
    processes = launch(bed, run, slow)
    wait_for_checkpoint(run, processes)
    bed.nodes[1].kill()
    stopped = bed.nodes[0].wait_gone(60)
    print(f"node 1 SIGKILLed: node 0's processes all stopped after {stopped} s")
    assert stopped is not None and stopped < 10, logs(run)[-3000:]
    node0 = (run / "node0.log").read_text()
    assert processes[0].returncode != 0 and tracebacks_of_workers(node0) == 0, node0[-3000:]
    (line,) = worker_errors(node0)
    assert "lost node 1 (10.213.0.2) of this DDP run" in line or "another process of this DDP run stopped" in line
    check_resumable("last.ckpt", load_checkpoint(run / "checkpoints" / "last.ckpt"))  # intact: digest checked
    # both nodes again, resuming the shared folder's last checkpoint
    again = tmp_path / "again"
    codes = finish(launch(bed, again, mnist_lit(*fit(data, run, "--ckpt_path", "last"))), again)
    assert codes == [0, 0], logs(again)[-3000:]
    expected, got = weights(reference), weights(run)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


@pytest.mark.slow
def test_a_cut_link_is_noticed_within_the_timeout_and_the_checkpoint_stays_resumable(two_nodes, tmp_path, data):
    """Two processes on each node: all four stop, one line each."""
    bed = two_nodes("own")
    run = tmp_path / "run"
    timeout = 10
    args = fit(data, run, "--ddp_timeout", str(timeout), "--trainer.devices", "2")
    processes = launch(bed, run, [*KILLPOINTS, "slow", "300", *args], nproc=2)
    wait_for_checkpoint(run, processes)
    bed.nodes[1].cut()  # no reset, no FIN: the other node hears nothing more
    stopped = netns.wait_gone(bed.nodes, timeout + 60)
    print(
        f"node 1's link cut: node 0 stopped after {stopped[0]} s, node 1 after {stopped[1]} s (--ddp_timeout {timeout})"
    )
    assert all(s is not None and s < timeout + 10 for s in stopped), (stopped, logs(run)[-3000:])
    for i in range(2):
        log = (run / f"node{i}.log").read_text()
        assert processes[i].returncode != 0 and tracebacks_of_workers(log) == 0, log[-3000:]
        # one line per process (torchrun may stop a process with SIGTERM once its neighbour has failed)
        lines = [line for line in log.splitlines() if line.startswith(("error: ", "SIGTERM: "))]
        assert len(lines) == 2, log[-3000:]
        # the first to time out ends; its neighbour on the node may see that before its own timeout runs out
        silent = f"no answer from another process of this DDP run within --ddp_timeout {timeout} s"
        others = ("another process of this DDP run stopped", "SIGTERM: ")
        assert all(silent in line or any(o in line for o in others) for line in lines), lines
        assert any(silent in line for line in lines), lines
    check_resumable("last.ckpt", load_checkpoint(run / "checkpoints" / "last.ckpt"))


@pytest.mark.slow
def test_a_node_that_cannot_see_the_checkpoints_refuses_rather_than_start_afresh(two_nodes, tmp_path, data, reference):
    bed = two_nodes("own")
    shared, elsewhere = tmp_path / "shared", tmp_path / "elsewhere"
    shutil.copytree(reference / "checkpoints", shared / "checkpoints")
    more = ("--ckpt_path", "auto", "--trainer.max_epochs", "4")
    codes = finish(launch(bed, tmp_path, mnist_lit(*fit(data, shared, *more)), mnist_lit(*fit(data, elsewhere, *more))),
                   tmp_path, timeout=120)  # fmt: skip
    assert codes[0] != 0 and codes[1] != 0, logs(tmp_path)[-3000:]
    for i in range(2):
        log = (tmp_path / f"node{i}.log").read_text()
        (line,) = worker_errors(log)
        assert "the nodes of this run would start from different checkpoints" in line, line
        assert f"node 0 from {shared / 'checkpoints' / 'last.ckpt'} (step {weights_step(reference)})" in line, line
        assert f"node 1 from scratch (no checkpoint in {elsewhere / 'checkpoints'})" in line, line
        assert tracebacks_of_workers(log) == 0, log[-3000:]
    assert not (elsewhere / "checkpoints").exists() or not list((elsewhere / "checkpoints").glob("*.ckpt"))
    assert load_checkpoint(shared / "checkpoints" / "last.ckpt")["global_step"] == weights_step(reference)


@pytest.mark.slow
def test_with_ckpt_path_last_a_node_without_the_checkpoints_refuses_and_the_other_stops_in_time(
    two_nodes, tmp_path, data, reference
):
    bed = two_nodes("own")
    shared, elsewhere = tmp_path / "shared", tmp_path / "elsewhere"
    shutil.copytree(reference / "checkpoints", shared / "checkpoints")
    more = ("--ckpt_path", "last", "--trainer.max_epochs", "4", "--ddp_timeout", "8")
    processes = launch(bed, tmp_path, mnist_lit(*fit(data, shared, *more)), mnist_lit(*fit(data, elsewhere, *more)))
    stopped = netns.wait_gone(bed.nodes, 90)
    assert None not in stopped and all(p.returncode != 0 for p in processes), logs(tmp_path)[-3000:]
    (refused,) = worker_errors((tmp_path / "node1.log").read_text())
    assert refused.startswith("error: no checkpoint to resume: ") and str(elsewhere) in refused, refused
    node0 = (tmp_path / "node0.log").read_text()
    (waited,) = worker_errors(node0)
    assert "not every process of this DDP run joined within --ddp_timeout 8 s" in waited, waited
    assert tracebacks_of_workers(node0) == 0, node0[-3000:]
    assert load_checkpoint(shared / "checkpoints" / "last.ckpt")["global_step"] == weights_step(reference)


def weights_step(root: Path) -> int:
    return torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]


@pytest.mark.slow
def test_an_interface_the_other_node_cannot_reach_is_one_line_per_process(two_nodes, tmp_path, data):
    """The user's GLOO_SOCKET_IFNAME wins; a wrong one (the loopback) ends each process in one line that says how
    to fix it, not gloo's log and a traceback per rank."""
    bed = two_nodes("own")
    command = mnist_lit(*fit(data, tmp_path, "--ddp_timeout", "5"))
    processes = launch(bed, tmp_path, command, environment={**netns.env(), "GLOO_SOCKET_IFNAME": "lo"})
    assert all(code != 0 for code in finish(processes, tmp_path, timeout=90)), logs(tmp_path)[-3000:]
    for i in range(2):
        log = (tmp_path / f"node{i}.log").read_text()
        (line,) = worker_errors(log)
        assert "could not connect to each other" in line and "advertised 127.0.0.1" in line, line
        assert "GLOO_SOCKET_IFNAME" in line and tracebacks_of_workers(log) == 0, log[-3000:]


@pytest.mark.slow
def test_torchrun_restarts_a_killed_worker_which_resumes_by_itself_exactly(two_nodes, tmp_path, data, reference):
    """--max-restarts with a c10d rendezvous: rank 1 SIGKILLed mid-epoch, torchrun restarts both workers, and
    `--ckpt_path auto` resumes the newest checkpoint (and started the run the first time)."""
    bed = two_nodes("own")
    run = tmp_path / "run"
    command = [*KILLPOINTS, "rank1-once", "7", *fit(data, run, "--ckpt_path", "auto")]
    # torchrun's shared rendezvous store would hand a restart the addresses of the processes it replaced
    env = {**netns.env(), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    codes = finish(launch(bed, run, command, environment=env, elastic=2), run)
    assert codes == [0, 0], logs(run)[-3000:]
    assert (run / ".killpoint-done").exists()
    assert re.search(r"restart|Restarting", logs(run)), logs(run)[-3000:]
    assert "Restored all states from the checkpoint" in logs(run)  # resumed, not started afresh
    expected, got = weights(reference), weights(run)
    assert all(torch.equal(expected[k], got[k]) for k in expected)


@pytest.mark.slow
def test_a_node_killed_and_started_again_rejoins_and_both_resume_exactly(two_nodes, tmp_path, data, reference):
    """--max-restarts with a c10d rendezvous: node 1 (torchrun and its worker) SIGKILLed mid-run; node 0's torchrun
    waits for it, and once it is started again both resume from the newest checkpoint by themselves."""
    bed = two_nodes("own")
    run = tmp_path / "run"
    command = [*KILLPOINTS, "slow", "300", *fit(data, run, "--ckpt_path", "auto")]
    env = {**netns.env(), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    processes = launch(bed, run, command, environment=env, elastic=2)
    wait_for_checkpoint(run, processes)
    bed.nodes[1].kill()
    again = bed.nodes[1].start(netns.torchrun(1, 1, *command, elastic=2), run / "node1-again.log", env)
    codes = finish([processes[0], again], run)
    assert codes == [0, 0], logs(run)[-3000:] + (run / "node1-again.log").read_text()[-3000:]
    assert "Restored all states from the checkpoint" in logs(run)  # resumed, not started afresh
    expected, got = weights(reference), weights(run)
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_the_timeout_still_reaches_lightnings_ddp_strategy():
    """mnist_lit sets DDPStrategy's private _timeout (its only way in after __init__): fail loudly if it moves."""
    from lightning.pytorch.strategies import DDPStrategy

    assert "_timeout" in vars(DDPStrategy())
    assert '"timeout": self._timeout' in inspect.getsource(DDPStrategy.setup_distributed)


# --- fit --ckpt_path auto: the same command for the first start and every restart (no namespaces needed) -------


def test_ckpt_path_auto_starts_a_run_then_resumes_it(tmp_path, mnist_dir, run_main, caplog):
    args = ["fit", "--data.data_dir", str(mnist_dir), *SYNTHETIC, *QUIET, "--ckpt_path", "auto"]
    status, _, err = run_main(*args, "--trainer.max_epochs", "1", cwd=tmp_path)
    assert status == 0 and "Restored" not in caplog.text, err
    first = weights_step(tmp_path)
    status, _, err = run_main(*args, "--trainer.max_epochs", "2", cwd=tmp_path)
    assert status == 0 and f"Restored all states from the checkpoint at {tmp_path / 'checkpoints'}" in caplog.text
    assert weights_step(tmp_path) == 2 * first
    status, _, err = run_main(*args, "--trainer.max_epochs", "2", cwd=tmp_path)  # a requeued job that had finished
    assert status == 0 and "nothing to train" in err, err


def test_ckpt_path_auto_is_for_fit_only(tmp_path, run_main):
    status, _, err = run_main("test", "--ckpt_path", "auto", cwd=tmp_path)
    assert status != 0 and err.strip().splitlines()[-1].startswith("error: --ckpt_path auto is for fit"), err


def test_ddp_timeout_is_an_option_with_its_trade_in_help(tmp_path, run_main):
    status, out, _ = run_main("fit", "--help", cwd=tmp_path)
    assert status == 0 and "--ddp_timeout" in out and "default: 120" in re.sub(r"\s+", " ", out)
    status, _, err = run_main("fit", "--ddp_timeout", "0", cwd=tmp_path)
    assert status != 0 and "error: --ddp_timeout: 0 is out of range; it must be > 0" in err, err


# --- the one line for each way the processes lose each other (gloo's own messages, as seen in the tests above) ---


@pytest.mark.parametrize(
    ("started", "message", "env", "expected"),
    [
        (True, "[pair.cc:534] Connection closed by peer [10.213.0.2]:54933", {}, "lost node 1 (10.213.0.2) of this"),
        (True, "Connection closed by peer [127.0.0.1]:5000", {}, "another process of this DDP run stopped"),
        (True, "[buffer.cc:81] Timed out waiting 10000ms for recv operation", {}, "within --ddp_timeout 10 s"),
        (True, "Application timeout caused pair closure", {}, "no answer from another process of this DDP run within"),
        (False, "wait timeout after 8000ms, keys: /default_pg/0//cpu//0/1", {}, "not every process of this DDP run"),
        (False, "Gloo connectFullMesh failed with [pair.cc:152] timed out connecting: SO_ERROR: Connection refused",
         {}, "could not connect to each other"),
        (False, "Gloo connectFullMesh failed with [pair.cc:152] timed out connecting: SO_ERROR: Connection refused",
         {"TORCHELASTIC_RESTART_COUNT": "1", "TORCHELASTIC_USE_AGENT_STORE": "True"},
         "start torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"),
        (True, "CUDA error: an illegal memory access", {}, None),
    ],
)  # fmt: skip
def test_each_way_of_losing_the_others_is_one_line(monkeypatch, started, message, env, expected):
    from mnist_lit import nodes

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: started)
    monkeypatch.setattr(nodes, "_timeout", 10.0)
    monkeypatch.setattr(nodes, "_node", 0)
    monkeypatch.setattr(nodes, "_nodes", {"10.213.0.1": {0}, "10.213.0.2": {1}, "127.0.0.1": {0}})
    for name in ("TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_USE_AGENT_STORE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    line = nodes.lost_peer(RuntimeError(message))
    assert (line is None) if expected is None else (expected in line and "\n" not in line), line
