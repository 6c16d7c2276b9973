"""A sweep's workers on this machine: threads that each take a trial from the study and run its fit to the end."""

from __future__ import annotations

import contextlib
import copy
import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from mnist_lit import signals, slurm
from mnist_lit.checkpoints import RunLock, checkpoint_dir, newest_checkpoint, open_log, write_atomically
from mnist_lit.errors import EX_IOERR, CheckpointError, first_line, printable
from mnist_lit.sweep.study import (
    FINGERPRINT,
    counted,
    difference,
    open_study,
    public_url,
    retried,
    retry,
    storage_url,
    trial_folder,
    trial_id_of,
)
from mnist_lit.sweep.trial import STORAGE_ENV, TRIAL_ENV, read_result

RELEASER = "released_by"  # a stopped trial's: the worker that failed it and enqueues it again

# Started as each trial's parent (a prelude, not preexec_fn, which is unsafe beside threads), this makes the kernel
# kill the fit when the worker thread that started it dies (a `kill -9` of the sweep), instead of leaving it
# training, unseen, holding its folder's lock.
_ORPHAN_GUARD = (
    "import os, sys\n"
    "from mnist_lit.signals import die_with_parent\n"
    "die_with_parent(int(sys.argv[1]))\n"
    "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])"
)


class Sweeper:
    """This machine's workers: threads that each take a trial from the study and run its fit to the end."""

    def __init__(self, sweep: Any, space: Any, base: dict[str, Any], root: Path) -> None:
        self.sweep, self.space, self.base, self.root = sweep, space, base, root
        self.url = storage_url(sweep, root)
        self.stopping = threading.Event()
        self.signum = 0
        self.procs: set[subprocess.Popen] = set()
        self.lock = threading.Lock()
        self.asking = threading.Lock()
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.errors: list[str] = []

    def run(self) -> None:
        from mnist_lit.sweep.report import report

        fingerprint = {"space": self.sweep.space, "base": self.base, "metric": self.sweep.metric,
                       "direction": self.sweep.direction}  # fmt: skip
        fingerprint = json.loads(json.dumps(fingerprint))
        # One root, one study: its trial folders are numbered by that study's trials. Its storage is recorded as
        # None when it is the root's own sweep.db (however the root is spelt).
        default = not (self.sweep.storage or os.environ.get(STORAGE_ENV))
        study = {"name": self.sweep.study_name, "storage": None if default else public_url(self.url)}
        recorded = self.root / FINGERPRINT
        earlier = json.loads(recorded.read_text()) if recorded.is_file() else None
        if earlier is not None:  # before anything in the root or the storage is touched
            if (own := {k: v for k, v in earlier.items() if k != "study"}) != fingerprint:
                raise CheckpointError(
                    f"{self.root} holds a sweep started with {difference(own, fingerprint)}: resume it with"
                    " its own options, or start this one in another --trainer.default_root_dir"
                )
            if earlier.get("study", study) != study:  # (absent in roots from before it was recorded)
                where = earlier["study"]["storage"] or "the root's sweep.db"
                raise CheckpointError(
                    f"{self.root} holds the sweep of the study {earlier['study']['name']!r} in {where}: resume it with"
                    " its own --sweep.study_name and --sweep.storage, or start this one in another"
                    " --trainer.default_root_dir"
                )
        # The storage itself for the trial states the study's API has no call for (heartbeats, failing a trial)
        new_root = not self.root.exists()
        try:
            self.study, self._storage = open_study(self.sweep, self.root, create=True, fingerprint=fingerprint)
            here, home = str(self.root.resolve()), self.study.user_attrs.get("root")
            if earlier is None and home not in (None, here) and self.study.get_trials(deepcopy=False):
                raise CheckpointError(
                    f"the study {self.sweep.study_name!r} in {public_url(self.url)} holds the trials of the sweep in"
                    f" {home}: run this command there, or give this sweep another --sweep.study_name"
                )
        except BaseException:
            if new_root:  # made for this sweep, which did not start: gone again if nothing went in
                with contextlib.suppress(OSError):
                    self.root.rmdir()
            raise
        if home is None:
            self.study.set_user_attr("root", here)
        if earlier is None or "study" not in earlier:
            write_atomically(str(recorded), json.dumps({**fingerprint, "study": study}, indent=1).encode())
        self.job = slurm.job()  # in a SLURM batch job, its warning too: the trials stop, the job is requeued
        stops = (signal.SIGINT, signal.SIGTERM, *([slurm.WARNING] if self.job else []))
        previous = {sig: signal.signal(sig, self._on_signal) for sig in stops}
        try:
            threads = [threading.Thread(target=self._work, daemon=True) for _ in range(self.sweep.workers)]
            for thread in threads:
                thread.start()
            while any(thread.is_alive() for thread in threads):
                for thread in threads:
                    thread.join(0.2)  # short waits: signals are handled on this thread, between them
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if self.signum == slurm.WARNING:
                signals.warned()
        if self.signum:
            name = signal.Signals(self.signum).name
            # each fit says in its fit.log what it saved (nothing, if it had not started training)
            resumes = "the same command resumes its stopped trials from their checkpoints"
            if self.signum == slurm.WARNING and self.job:
                resumes = slurm.requeue(self.job, resumes)
            print(f"\n{name}: sweep stopped; {resumes}", file=sys.stderr)
            sys.exit(128 + self.signum)
        if self.errors:
            sys.exit(f"error: {self.errors[0]}")
        report(self.study, self.root, self.sweep.metric, self.space)

    def _on_signal(self, signum: int, frame: object) -> None:
        if signum == slurm.WARNING:  # SLURM's SIGTERM that follows reaches the trials too: one stop for them
            signals.warned()
        self.signum = self.signum or signum
        self._stop(signal.SIGTERM if signum == slurm.WARNING else signum)  # every fit stops on SIGTERM

    def _stop(self, signum: int) -> None:
        self.stopping.set()
        with self.lock:
            for proc in self.procs:  # each fit saves last.ckpt at the batch it is in, and exits
                with contextlib.suppress(OSError):
                    proc.send_signal(signum)

    def _work(self) -> None:
        try:
            while not self.stopping.is_set():
                trial = self._next_trial()
                if trial is None:
                    return
                if trial is not False:
                    self._run(trial)
        except Exception as err:  # the storage out of reach, a full disk: stop every trial here, resumable
            while err.__cause__ is not None:  # Optuna's storage wraps the database's own words ("disk is full")
                err = err.__cause__
            self.errors.append(f"the sweep stopped: {first_line(err)}")
            self._stop(signal.SIGTERM)

    def _next_trial(self) -> Any:
        """A trial to run, None when the sweep has finished, False to look again in a while."""
        import optuna
        from optuna.trial import TrialState

        with self.asking:  # one look for stopped trials at a time in this process: each is enqueued once
            self._take_over_dead()
        trials = self.study.get_trials(deepcopy=False)
        done = [t for t in trials if counted(t)]
        if len(done) >= self.sweep.trials:
            return None
        live = [t for t in trials if counted(t) or t.state == TrialState.RUNNING]
        if not any(t.state == TrialState.WAITING for t in trials) and len(live) >= self.sweep.trials:
            self.stopping.wait(min(2.0, self.sweep.heartbeat_interval))  # the others' last trials may yet fail
            return False
        # One ask at a time in this process: Optuna hands a waiting (enqueued) trial to whoever sets it running first,
        # and SQLite has no row lock, so two workers could both take the same one.
        with self.asking:
            trial = self.study.ask(self.space.distributions)
        self._storage.record_heartbeat(trial_id_of(trial))
        trial.set_user_attr("worker", self.worker)
        frozen = self._storage.get_trial(trial_id_of(trial))
        if "failed_trial" not in frozen.system_attrs:  # a new trial, not one taken over: is it one too many?
            trial.set_user_attr("folder", trial.number)
            before = [t for t in self.study.get_trials(deepcopy=False) if t.number < trial.number]
            if sum(counted(t) or t.state in (TrialState.RUNNING, TrialState.WAITING) for t in before) >= (
                self.sweep.trials
            ):
                trial.set_user_attr("surplus", True)  # another worker took the last one at the same moment
                with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                    self.study.tell(trial, state=TrialState.FAIL)
                return False
        return trial

    def _take_over_dead(self) -> None:
        """Fail the running trials whose worker is gone (its heartbeat stale, or, on this machine, its process
        dead) and enqueue them again: the worker that takes one resumes it from its folder. A worker that died at
        any instant of this leaves nothing behind: a trial handed out before its owner was recorded, or one failed
        but not yet enqueued again, is found here too."""
        import optuna
        from optuna.trial import TrialState

        optuna.storages.fail_stale_trials(self.study)
        trials = self.study.get_trials(deepcopy=False)
        for trial in trials:
            if trial.state != TrialState.RUNNING:
                continue
            owner = trial.user_attrs.get("worker")
            # no owner yet: its worker died between the ask and the next write, milliseconds apart
            if self._dead_here(owner) if owner is not None else self._waited(trial.datetime_start):
                self._release(trial_id_of(trial))
        # Failing a trial and enqueueing it again are two writes: a stopped trial whose worker died between them is
        # enqueued here (once: not if a later trial's retry history holds it)
        enqueued = retried(trials)
        for trial in trials:
            if trial.state != TrialState.FAIL or counted(trial) or "surplus" in trial.user_attrs:
                continue
            releaser = trial.system_attrs.get(RELEASER)
            dead = self._dead_here(releaser)
            if trial.number not in enqueued and (dead if dead is not None else self._waited(trial.datetime_complete)):
                retry(self.study, copy.deepcopy(trial))

    @staticmethod
    def _dead_here(worker: object) -> bool | None:
        """Whether a worker (host:pid) of this machine is dead; None for one elsewhere, or none named."""
        host, _, pid = str(worker or "").rpartition(":")
        return not _sweep_alive(int(pid)) if host == socket.gethostname() and pid.isdigit() else None

    def _waited(self, since: datetime.datetime | None) -> bool:
        """A grace period has passed since then (for a worker elsewhere, whose process cannot be looked at)."""
        return since is not None and (datetime.datetime.now() - since).total_seconds() > self.sweep.grace_period

    def _release(self, trial_id: int, seconds: float | None = None) -> None:
        """Fail a running trial and enqueue it again (unless another worker has just done so)."""
        import optuna
        from optuna.trial import TrialState

        try:  # (another worker may have failed it first: then it is that one's to enqueue)
            if seconds is not None:
                self._storage.set_trial_user_attr(trial_id, "seconds", seconds)
            self._storage.set_trial_system_attr(trial_id, RELEASER, self.worker)  # who enqueues it (_take_over_dead)
            if not self._storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                return
        except optuna.exceptions.UpdateFinishedTrialError:
            return
        frozen = copy.deepcopy(self._storage.get_trial(trial_id))
        if "surplus" not in frozen.user_attrs:  # one too many, stopped before it was told so: not run again
            retry(self.study, frozen)

    def _run(self, trial: Any) -> None:
        from optuna.trial import TrialState

        if self.stopping.is_set():  # taken just as the sweep was told to stop
            self._release(trial_id_of(trial))
            return
        frozen = self._storage.get_trial(trial_id_of(trial))
        attrs, folder = frozen.user_attrs, trial_folder(self.root, frozen)
        folder.mkdir(parents=True, exist_ok=True)
        config = folder / "config.yaml"
        if not config.is_file():
            text = yaml.safe_dump(self.space.apply(self.base, trial.params), sort_keys=False)
            write_atomically(str(config), text.encode())
        seconds = float(attrs.get("seconds", 0.0))
        if (result := read_result(folder)).get("pruned") is not None:  # pruned before a kill let it be told
            self._tell(trial, folder, result, seconds)
            return
        probe = RunLock(checkpoint_dir(folder, None))
        try:  # the worker it was taken from may be cut off rather than dead, its fit still running
            probe.acquire()
            probe.release()
        except CheckpointError as err:
            print(f"trial {trial.number}: {err}; it goes back to the queue", file=sys.stderr, flush=True)
            self._release(trial_id_of(trial), seconds)
            self.stopping.wait(self.sweep.heartbeat_interval)
            return
        resume = newest_checkpoint(checkpoint_dir(folder, None)) is not None
        words = ["resuming" if resume else "starting", f"trial {trial.number}"]
        if folder.name != str(trial.number):
            words.append(f"(in trials/{folder.name}, taken over)")
        print(f"{' '.join(words)}: {self.space.describe(trial.params)}", file=sys.stderr, flush=True)
        command = [
            sys.executable, "-c", _ORPHAN_GUARD, str(os.getpid()), "-m", "mnist_lit", "fit", "--config", str(config),
            "--trainer.default_root_dir", str(folder), "--trainer.enable_progress_bar", "false",
            "--trainer.callbacks+=mnist_lit.sweep.trial.Report", *(["--ckpt_path", "last"] if resume else []),
        ]  # fmt: skip
        env = {**os.environ, STORAGE_ENV: self.url, "PYTHONWARNINGS": os.environ.get("PYTHONWARNINGS", "ignore"),
               signals.MANAGED_ENV: "1"}  # its stop, and its SLURM job, are this process's  # fmt: skip
        trial_id = trial_id_of(trial)
        env[TRIAL_ENV] = json.dumps({"study": self.sweep.study_name, "trial_id": trial_id, "folder": str(folder),
                                     "metric": self.sweep.metric, "pruner": self.sweep.pruner,
                                     "startup_trials": self.sweep.startup_trials,
                                     "warmup_epochs": self.sweep.warmup_epochs})  # fmt: skip
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        env.setdefault("OMP_NUM_THREADS", str(max(1, cores // self.sweep.workers)))
        trial.set_user_attr("threads", env["OMP_NUM_THREADS"])  # for best.yaml: the same threads, the same sums
        beat = threading.Event()
        threading.Thread(target=self._heartbeat, args=(trial_id_of(trial), beat), daemon=True).start()
        started = time.monotonic()
        try:
            with open_log(folder / "fit.log") as log, self.lock:
                # its own session: a Ctrl-C in the terminal reaches the sweep, which passes it on once
                proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
                self.procs.add(proc)
                if self.stopping.is_set():  # a signal came while it was starting
                    proc.send_signal(self.signum or signal.SIGTERM)
            status = proc.wait()
            with self.lock:
                self.procs.discard(proc)
        finally:
            beat.set()
        seconds += time.monotonic() - started
        if status != 0 and self.stopping.is_set():
            self._release(trial_id_of(trial), seconds)
            return
        if status == EX_IOERR:  # the machine's (a full disk): stopped, not failed; every trial here stops with it
            error = _last_error(folder / "fit.log") or "a file could not be written"
            self._release(trial_id_of(trial), seconds)
            self.errors.append(
                f"trial {trial.number} stopped: {error}. Fix that (free some space) and run the same command again:"
                " its trials resume from the checkpoints they wrote"
            )
            self._stop(signal.SIGTERM)
            return
        if status != 0:
            error = _last_error(folder / "fit.log") or f"fit exited with status {status}"
            trial.set_user_attr("error", error)
            trial.set_user_attr("seconds", seconds)
            self.study.tell(trial, state=TrialState.FAIL)
            print(
                printable(f"trial {trial.number} failed: {error} (see {folder / 'fit.log'})"),
                file=sys.stderr,
                flush=True,
            )
            self._give_up_if_hopeless(error)
            return
        self._tell(trial, folder, read_result(folder), seconds)

    def _tell(self, trial: Any, folder: Path, result: dict[str, Any], seconds: float) -> None:
        from optuna.trial import TrialState

        trial.set_user_attr("seconds", seconds)
        trial.set_user_attr("steps", result.get("steps", result.get("step")))
        metric = self.sweep.metric
        if result.get("value") is None:
            # Lightning validates at epochs' ends: a max_steps inside an epoch ends the fit before its validation
            error = f"the fit logged no {metric} (it ended before a validation: see --trainer.val_check_interval)"
            trial.set_user_attr("error", error)
            self.study.tell(trial, state=TrialState.FAIL)
            print(f"trial {trial.number} failed: {error}", file=sys.stderr, flush=True)
        elif result.get("pruned") is not None:
            self.study.tell(trial, state=TrialState.PRUNED)
            print(f"trial {trial.number} pruned at epoch {result['pruned']}: {metric} {result['value']:.4f}",
                  file=sys.stderr, flush=True)  # fmt: skip
        else:
            self.study.tell(trial, result["value"])
            print(f"trial {trial.number} finished: {metric} {result['value']:.4f} after {result.get('steps')} steps,"
                  f" {seconds:.1f} s", file=sys.stderr, flush=True)  # fmt: skip

    def _give_up_if_hopeless(self, error: str) -> None:
        """Two trials failed the same way and none has finished: the recipe, not the parameters, is at fault (the
        data missing, say); stop rather than fail every trial that is left."""
        from optuna.trial import TrialState

        trials = self.study.get_trials(deepcopy=False)
        same = [t.number for t in trials if t.user_attrs.get("error") == error]
        if len(same) >= 2 and not any(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials):
            self.errors.append(f"trials {same[0]} and {same[1]} failed the same way, and none has finished: {error}")
            self._stop(signal.SIGTERM)

    def _heartbeat(self, trial_id: int, stop: threading.Event) -> None:
        while not stop.wait(self.sweep.heartbeat_interval):
            with contextlib.suppress(Exception):  # a missed beat only brings a takeover closer
                self._storage.record_heartbeat(trial_id)


def _sweep_alive(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return not Path("/proc/self").exists()  # no /proc to look in: alive, as far as can be told
    return b"mnist_lit" in cmdline or b"mnist-lit" in cmdline  # else the id was reused by another program


def _last_error(log: Path) -> str | None:
    with contextlib.suppress(OSError):
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error: ")]
        if errors:
            return errors[-1].removeprefix("error: ")
        return lines[-1][:300] if lines else None
    return None
