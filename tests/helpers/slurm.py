"""A SLURM cluster for real, two nodes on one machine: Debian's slurmctld, slurmd and munged (slurm-wlm, munge) in a
folder of their own, one slurmd in each of helpers.netns's two network namespaces (node0 runs the controller and the
munge daemon too), all torn down with the namespaces, also when a test fails. Needs root.

What it took (SLURM 22.05, found by trying): munged wants every folder above its socket open to all (a+x), so the
cluster's folder is made in /tmp, not in pytest's private tmp_path; slurmd initialises a cgroup plugin even with
proctrack/linuxproc and task/none, and `ip netns exec` hides /sys/fs/cgroup, so cgroup.conf names cgroup/v1 to skip
the probe; a requeued job waits cred_expire + 1 s before it may start again (120 s by default: 5 here); clients
(sbatch, scontrol) run in node0's namespace, where the controller's address is reachable.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from helpers import netns

TOOLS = ("slurmctld", "slurmd", "munged", "sbatch", "scontrol", "scancel", "sinfo")

CONF = """\
ClusterName=mnist
SlurmctldHost=node0({subnet}.1)
SlurmctldPort=16817
SlurmdPort=16818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={folder}/munge/munge.sock,cred_expire=5
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool/%n
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.%n.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerParameters=sched_interval=1,bf_interval=1
ReturnToService=2
PropagateResourceLimits=NONE
MailProg=/bin/true
SlurmdTimeout={slurmd_timeout}
MessageTimeout=5
KillWait={kill_wait}
InactiveLimit=0
MinJobAge=600
NodeName=node0 NodeAddr={subnet}.1 CPUs=1 RealMemory=100
NodeName=node1 NodeAddr={subnet}.2 CPUs=1 RealMemory=100
PartitionName=main Nodes=node0,node1 Default=YES MaxTime=INFINITE State=UP
"""


def unavailable() -> str | None:
    """Why a cluster cannot be made here, or None."""
    if why := netns.unavailable():
        return why
    if missing := [tool for tool in TOOLS if shutil.which(tool) is None]:
        return f"SLURM is not installed ({', '.join(missing)} missing: apt-get install slurm-wlm munge)"
    return None


class Cluster:
    """Two nodes, node0 and node1, one CPU each, in one partition. slurmd_timeout: seconds before a silent node is
    set DOWN; kill_wait: seconds between the SIGTERM and the SIGKILL that end a job's processes."""

    def __init__(self, slurmd_timeout: int = 10, kill_wait: int = 10) -> None:
        self.slurmd_timeout, self.kill_wait = slurmd_timeout, kill_wait

    def __enter__(self) -> Cluster:
        self.folder = Path(tempfile.mkdtemp(prefix="mnist-slurm-"))
        self.bed = netns.TwoNodes(self.folder / "bed", "own")
        self.conf = self.folder / "slurm.conf"
        try:
            self._start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _start(self) -> None:
        folder = self.folder
        folder.chmod(0o755)  # munged: every folder above its socket open to all
        for sub in ("munge", "state", "spool"):
            (folder / sub).mkdir(mode=0o755)
        key = folder / "munge" / "munge.key"
        key.write_bytes(Path("/dev/urandom").open("rb").read(1024))
        key.chmod(0o600)
        self.bed.__enter__()
        self.conf.write_text(CONF.format(subnet=netns.SUBNET, folder=folder, slurmd_timeout=self.slurmd_timeout,
                                         kill_wait=self.kill_wait))  # fmt: skip
        (folder / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\n")
        munge = folder / "munge"
        node0 = self.bed.nodes[0]
        node0.start(["munged", "-F", f"--key-file={key}", f"--socket={munge / 'munge.sock'}",
                     f"--pid-file={munge / 'munged.pid'}", f"--log-file={munge / 'munged.log'}",
                     f"--seed-file={munge / 'munged.seed'}"], folder / "munged.out", self.env())  # fmt: skip
        self._until(lambda: (munge / "munge.sock").exists(), 30, lambda: "munged did not start")
        node0.start(["slurmctld", "-D", "-f", str(self.conf)], folder / "slurmctld.out", self.env())
        for i in range(2):
            self.start_node(i)
        self.wait_nodes("idle", 2)

    def __exit__(self, *exc: object) -> None:
        self.bed.__exit__()
        shutil.rmtree(self.folder, ignore_errors=True)

    def env(self, **extra: str) -> dict[str, str]:
        """What the clients and the jobs they submit see (sbatch passes its environment on to the job): this
        checkout's mnist_lit, its Python first on PATH, one thread per process."""
        env = netns.env()
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}"
        return {**env, "SLURM_CONF": str(self.conf), **extra}

    def start_node(self, i: int) -> None:
        """node i's slurmd (again, after the node was killed)."""
        node = self.bed.nodes[i]
        node.start(["slurmd", "-D", "-f", str(self.conf), "-N", node.hostname], self.folder / f"slurmd{i}.out",
                   self.env())  # fmt: skip

    def run(self, *command: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        """A client command (sbatch, scontrol, scancel ...) on node0."""
        return subprocess.run(["ip", "netns", "exec", self.bed.nodes[0].namespace, *command], env=env or self.env(),
                              capture_output=True, text=True, timeout=timeout)  # fmt: skip

    def submit(self, script: Path, *args: str, options: tuple[str, ...] = (), chdir: Path) -> str:
        """sbatch script args, from chdir: the job's id."""
        done = self.run("sbatch", "--parsable", f"--chdir={chdir}", *options, str(script), *args)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """scontrol's record of a job (JobState, Restarts, ExitCode ...); an array's tasks are ARRAY_TASK ids."""
        shown = self.run("scontrol", "show", "job", "--oneliner", job_id)
        assert shown.returncode == 0, shown.stderr
        return dict(field.split("=", 1) for field in shown.stdout.split() if "=" in field)

    def wait_job(self, job_id: str, states: set[str], timeout: float, seen: list[str] | None = None) -> dict[str, str]:
        """The job's record once its state is one of states; each new state seen on the way appended to seen."""
        deadline = time.monotonic() + timeout
        while True:
            record = self.job(job_id)
            state = record.get("JobState", "")
            if seen is not None and (not seen or seen[-1] != state):
                seen.append(state)
            if state in states:
                return record
            assert time.monotonic() < deadline, f"job {job_id} still {state} after {timeout} s: {record}"
            time.sleep(0.2)

    def wait_nodes(self, state: str, count: int, timeout: float = 60) -> None:
        def ready() -> bool:
            listed = self.run("sinfo", "--noheader", "--format=%T %D").stdout.split()
            return listed == [state, str(count)]

        self._until(ready, timeout, lambda: f"the cluster's nodes are not {count} {state}: {self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text()[-2000:]}" for log in sorted(self.folder.glob("*.log")))

    @staticmethod
    def _until(condition: Callable[[], bool], timeout: float, what: Callable[[], str]) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, what()
            time.sleep(0.2)
