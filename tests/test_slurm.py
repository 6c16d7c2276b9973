"""SLURM for real (helpers.slurm): the README's two scripts run byte for byte on a two-node cluster, a job warned of
its end or requeued that resumes exactly, a node lost under a job, and a job array of sweep workers on one study.
Every job trains what torchrun's two-node test run trains, and must end on its weights, bit for bit. Those are in
the slow suite; the default one checks the job id handed to scontrol and the words of its answer."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import netns, slurm
from helpers.cli import KILLPOINTS, QUIET, ROOT, SYNTHETIC
from helpers.mnist import write_mnist
from helpers.sweep import counted, study, sweep_args
from lightning.pytorch.plugins.environments import LightningEnvironment, SLURMEnvironment

README = (ROOT / "README.md").read_text()
LIMIT = 180  # seconds any one job of these tests may take
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "NODE_FAIL", "TIMEOUT"}


def readme_script(job_name: str) -> str:
    """The README's sbatch script with this job name, byte for byte."""
    scripts = [m[1] for m in re.finditer(r"```sh\n(#!/bin/bash\n.*?)```", README, re.S)]
    (script,) = [s for s in scripts if f"#SBATCH --job-name={job_name}\n" in s]
    return script


@pytest.fixture
def cluster():
    if why := slurm.unavailable():
        pytest.skip(why)
    with slurm.Cluster() as cluster:
        yield cluster


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_mnist(tmp_path_factory.mktemp("slurm-data"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data) -> Path:
    """torchrun's two-node run (as tests/test_nodes.py runs it), uninterrupted: where every job here must end."""
    if why := slurm.unavailable():
        pytest.skip(why)
    return netns.reference_run(tmp_path_factory.mktemp("torchrun"), data)


def options(data: Path) -> list[str]:
    """What the tests add to the script's fit: torchrun's test run's options, less what the script sets itself."""
    return ["--data.data_dir", str(data), *SYNTHETIC, *QUIET, "--checkpoint.every_n_train_steps", "3",
            "--trainer.max_epochs", "3"]  # fmt: skip


def slowed(script: str) -> str:
    """The README's script with each step 300 ms longer (tests/helpers/killpoints.py), time to act mid-run."""
    assert script.count("srun python -m mnist_lit fit") == 1
    return script.replace("python -m mnist_lit fit", f"python {KILLPOINTS[0]} slow 300 fit")


def assert_same_weights(run: Path, reference: Path) -> None:
    expected, got = netns.weights(reference), netns.weights(run)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def wait_for_checkpoint(run: Path, cluster: slurm.Cluster, job: str) -> None:
    deadline = time.monotonic() + LIMIT
    while not (run / "checkpoints" / "last.ckpt").exists():
        assert time.monotonic() < deadline, f"no checkpoint from job {job}: {cluster.job(job)}"
        time.sleep(0.1)


def errors(log: str) -> list[str]:
    """mnist_lit's one-line errors (SLURM's own lines say "slurmstepd-node0: error: ..." and "srun: error: ...")."""
    return [line for line in log.splitlines() if line.startswith("error: ")]


def output(run: Path, job: str) -> str:
    return (run / f"mnist-{job}.out").read_text()


@pytest.mark.slow  # each test with a cluster runs whole jobs: the slow suite's
def test_the_readmes_script_trains_on_two_nodes_and_ends_as_torchruns_run_does(cluster, tmp_path, data, reference):
    script = tmp_path / "mnist.sbatch"
    script.write_text(readme_script("mnist"))
    run = tmp_path / "run"
    run.mkdir()
    job = cluster.submit(script, *options(data), chdir=run)
    record = cluster.wait_job(job, ENDED, LIMIT)
    log = output(run, job)
    print(f"job {job}: {record['JobState']}, nodes {record['NodeList']}, {record['RunTime']}")
    assert record["JobState"] == "COMPLETED" and record["NodeList"] == "node[0-1]", log[-3000:]
    assert "Traceback" not in log and not errors(log), log[-3000:]
    assert_same_weights(run, reference)


@pytest.mark.slow
@pytest.mark.parametrize(
    "act, words",
    [
        (["scancel", "--signal=USR1"], "SIGUSR1: stopped at step {step} and saved"),  # what --signal=USR1@90 sends
        (["scontrol", "requeue"], "SIGTERM: stopped at step {step} and saved"),  # as a pre-emption does
    ],
    ids=["warned", "requeued"],
)
def test_a_job_stopped_for_a_requeue_saves_then_resumes_exactly(cluster, tmp_path, data, reference, act, words):
    script = tmp_path / "mnist.sbatch"
    script.write_text(slowed(readme_script("mnist")))
    run = tmp_path / "run"
    run.mkdir()
    job = cluster.submit(script, *options(data), chdir=run)
    seen: list[str] = []
    cluster.wait_job(job, {"RUNNING"}, LIMIT, seen)
    wait_for_checkpoint(run, cluster, job)
    acted = cluster.run(*act, job)
    assert acted.returncode == 0, acted.stderr
    record = cluster.wait_job(job, ENDED, LIMIT, seen)
    log = output(run, job)
    print(f"job {job} ({' '.join(act)}): states {' -> '.join(seen)}, Restarts={record['Restarts']}")
    assert record["JobState"] == "COMPLETED" and record["Restarts"] == "1", log[-3000:]
    assert "Traceback" not in log and not errors(log) and "stopped at once" not in log, log[-3000:]
    assert log.count("Restored all states from the checkpoint") == 1, log[-3000:]  # the requeued job resumed
    stops = re.findall(r"^(SIG\w+: stopped at step (\d+) .*)$", log, re.M)
    assert len(stops) == 2, log[-3000:]  # one line from each process
    step = stops[0][1]
    assert all(line.startswith(words.format(step=step)) for line, _ in stops), stops
    if act[0] == "scancel":  # mnist_lit's requeue: the first process asks, the other says who does
        for words in (
            f"; SLURM job {job} requeued: it runs its script again",
            f"; the first process asks SLURM to requeue job {job}",
        ):
            assert sum(words in line for line, _ in stops) == 1, stops
    assert_same_weights(run, reference)


@pytest.mark.slow
def test_a_job_slurm_may_not_requeue_says_so_and_the_next_submission_resumes(cluster, tmp_path, data, reference):
    """Lightning's SLURMEnvironment in --trainer.plugins picks the signal (SIGUSR2 here); a job submitted with
    --no-requeue cannot be requeued, and its stop line says so in scontrol's words."""
    script = tmp_path / "mnist.sbatch"
    script.write_text(slowed(readme_script("mnist")))
    run = tmp_path / "run"
    run.mkdir()
    plugin = ["--trainer.plugins", "lightning.pytorch.plugins.environments.SLURMEnvironment",
              "--trainer.plugins.requeue_signal", "SIGUSR2"]  # fmt: skip
    job = cluster.submit(script, *options(data), *plugin, options=("--no-requeue",), chdir=run)
    cluster.wait_job(job, {"RUNNING"}, LIMIT)
    wait_for_checkpoint(run, cluster, job)
    acted = cluster.run("scancel", "--signal=USR2", job)
    assert acted.returncode == 0, acted.stderr
    record = cluster.wait_job(job, ENDED, LIMIT)
    log = output(run, job)
    print(f"job {job} (--no-requeue, scancel --signal=USR2): {record['JobState']} {record['ExitCode']}")
    assert record["JobState"] == "FAILED" and record["ExitCode"] == "140:0" and record["Restarts"] == "0", log[-3000:]
    (line,) = [line for line in log.splitlines() if f"SLURM job {job} was not requeued: " in line]
    assert line.startswith("SIGUSR2: stopped at step ") and "Traceback" not in log, log[-3000:]
    again = cluster.submit(script, *options(data), *plugin, chdir=run)
    record = cluster.wait_job(again, ENDED, LIMIT)
    assert record["JobState"] == "COMPLETED", output(run, again)[-3000:]
    assert "Restored all states from the checkpoint" in output(run, again)
    assert_same_weights(run, reference)


@pytest.mark.slow
def test_a_node_lost_under_a_job_stops_the_other_in_one_line_and_the_requeued_job_resumes(
    cluster, tmp_path, data, reference
):
    script = tmp_path / "mnist.sbatch"
    script.write_text(slowed(readme_script("mnist")))
    run = tmp_path / "run"
    run.mkdir()
    job = cluster.submit(script, *options(data), "--ddp_timeout", "20", chdir=run)
    seen: list[str] = []
    cluster.wait_job(job, {"RUNNING"}, LIMIT, seen)
    wait_for_checkpoint(run, cluster, job)
    lost = time.monotonic()
    cluster.bed.nodes[1].kill()  # the machine gone: its slurmd and the job's task on it, SIGKILLed at once
    while not errors(output(run, job)):
        assert time.monotonic() - lost < 60, output(run, job)[-3000:]
        time.sleep(0.1)
    stopped = time.monotonic() - lost
    record = cluster.wait_job(job, {"PENDING", *ENDED}, cluster.slurmd_timeout + 60, seen)
    requeued = time.monotonic() - lost
    print(f"node1 killed: rank 0's line after {stopped:.1f} s, job {job} back in the queue after {requeued:.1f} s"
          f" ({record['Reason']})")  # fmt: skip
    log = output(run, job)
    (line,) = errors(log)
    assert "lost node 1 (10.213.0.2) of this DDP run" in line or "another process of this DDP run stopped" in line
    assert "Traceback" not in log and record["Restarts"] == "1"
    cluster.start_node(1)  # the machine back: the job runs again and resumes from the shared folder
    record = cluster.wait_job(job, ENDED, LIMIT, seen)
    print(f"job {job}: states {' -> '.join(seen)}")
    assert record["JobState"] == "COMPLETED", output(run, job)[-3000:]
    assert output(run, job).count("Restored all states from the checkpoint") == 1  # resumed, not started again
    assert_same_weights(run, reference)


@pytest.mark.slow
def test_a_job_array_of_sweep_workers_shares_one_study_and_a_warned_task_requeues(cluster, tmp_path, data):
    """Two workers, one per node, on one SQLite study in the shared root: safe here, where both nodes are one
    kernel (the README says to use PostgreSQL on a cluster's network file system). Task 0 is warned (B:USR1, as
    sweep.sbatch asks for) once its first trial has saved a checkpoint: it stops that trial and requeues itself,
    and the trial is resumed from its checkpoint."""
    script = tmp_path / "sweep.sbatch"
    script.write_text(readme_script("mnist-sweep"))
    root = tmp_path / "sweep"
    args = sweep_args(root, data, "--trainer.max_epochs", "3", trials=4)[1:]  # less the subcommand: the script's
    job = cluster.submit(script, *args, options=("--array=0-1",), chdir=tmp_path)
    deadline, first = time.monotonic() + LIMIT, None
    while first is None or not (root / "trials" / first[1] / "checkpoints" / "last.ckpt").exists():
        assert time.monotonic() < deadline, cluster.job(f"{job}_0")
        time.sleep(0.1)
        task0 = tmp_path / f"mnist-sweep-{job}_0.out"
        first = first or re.search(r"^starting trial (\d+):", task0.read_text() if task0.exists() else "", re.M)
    warned = cluster.run("scancel", "--signal=USR1", "--batch", f"{job}_0")
    assert warned.returncode == 0, warned.stderr
    records = {task: cluster.wait_job(f"{job}_{task}", ENDED, LIMIT) for task in ("0", "1")}
    logs = {task: (tmp_path / f"mnist-sweep-{job}_{task}.out").read_text() for task in ("0", "1")}
    trials = counted(study(root))
    workers = sorted({t.user_attrs["worker"].split(":")[0] for t in trials})
    by_worker = {w: sum(t.user_attrs["worker"].startswith(f"{w}:") for t in trials) for w in workers}  # who ended each
    resumed = [line for line in logs["0"].splitlines() if line.startswith("resuming trial")]
    print(f"array job {job}: task 0 {records['0']['JobState']} Restarts={records['0']['Restarts']}, task 1"
          f" {records['1']['JobState']}; trials {[(t.number, t.state.name) for t in trials]}, by node {by_worker};"
          f" task 0 after its requeue: {resumed}")  # fmt: skip
    assert all(r["JobState"] == "COMPLETED" for r in records.values()), logs
    assert records["0"]["Restarts"] == "1" and records["1"]["Restarts"] == "0", records
    (line,) = [line for line in logs["0"].splitlines() if line.startswith("SIGUSR1: sweep stopped")]
    assert f"SLURM job {job}_0 requeued: it runs its script again" in line, logs["0"][-3000:]
    assert "Traceback" not in logs["0"] + logs["1"] and "stopped at once" not in logs["0"], logs
    assert len(trials) == 4 and len({t.number for t in trials}) == 4
    assert all(t.state.name == "COMPLETE" for t in trials)
    # a trial task 0 stopped went back to the study and was resumed from its checkpoint, by whichever worker came
    # first (task 1 while task 0 waited in the queue, or task 0 on its return)
    stopped = (root / "trials" / first[1] / "fit.log").read_text()
    assert "SIGTERM: stopped at step" in stopped and "Restored all states from the checkpoint" in stopped, stopped
    for log in root.glob("trials/*/fit.log"):  # SLURM's SIGTERM after the requeue, and the sweep's: one stop
        assert "stopped at once" not in log.read_text() and "Traceback" not in log.read_text(), log.read_text()


@pytest.mark.parametrize(
    "env, named",
    [
        ({}, None),  # not in a job
        ({"SLURM_JOB_ID": "12"}, "12"),
        ({"SLURM_JOB_ID": "12", "SLURM_ARRAY_JOB_ID": "7", "SLURM_ARRAY_TASK_ID": "3"}, "7_3"),  # an array's task
        ({"SLURM_JOB_ID": "12", "SLURM_ARRAY_JOB_ID": "--help", "SLURM_ARRAY_TASK_ID": "3"}, "12"),
        ({"SLURM_JOB_ID": "-5"}, None),
        ({"SLURM_JOB_ID": "12", "SLURM_JOB_NAME": "bash"}, None),  # Lightning's interactive job: no requeue
    ],
)
def test_the_job_handed_to_scontrol_is_digits_only(monkeypatch, env, named):
    from mnist_lit import slurm as requeue

    for name in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_NAME"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert requeue.job() == named


@pytest.mark.parametrize("answer, rank, ckpt_path, words", [
    ("exit 0", 0, "auto",
     "SLURM job 12 requeued: it runs its script again, and its fit's --ckpt_path auto resumes from the newest"
     " checkpoint"),
    ("echo 'scontrol: error: Invalid job id specified' >&2; exit 1", 0, "last",
     "SLURM job 12 was not requeued: scontrol: error: Invalid job id specified"),
    ("exit 0", 1, "auto", "the first process asks SLURM to requeue job 12"),
    ("exit 0", 0, None,
     "SLURM job 12 not requeued: this fit has no --ckpt_path, so a requeued job would not resume it"),
    ("exit 0", 0, "old.ckpt",
     "SLURM job 12 not requeued: this fit has --ckpt_path old.ckpt, so a requeued job would not resume it"),
])  # fmt: skip
def test_the_requeue_is_asked_by_the_first_process_and_its_answer_said(
    monkeypatch, tmp_path, answer, rank, ckpt_path, words
):
    """scontrol stands in for SLURM's here (tests/test_slurm.py's cluster tests run the real one)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    from mnist_lit import slurm as requeue

    scontrol = tmp_path / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "asked"}\n{answer}\n')
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "12")
    monkeypatch.delenv("SLURM_JOB_NAME", raising=False)
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    monkeypatch.setattr(requeue, "_requeue_on", signal.SIGUSR1)
    monkeypatch.setattr(requeue, "_ckpt_path", ckpt_path)
    monkeypatch.setattr(rank_zero_only, "rank", rank)
    assert requeue.requeued(signal.SIGTERM) is None  # another signal: no requeue
    assert requeue.requeued(signal.SIGUSR1) == words
    asked = tmp_path / "asked"
    asks = rank == 0 and ckpt_path in ("auto", "last")
    assert (asked.read_text().split() == ["requeue", "12"]) if asks else not asked.exists()


def test_the_warning_stops_as_sigterm_does_and_then_sigterm_is_ignored_until_the_process_exits():
    from mnist_lit import signals

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    try:
        with pytest.raises(signals.Interrupted) as stopped, signals.handling():
            signals.stop_on_warning(signal.SIGUSR1)
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(5)  # the handler raises on the way
        assert stopped.value.signum == signal.SIGUSR1
        assert str(stopped.value) == "SIGUSR1: stopped at once; nothing new was saved"  # no training loop here
        # SLURM's SIGTERM for the end it announced may come while the process exits: it must not cut it short
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGUSR1) == before[signal.SIGUSR1]
        assert signal.getsignal(signal.SIGINT) == before[signal.SIGINT]
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


@pytest.fixture
def in_a_job(monkeypatch):
    """This process as one task of a SLURM batch job, as srun starts it (Lightning's SLURMEnvironment detects it)."""
    for name, value in {"SLURM_JOB_ID": "7", "SLURM_JOB_NAME": "mnist", "SLURM_NTASKS": "1", "SLURM_PROCID": "0",
                        "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NTASKS_PER_NODE": "1",
                        "SLURM_NODELIST": "localhost"}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)


def test_a_new_fit_in_a_job_refuses_a_file_lightning_would_resume_in_its_place(in_a_job, tmp_path, mnist_dir, run_main):
    """Lightning resumes an hpc_ckpt_N.ckpt it finds in the root of a new run in a SLURM job, unchecked (a planted
    pickle runs code as it loads): refused before anything is built."""
    (tmp_path / "hpc_ckpt_3.ckpt").write_bytes(b"planted")
    status, _, err = run_main("fit", "--data.data_dir", str(mnist_dir), *SYNTHETIC, *QUIET, "--ckpt_path", "auto",
                              cwd=tmp_path)  # fmt: skip
    assert status == 1 and err.strip().splitlines() == [
        f"error: {tmp_path / 'hpc_ckpt_3.ckpt'} is named like Lightning's own SLURM checkpoints, which Lightning"
        " would resume in a SLURM job in place of this new run, without mnist_lit's checks: move it out of the run's"
        " folder"
    ], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hpc_ckpt_3.ckpt"]


def test_sigterm_cannot_be_the_warning(in_a_job, tmp_path, mnist_dir, run_main):
    status, _, err = run_main("fit", "--data.data_dir", str(mnist_dir), *SYNTHETIC, *QUIET, "--trainer.plugins",
                              "lightning.pytorch.plugins.environments.SLURMEnvironment",
                              "--trainer.plugins.requeue_signal", "SIGTERM", cwd=tmp_path)  # fmt: skip
    assert status == 1 and err.strip().splitlines()[-1].startswith(
        "error: --trainer.plugins: SLURMEnvironment's requeue_signal SIGTERM cannot warn of a job's end"
    ), err


@pytest.mark.parametrize(
    "plugins, job_name, taken",
    [
        (None, "mnist", signal.SIGUSR1),  # Lightning's default
        (lambda: SLURMEnvironment(requeue_signal=signal.SIGUSR2), "mnist", signal.SIGUSR2),
        (lambda: SLURMEnvironment(auto_requeue=False), "mnist", None),
        (LightningEnvironment, "mnist", None),  # another cluster environment, chosen by the user
        (None, "interactive", None),  # Lightning's interactive job: not a batch job to requeue
    ],
)
def test_which_signal_warns_is_lightnings_choice(in_a_job, monkeypatch, plugins, job_name, taken):
    from mnist_lit import signals
    from mnist_lit import slurm as requeue

    monkeypatch.setenv("SLURM_JOB_NAME", job_name)
    monkeypatch.setattr(requeue, "_requeue_on", None)
    trainer = SimpleNamespace(strategy=SimpleNamespace())  # a single process: no cluster environment on it
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGUSR2)}
    with signals.handling():
        requeue.take_requeue_signal(trainer, None if plugins is None else [plugins()], "auto")
        assert requeue._requeue_on == taken
        for sig, handler in before.items():
            assert (signal.getsignal(sig) is not handler) == (sig == taken), sig
    assert {sig: signal.getsignal(sig) for sig in before} == before  # the command's end puts them back
