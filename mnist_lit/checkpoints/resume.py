"""Whether a checkpoint's training state fits this run, checked as data before Lightning restores any of it: the
optimizer's and scheduler's state against this run's own (a buffer of another shape would have a fused step write
past it), the loops' counters, the files its checkpoint callback kept, the weights' names and shapes."""

from __future__ import annotations

import contextlib
import inspect
import math
import os
from typing import Any

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

from mnist_lit.errors import CheckpointError


def check_resumable(path: str | os.PathLike, checkpoint: dict[str, Any]) -> None:
    """Fail unless the checkpoint holds what resuming needs besides the weights."""
    # Lightning calls no callback's on_load_checkpoint for a file without "callbacks": ResumeCheck must see it
    checkpoint.setdefault("callbacks", {})
    if not checkpoint.get("optimizer_states") or "loops" not in checkpoint:
        raise CheckpointError(
            f"{path} holds weights only (no optimizer state or progress), so training cannot resume from it;"
            " it can still be tested, used to predict or exported"
        )
    # What Lightning and this callback restore from it, by shape: data from a file, never taken on trust (a wrong
    # type here would end a resume in a traceback from inside Lightning).
    wrong = None
    states, schedulers = checkpoint["optimizer_states"], checkpoint.get("lr_schedulers", [])
    rng = checkpoint.get("rng_state", {})
    if not all(
        isinstance(checkpoint.get(key, 0), int) and checkpoint.get(key, 0) >= 0 for key in ("epoch", "global_step")
    ):
        wrong = "its epoch and step counts are not counts"
    elif not isinstance(checkpoint["loops"], dict) or not isinstance(checkpoint.get("callbacks", {}), dict):
        wrong = "its loops' or callbacks' state is not a mapping"
    elif not isinstance(states, list) or not all(
        isinstance(o, dict) and isinstance(o.get("state"), dict) and isinstance(o.get("param_groups"), list)
        for o in states
    ):
        wrong = "its optimizer state is not a list of optimizer states"
    elif not isinstance(schedulers, list) or not all(isinstance(x, dict) for x in schedulers):
        wrong = "its schedulers' state is not a list of mappings"
    elif (
        not isinstance(rng, dict)
        or not all(
            isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for k, t in rng.items() if k in ("cpu", "cuda")
        )
        or ("cpu" in rng and rng["cpu"].numel() != torch.get_rng_state().numel())
    ):
        wrong = "its random state is not a random generator's state"
    if wrong:
        raise CheckpointError(f"{path} cannot be resumed: {wrong}")


def check_training_state(path: str | os.PathLike, checkpoint: dict[str, Any], trainer: Trainer) -> None:
    """Fail unless the state a resume restores fits this run, before Lightning restores any of it: the loops'
    counters, the optimizers' state and settings, the schedulers' state. Called once the optimizers exist.

    Each is compared with what this run's own objects hold (their fresh state, or a twin optimizer stepped once on
    copies of the parameters) by its layout: the same keys, numbers where numbers go, tensors of the same shape. A
    file is data: a momentum buffer of another shape would have the fused optimizer write past it, a text where a
    count goes would end the run in a traceback, and a scheduler's state sets any attribute it names.
    """

    def refuse(why: str) -> None:
        raise CheckpointError(f"{path} cannot be resumed: {why}")

    if wrong := _misfit(trainer.fit_loop.state_dict(), (checkpoint.get("loops") or {}).get("fit_loop"), "fit_loop"):
        refuse(f"its loops' state does not fit Lightning's ({wrong})")
    states, optimizers = checkpoint.get("optimizer_states") or [], trainer.optimizers
    if len(states) != len(optimizers):
        refuse(f"it holds the state of {len(states)} optimizers, and this run has {len(optimizers)}")
    for optimizer, state in zip(optimizers, states, strict=True):
        if wrong := _optimizer_misfit(optimizer, state):
            refuse(f"its {type(optimizer).__name__} state does not fit the model ({wrong})")
    schedulers, configs = checkpoint.get("lr_schedulers") or [], trainer.lr_scheduler_configs
    if len(schedulers) != len(configs):
        refuse(f"it holds the state of {len(schedulers)} schedulers, and this run has {len(configs)}")
    for config, state in zip(configs, schedulers, strict=True):
        scheduler = config.scheduler
        if shadow := _shadowing(scheduler, state):
            refuse(f"its {type(scheduler).__name__} state sets {shadow}, which is not a setting of it")
        if wrong := _misfit(scheduler.state_dict(), state, "scheduler"):
            refuse(f"its {type(scheduler).__name__} state does not fit ({wrong})")


_ABSENT = object()


def _shadowing(scheduler: Any, state: Any) -> str | None:
    """The key of a scheduler's saved state that would replace one of its methods, or its optimizer (a scheduler
    takes its state as attributes; SequentialLR and ChainedScheduler hand theirs on to their own schedulers)."""
    if not isinstance(state, dict):
        return None
    if bad := [k for k in state if not isinstance(k, str) or k == "optimizer" or _method(type(scheduler), k)]:
        return repr(bad[0])
    inner, states = getattr(scheduler, "_schedulers", None), state.get("_schedulers")
    if isinstance(inner, list) and isinstance(states, list):
        for index, (each, each_state) in enumerate(zip(inner, states, strict=False)):
            if shadow := _shadowing(each, each_state):
                return f"{shadow} of its scheduler {index}"
    return None


def _method(cls: type, name: str) -> bool:
    """Whether name is one of cls's methods or properties (not a plain class attribute such as a default)."""
    found = inspect.getattr_static(cls, name, None)
    return callable(found) or isinstance(found, (property, staticmethod, classmethod))


def _misfit(reference: Any, value: Any, where: str) -> str | None:
    """What in value does not have reference's layout (None: nothing). Keys reference lacks are allowed unless
    reference's mapping holds numbers only (Lightning's progress counters, which would take any key)."""
    if value is _ABSENT:
        return f"{where} is missing"
    if isinstance(reference, dict):
        if not isinstance(value, dict):
            return f"{where} is not a mapping"
        counters = all(isinstance(v, (int, float, dict)) for v in reference.values()) and "state_dict" not in reference
        if counters and (extra := [k for k in value if k not in reference]):
            return f"{where} has {extra[0]!r}, which it does not take"
        for key, item in reference.items():
            if key == "state_dict":  # a loop's own state (the data's place): checked where it loads
                continue
            if key not in value and not counters:  # Lightning passes over a loop it does not find
                continue
            if wrong := _misfit(item, value.get(key, _ABSENT), f"{where}.{key}"):
                return wrong
        return None
    if isinstance(reference, bool):
        return None if isinstance(value, bool) else f"{where} is not true or false"
    if isinstance(reference, (int, float)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{where} is not a number"
        if math.isfinite(reference) and not math.isfinite(value):  # a learning rate of nan: a run that diverges
            return f"{where} is not a finite number"
        return None if not isinstance(reference, int) or value >= 0 or reference < 0 else f"{where} is negative"
    if isinstance(reference, torch.Tensor):
        if not isinstance(value, torch.Tensor) or value.shape != reference.shape:
            return f"{where} is not a tensor of shape {tuple(reference.shape)}"
        return None
    if isinstance(reference, (list, tuple)):
        if not isinstance(value, (list, tuple)) or len(value) != len(reference):
            return f"{where} is not a list of {len(reference)}"
        for index, (item, given) in enumerate(zip(reference, value, strict=True)):
            if wrong := _misfit(item, given, f"{where}[{index}]"):
                return wrong
        return None
    if isinstance(reference, str):
        return None if isinstance(value, str) else f"{where} is not a text"
    return None  # None, or an object a state_dict holds as it is: any plain value


def _optimizer_misfit(optimizer: torch.optim.Optimizer, state: Any) -> str | None:
    """What in an optimizer's saved state does not fit the optimizer (None: nothing)."""
    groups, saved_groups = optimizer.param_groups, state.get("param_groups") if isinstance(state, dict) else None
    if (
        not isinstance(saved_groups, list)
        or len(saved_groups) != len(groups)
        or not isinstance(state.get("state"), dict)
    ):
        return f"its parameter groups are not {len(groups)}"
    params = [p for group in groups for p in group["params"]]
    named = [g.get("params") if isinstance(g, dict) and isinstance(g.get("params"), list) else [] for g in saved_groups]
    ids = [i for names in named for i in names]  # torch gives the state saved under ids[k] to params[k]
    if (
        not all(isinstance(i, int) and not isinstance(i, bool) for i in ids)
        or sorted(ids) != list(range(len(params)))
        or [len(names) for names in named] != [len(g["params"]) for g in groups]
    ):
        return f"its parameter groups do not name the model's {len(params)} parameters"
    for group, saved in zip(groups, saved_groups, strict=True):
        settings = {k: v for k, v in group.items() if k not in ("params", "param_names")}
        loaded = _as_loaded(optimizer, saved)
        if missing := [k for k in settings if k not in loaded]:
            return f"its settings lack {missing[0]!r}"
        if wrong := _misfit(settings, {k: v for k, v in loaded.items() if k != "params"}, "settings"):
            return wrong
    # The state this optimizer keeps per parameter, as it makes it: a twin stepped once on zero gradients of copies
    twins = [torch.zeros_like(p, requires_grad=True) for p in params]
    for twin in twins:
        twin.grad = torch.zeros_like(twin)
    it = iter(twins)
    twin_groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [next(it) for _ in g["params"]]}
                   for g in groups]  # fmt: skip
    try:
        twin_optimizer = type(optimizer)(twin_groups)
        twin_optimizer.step(lambda: torch.zeros(()))
    except Exception:  # an optimizer that cannot be made again this way: its state goes unchecked, as in Lightning
        return None
    for index, (saved_id, twin) in enumerate(zip(ids, twins, strict=True)):
        saved = state["state"].get(saved_id)
        if saved is None:  # not stepped yet: made afresh
            continue
        own = twin_optimizer.state.get(twin, {})
        for key, reference in own.items():
            value = saved.get(key, _ABSENT) if isinstance(saved, dict) else _ABSENT
            if key == "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                continue  # a step count written as a number (older torch)
            if reference is None and (value is None or isinstance(value, torch.Tensor)):
                reference = params[index].detach()  # e.g. SGD's momentum buffer, once there is one
                if value is None:
                    continue
            if wrong := _misfit(reference, value, f"parameter {index}'s {key}"):
                return wrong
    return None


def own_files(state: Any, dirpath: str | None) -> dict[str, Any] | None:
    """A ModelCheckpoint's record of its files, from a checkpoint, as data (None: not a record at all).

    ModelCheckpoint removes the files it restores as its earlier saves once a new one is written, and takes
    "<dirpath>/../../x" for a file in its folder: a file could have a resume delete any file the user may. Only
    checkpoint files directly in dirpath are kept, by name; any other path is forgotten (a run moved from elsewhere:
    its old files are not this run's to remove), and scores that are not numbers are dropped.
    """
    if not isinstance(state, dict):
        return None
    folder = os.path.abspath(dirpath or ".")

    def own(path: Any) -> str:
        if not isinstance(path, str) or not path.endswith(".ckpt") or "\0" in path:
            return ""
        normal = os.path.abspath(path)  # "..", "." and doubled slashes resolved, as a string
        return normal if os.path.dirname(normal) == folder else ""

    def score(value: Any) -> torch.Tensor | None:
        return value if isinstance(value, torch.Tensor) and value.numel() == 1 else None

    best_k = state.get("best_k_models")
    return {
        "dirpath": state.get("dirpath") if isinstance(state.get("dirpath"), str) else None,
        "best_model_score": score(state.get("best_model_score")),
        "best_model_path": own(state.get("best_model_path")),
        "kth_best_model_path": own(state.get("kth_best_model_path")),
        "kth_value": score(state.get("kth_value")),
        "last_model_path": own(state.get("last_model_path")),
        "best_k_models": {
            own(k): v
            for k, v in (best_k.items() if isinstance(best_k, dict) else ())
            if own(k) and score(v) is not None
        },
    }


def keep_own_files(trainer: Trainer, checkpoint: dict[str, Any]) -> None:
    """Every ModelCheckpoint's record of its files in a checkpoint a fit resumes made data (own_files), before
    Lightning restores the callbacks from it: mnist_lit's Checkpoint, and one a user adds (--trainer.callbacks)."""
    states = checkpoint.get("callbacks")
    if not isinstance(states, dict):
        return
    for callback in trainer.callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.state_key in states:
            states[callback.state_key] = own_files(states[callback.state_key], callback.dirpath) or {}


def _as_loaded(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> dict[str, Any]:
    """A saved parameter group as torch's load_state_dict leaves it: the settings newer than the file (fused,
    decoupled_weight_decay, ...) filled in by the optimizer's own __setstate__."""
    probe = object.__new__(type(optimizer))
    try:
        probe.__setstate__(
            {"defaults": dict(optimizer.defaults), "state": {}, "param_groups": [{**saved, "params": []}]}
        )
        return probe.param_groups[0]
    except Exception:  # (its own __setstate__ failed on the saved group: compared as it is)
        return saved


def run_seed(checkpoint: dict[str, Any]) -> int | None:
    """The --seed_everything a checkpoint's run started with (older checkpoints: its data order's seed)."""
    seed = (checkpoint.get("rng_state") or {}).get("seed")
    if isinstance(seed, int) and not isinstance(seed, bool):
        return seed
    with contextlib.suppress(AttributeError, KeyError, IndexError, TypeError):
        seed = checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["seed"]
        return seed if isinstance(seed, int) and not isinstance(seed, bool) else None
    return None


def check_weights(path: str | os.PathLike, checkpoint: dict[str, Any], model: torch.nn.Module) -> None:
    """Fail unless the checkpoint holds weights of exactly this model's shapes."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    found = {k: getattr(v, "shape", None) for k, v in checkpoint["state_dict"].items()}
    if expected.keys() != found.keys():
        missing, unexpected = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
        raise CheckpointError(
            f"{path} is a checkpoint of another model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    if wrong := [k for k in expected if expected[k] != found[k]]:
        raise CheckpointError(f"{path} is a checkpoint of another model: {wrong[0]} has shape {found[wrong[0]]}")
    weights, model_state = checkpoint["state_dict"], model.state_dict()
    # as the model's own: floating-point weights of finite numbers, integer counters (batch norm's) as integers
    if broken := [
        k
        for k in expected
        if weights[k].is_floating_point() != model_state[k].is_floating_point()
        or (weights[k].is_floating_point() and not bool(weights[k].isfinite().all()))
    ]:
        raise CheckpointError(f"{path} holds no usable weights: {broken[0]} is not a tensor of finite numbers")


class ResumeCheck(Callback):
    """A resumed fit's training state checked as data before Lightning restores any of it, and the optimizer options
    given anew on its command line applied. The command line adds it to every fit, whatever its other callbacks.

    Lightning calls every callback's on_load_checkpoint before any callback's load_state_dict (the files its
    checkpoint callback kept are filtered there), and on_fit_start after the optimizers are made and before their
    state is restored (the state is checked there, or at once where a strategy restores after its setup)."""

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None  # a resume's checkpoint, until on_fit_start checks it

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if trainer.state.fn != "fit":
            return
        keep_own_files(trainer, checkpoint)
        if trainer.optimizers:  # a strategy that restores after its setup: the optimizers are there now
            check_training_state(trainer.ckpt_path, checkpoint, trainer)
        else:
            self._pending = checkpoint

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        checkpoint, self._pending = self._pending, None
        if checkpoint is not None:
            check_training_state(trainer.ckpt_path, checkpoint, trainer)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """A resumed run's optimizer options given anew (e.g. --model.optimizer.lr) replace the restored ones."""
        if trainer.ckpt_path is None:
            return
        for config in trainer.lr_scheduler_configs:
            length = getattr(config.scheduler, "total_steps", None)
            if isinstance(length, int) and length < trainer.estimated_stepping_batches:
                raise MisconfigurationException(
                    f"the {type(config.scheduler).__name__} schedule of this run ends at step {length}: a resumed run"
                    " cannot train beyond it (--trainer.max_epochs or max_steps); start a new run for a longer one"
                )
        # with a schedule, the learning rate (and a cycled momentum) is the scheduler's, restored with it
        scheduled = ("lr", "momentum", "betas") if trainer.lr_scheduler_configs else ()
        spec = pl_module.hparams.get("optimizer")
        given = dict(spec.get("init_args", {})) if isinstance(spec, dict) else {}
        changes = []
        for name, value in given.items():
            if name in scheduled:
                continue
            for optimizer in trainer.optimizers:
                for group in optimizer.param_groups:
                    if name in group and tunable(value) and tunable(group[name]) and group[name] != _plain(value):
                        changes.append(f"{name} {_show(group[name])} -> {_show(value)}")
                        group[name] = _plain(value)
        if changes:
            rank_zero_info(f"optimizer: {', '.join(dict.fromkeys(changes))} from this resume on")


def tunable(value: Any) -> bool:
    """A number, or numbers (Adam's betas): the options a resumed optimizer can take anew."""
    if isinstance(value, (list, tuple)):
        return bool(value) and all(tunable(v) for v in value)
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _plain(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _show(value: Any) -> str:
    return f"({', '.join(map(str, value))})" if isinstance(value, (list, tuple)) else str(value)
