"""The optimizer's and the schedule's options, tried on a probe before anything is built: a bad value is refused in
one line at parse time, not as a traceback after the data is loaded or at the schedule's first step."""

from __future__ import annotations

import functools
import inspect
import math
import warnings
from typing import Any

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import nn

from mnist_lit.errors import first_line
from mnist_lit.trust import check_spec


def checked(field: str, value: Any) -> Any:
    """A callable from a class-path spec, checked as data first (mnist_lit.trust); callables pass through."""
    if not isinstance(value, dict):
        return value
    cls = check_spec(field, value)
    return functools.partial(cls, **(value.get("init_args") or {}))


def check_optimizer(optimizer: OptimizerCallable | dict[str, Any]) -> None:
    """Refuse bad optimizer options now, not after data loading: torch's own checks, and ranges it leaves out."""
    probe = nn.Parameter(torch.zeros(1))  # not a Net: its random initial weights would shift the seeded stream
    make = checked("optimizer", optimizer)  # a spec from a file refused here is never called
    try:
        group = make([probe]).param_groups[0]
    except (ValueError, TypeError, RuntimeError) as err:
        raise ValueError(f"--model.optimizer: {err}") from None
    lr = group.get("lr")
    if isinstance(lr, (int, float)) and not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"--model.optimizer.lr: {lr} is out of range; it must be > 0 and finite")
    momentum = group.get("momentum")
    if isinstance(momentum, (int, float)) and not 0 <= momentum < 1:
        raise ValueError(f"--model.optimizer.momentum: {momentum} is out of range; it must be >= 0 and < 1")


def check_scheduler(optimizer: OptimizerCallable | dict[str, Any], scheduler: dict[str, Any] | None) -> None:
    """Refuse a schedule's bad options now, in one line, not as a traceback at its first step: it is built on a probe
    optimizer and stepped a few times (torch checks some arguments only when the schedule runs: T_max 0, a
    last_epoch without initial_lr). Only the arguments given that differ from the class's defaults are passed."""
    if scheduler is None:
        return
    cls = check_spec("lr_scheduler", {**scheduler, "init_args": {}})
    defaults = {name: p.default for name, p in inspect.signature(cls).parameters.items()}
    given = {k: v for k, v in (scheduler.get("init_args") or {}).items() if k not in defaults or defaults[k] != v}
    check_spec("lr_scheduler", {**scheduler, "init_args": given})
    optimizer = checked("optimizer", optimizer)([nn.Parameter(torch.zeros(1))])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "step() before optimizer.step()": a probe has no training step
            if "total_steps" in defaults and "total_steps" not in given and given.get("epochs") is None:
                given["total_steps"] = 8  # the run's length, as configure_optimizers gives it
            schedule = cls(optimizer, **given)
            length = getattr(schedule, "total_steps", None)  # a one-cycle of N steps takes N - 1 after its first
            for _ in range(min(3, length - 1) if isinstance(length, int) else 3):
                optimizer.step(lambda: torch.zeros(()))  # a closure: LBFGS takes one
                schedule.step(*([1.0] if isinstance(schedule, torch.optim.lr_scheduler.ReduceLROnPlateau) else []))
    except (ValueError, TypeError, KeyError, IndexError, ZeroDivisionError, RuntimeError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        raise ValueError(f"--model.lr_scheduler {cls.__name__}: {first_line(ValueError(message))}") from None
