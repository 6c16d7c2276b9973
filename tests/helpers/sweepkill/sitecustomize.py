"""Kill points for a whole sweep. With this folder on PYTHONPATH, every Python process of the sweep (the sweep and
each trial's fit) imports this at start-up; with SWEEP_KILL=MOMENT:N in the environment, the process where MOMENT
happens for the N-th time SIGKILLs every process of the sweep (each holds SWEEP_KILL_TOKEN in its environment) and
then itself: a power cut at that instant, as far as the sweep's files and its study can tell.

MOMENTs (N counts per process; the sweep's moments happen in the sweep, the others in a trial's fit):
  look      the sweep, before its workers' N-th look for a trial (1: before the first trial)
  asked     the sweep, just after the study hands out its N-th trial, before its heartbeat or owner is recorded
  started   the sweep, as its N-th trial is started: asked, owned, its folder not yet made
  config    the sweep, after the N-th trial's config.yaml is complete
  ckpt      a fit, after its N-th checkpoint file is complete and in place (mid-trial)
  result    a fit, after its N-th result.json is in place (a validation's value), before that epoch's checkpoint
  ended     a fit, after its last checkpoint, before its result records the steps
  tell      the sweep, when its N-th fit has ended well, before the study is told
  release   the sweep, after its N-th stopped trial is marked failed, before it is enqueued again (a takeover)
  report    the sweep, after best.yaml is written, before the figures
Nothing here is imported by mnist_lit: the hooks wrap the real functions the package calls.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import signal
import sys
from pathlib import Path

SPEC = os.environ.get("SWEEP_KILL", "")
TOKEN = os.environ.get("SWEEP_KILL_TOKEN", "")
FILES = {"config": "config.yaml", "ckpt": ".ckpt", "result": "result.json", "report": "best.yaml"}


def kill_all() -> None:
    """SIGKILL every process that holds this sweep's token, then this one."""
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != me:
            try:
                if f"SWEEP_KILL_TOKEN={TOKEN}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                    os.kill(int(entry.name), signal.SIGKILL)
            except OSError:
                pass
    os.kill(me, signal.SIGKILL)


def counter(n: int):
    calls = {"n": 0}

    def nth() -> bool:
        calls["n"] += 1
        return calls["n"] == n

    return nth


def wrap(owner: object, name: str, nth, after: bool = False) -> None:
    original = getattr(owner, name)

    def hooked(*args, **kwargs):
        if not after and nth():
            kill_all()
        result = original(*args, **kwargs)
        if after and nth():
            kill_all()
        return result

    setattr(owner, name, hooked)


class Planter(importlib.abc.MetaPathFinder):
    """Wraps a function of a module once that module has been imported (they are imported late, inside functions)."""

    def __init__(self, module: str, plant) -> None:
        self.module, self.plant = module, plant

    def find_spec(self, fullname, path, target=None):
        if fullname != self.module:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        loader, plant = spec.loader, self.plant

        class Loader(importlib.abc.Loader):
            def create_module(self, spec):
                return loader.create_module(spec)

            def exec_module(self, module):
                loader.exec_module(module)
                plant(module)

        spec.loader = Loader()
        return spec


def install(moment: str, n: int) -> None:
    nth = counter(n)
    if moment in FILES:
        suffix, replace = FILES[moment], os.replace

        def replace_then_die(src, dst, *args, **kwargs):
            replace(src, dst, *args, **kwargs)
            if os.fspath(dst).endswith(suffix) and nth():
                kill_all()

        os.replace = replace_then_die
        return
    plants = {
        "look": ("mnist_lit.sweep.worker", lambda m: wrap(m.Sweeper, "_next_trial", nth)),
        "started": ("mnist_lit.sweep.worker", lambda m: wrap(m.Sweeper, "_run", nth)),
        "tell": ("mnist_lit.sweep.worker", lambda m: wrap(m.Sweeper, "_tell", nth)),
        "release": ("mnist_lit.sweep.study", lambda m: wrap(m, "retry", nth)),
        "asked": ("optuna.study.study", lambda m: wrap(m.Study, "ask", nth, after=True)),
        "ended": ("mnist_lit.sweep.trial", lambda m: wrap(m.Report, "on_train_end", nth)),
    }
    if moment not in plants:
        sys.exit(f"SWEEP_KILL: unknown moment {moment}")
    module, plant = plants[moment]
    sys.meta_path.insert(0, Planter(module, plant))


if SPEC and TOKEN:
    install(SPEC.partition(":")[0], int(SPEC.partition(":")[2] or 1))
