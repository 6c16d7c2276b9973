"""The training-time side of checkpoints: when to save, exact resume (RNG, position in the epoch), and stopping on a
signal or a limit with a checkpoint of the step reached."""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import signal
import sys
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, Timer

from mnist_lit import signals
from mnist_lit.checkpoints.files import checkpoint_dir
from mnist_lit.checkpoints.io import AtomicCheckpointIO
from mnist_lit.errors import CheckpointError, Diverged
from mnist_lit.signals import Interrupted


def check_resumable(path: str | os.PathLike, checkpoint: dict[str, Any]) -> None:
    """Fail unless the checkpoint holds what resuming needs besides the weights."""
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


def _misfit(reference: Any, value: Any, where: str, exact: bool = False) -> str | None:
    """What in value does not have reference's layout (None: nothing). Keys reference lacks are allowed unless
    exact (or reference's mapping holds numbers only, as Lightning's progress counters do, which take any key)."""
    if value is _ABSENT:
        return f"{where} is missing"
    if isinstance(reference, dict):
        if not isinstance(value, dict):
            return f"{where} is not a mapping"
        counters = all(isinstance(v, (int, float, dict)) for v in reference.values()) and "state_dict" not in reference
        if (exact or counters) and (extra := [k for k in value if k not in reference]):
            return f"{where} has {extra[0]!r}, which it does not take"
        for key, item in reference.items():
            if key == "state_dict" and not exact:  # a loop's own state (the data's place): checked where it loads
                continue
            if key not in value and not (exact or counters):  # Lightning passes over a loop it does not find
                continue
            if wrong := _misfit(item, value.get(key, _ABSENT), f"{where}.{key}", exact):
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
            if wrong := _misfit(item, given, f"{where}[{index}]", exact):
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


class Checkpoint(ModelCheckpoint):
    """ModelCheckpoint whose files are never half-written, never silently damaged, and resume a run exactly.

    - Every file is written through AtomicCheckpointIO (mnist_lit.checkpoints.io): sealed with a digest, written to a
      temporary name, fsynced and renamed; an older file is removed only after its successor is on disk.
    - last.ckpt is a second copy of the newest periodic file (its own inode): one damaged file never takes the
      run's only checkpoint with it.
    - The checkpoint carries the torch RNG state (dropout's randomness) and, through the train loader, the
      position in the epoch, so a resumed run continues bit for bit on the same hardware.
    - Whatever ends training early (Ctrl-C or SIGTERM, max_steps, max_time, early stopping) saves last.ckpt at
      that batch, mid-epoch position included, so a resume goes on from exactly there.
    - Nothing is saved between an epoch's last batch and the end of its validation and scheduler step: a save or
      a stop due there is made as the next epoch starts (or training ends), so no resume skips or repeats them.
    - The final weights are saved when training ends (last.ckpt, or a periodic file with save_last off), so
      `test --ckpt_path last` sees them.
    """

    def __init__(
        self,
        dirpath: str | None = None,
        filename: str | None = None,
        every_n_train_steps: int | None = 10,
        save_last: bool = True,
        save_top_k: int = 1,
        save_weights_only: bool = False,
        verbose: bool = False,
    ) -> None:
        """
        Args:
            dirpath: Folder for checkpoints; default <trainer.default_root_dir>/checkpoints.
            filename: Name pattern of the periodic checkpoints; default "epoch={epoch}-step={step}".
            every_n_train_steps: Save after this many optimizer steps (the guide saves every 10 batches).
            save_last: Also keep last.ckpt, the one `--ckpt_path last` resumes from.
            save_top_k: Periodic checkpoints to keep: 1 the newest only, -1 all of them, 0 none.
            save_weights_only: Leave out optimizer and loop state (such checkpoints cannot resume a run).
            verbose: Print a line on every save.
        """
        super().__init__(
            dirpath=dirpath,
            filename=filename,
            every_n_train_steps=every_n_train_steps,
            save_last=save_last,
            save_top_k=save_top_k,
            save_weights_only=save_weights_only,
            verbose=verbose,
            # Overwrite a name rather than write name-v1: a file left by a killed run is replaced atomically.
            enable_version_counter=False,
        )
        self._rng_to_restore: dict[str, Any] | None = None
        self._stop_signal: int | None = None
        self._last_write: tuple[int, str] | None = None
        self._save_due = False  # a periodic save that fell on an epoch's last batch, made at the next epoch's start
        self._step_seen = 0  # global_step at the last batch's end: a batch that leaves it is mid-accumulation
        self._stop_asked = False

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._seed = torch.initial_seed()  # the run's seed (--seed_everything), before any state is restored
        if self.dirpath is None:
            self.dirpath = str(checkpoint_dir(trainer.default_root_dir, None).resolve())
        # Every checkpoint the trainer writes, this callback's or anyone's, goes through the atomic writer.
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        super().setup(trainer, pl_module, stage)

    # --- saving ----------------------------------------------------------------------------------------------

    # private-lightning[ModelCheckpoint._save_checkpoint,ModelCheckpoint.state]: the one place every file is
    # written; ModelCheckpoint's own record of what it saved, kept true for the copy it does not make itself
    def _save_checkpoint(self, trainer: Trainer, filepath: str) -> None:
        previous = self._last_write
        if previous is None or previous[0] != trainer.global_step:
            self._check_finite(trainer)
            self._last_write = (trainer.global_step, filepath)
            super()._save_checkpoint(trainer, filepath)  # through AtomicCheckpointIO
            return
        self._last_write = (trainer.global_step, filepath)
        # last.ckpt right after the periodic file of the same step holds the same bytes: write the serialised
        # snapshot a second time rather than collect and serialise it again.
        if trainer.is_global_zero:
            checkpoint_io = trainer.strategy.checkpoint_io
            if isinstance(checkpoint_io, AtomicCheckpointIO):
                checkpoint_io.copy(previous[1], filepath)
            else:
                trainer.strategy.save_checkpoint(torch.load(previous[1], weights_only=True), filepath)
        trainer.strategy.barrier("Checkpoint.copy")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath

    @staticmethod
    def _check_finite(trainer: Trainer) -> None:
        # A diverged model (nan or inf weights) must not replace the last good checkpoint. Checked per save (not
        # again for last.ckpt's copy of the same step), not per step, and by one sum per tensor (20 us, a third of
        # an isfinite per tensor): a nan or inf makes the sum non-finite; so can huge finite weights, which the
        # exact check then tells apart.
        parameters = [p.detach() for p in trainer.lightning_module.parameters()]
        if not bool(torch.stack([p.sum() for p in parameters]).sum().isfinite()) and not all(
            bool(p.isfinite().all()) for p in parameters
        ):
            raise Diverged(
                f"training diverged: the weights are not finite numbers at step {trainer.global_step} (is the"
                " learning rate too high?); stopped without saving them: checkpoints written before keep the last"
                " finite weights"
            )

    # private-lightning[ModelCheckpoint._save_topk_checkpoint,ModelCheckpoint._save_last_checkpoint]: its two
    # saves, at moments of our choosing (an epoch's start, a stop); [ModelCheckpoint._monitor_candidates] what
    # they take; [ModelCheckpoint._should_skip_saving_checkpoint] its rule for when not to save (below)
    def _save_periodic(self, trainer: Trainer) -> None:
        """The periodic file and last.ckpt, as ModelCheckpoint saves every_n_train_steps."""
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)

    def _save_now(self, trainer: Trainer) -> None:
        """A checkpoint of this very step, unless there is one: last.ckpt, else a periodic file."""
        if self._last_global_step_saved == trainer.global_step:
            return
        if self.save_last:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        elif self.save_top_k != 0:
            self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))

    def newest_saved(self) -> str | None:
        return self._last_checkpoint_saved or (self.save_last and self.last_model_path) or None

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._disarm()
        signum = self._signal(trainer, pl_module)  # one that came during the last epoch's end
        if not self._should_skip_saving_checkpoint(trainer):  # the final weights
            if self._save_due:
                self._save_periodic(trainer)
            else:
                self._save_now(trainer)  # last.ckpt, or a periodic file when save_last is off
        self._save_due = False
        timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
        remaining = timer.time_remaining() if timer is not None else None
        if remaining is not None and remaining <= 0 and trainer.is_global_zero:
            saved = self.newest_saved()
            where = f"; saved {saved}: resume with `fit --ckpt_path last`" if saved else ""
            print(f"stopped by --trainer.max_time at step {trainer.global_step}{where}", file=sys.stderr)
        if signum:  # training had ended all the same: nothing is left to resume
            saved = f"; the final weights are in {saved}" if (saved := self.newest_saved()) else ""
            name = signal.Signals(signum).name
            raise Interrupted(f"{name}: came as training ended at step {trainer.global_step}{saved}", signum)

    # --- exact resume: the RNG state rides in the checkpoint ------------------------------------------------

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        # At the checkpoint's top level, not in this callback's state: that is keyed by the callback's settings
        # and silently dropped when a run resumes with, say, another every_n_train_steps.
        rng: dict[str, Any] = {"cpu": torch.get_rng_state(), "seed": self._seed}
        if pl_module.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(pl_module.device)
        checkpoint["rng_state"] = rng
        for counts in checkpoint["loops"]["fit_loop"]["epoch_progress"].values():
            if counts["ready"] == counts["started"] + 1:
                # Saved in on_train_epoch_start: Lightning has counted the new epoch as ready, not yet started, and
                # 2.6 resumes that wrongly (it skips the epoch or miscounts it). Saved as the state between two
                # epochs, the one a finished run's last.ckpt has: Lightning resumes it with the next epoch.
                counts["ready"] -= 1

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self._rng_to_restore = checkpoint.get("rng_state")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if (kept := own_files(state_dict, self.dirpath)) is not None:
            super().load_state_dict(kept)

    # private-lightning[loops]: two Lightning 2.6 resume workarounds inside its loops (see each comment)
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        loop = trainer.fit_loop
        epoch_loop = loop.epoch_loop
        if (
            loop.restarted_mid_epoch
            and epoch_loop.restarted_on_train_batch_end
            and epoch_loop.batch_progress.is_last_batch
        ):
            # A checkpoint taken after an epoch's last batch, as older mnist_lit ones were. Lightning 2.6 closes
            # that epoch on resume but then runs the next as if already started (never counted as started, no
            # on_train_epoch_start, and its checkpoints resume wrongly), and keeps counting the finished epoch's
            # batches when an epoch has another number of them now (another number of processes). Start the next
            # epoch afresh.
            loop.reset_restart_stage()
            epoch_loop.reset_restart_stage()
            self._new_epoch(epoch_loop)
        epochs = loop.epoch_progress.current
        if epoch_loop.restarting and epochs.ready == epochs.started == epochs.processed:
            # A checkpoint between two epochs (at an epoch's start, or a finished run's). With max_steps set,
            # Lightning 2.6 resumes it as restarting all the same and counts the finished epoch's batches as the
            # next one's: it would skip that epoch whole. The next epoch's batches start from zero.
            self._new_epoch(epoch_loop)
        # A resumed run starts from a checkpoint of this very step: nothing new to save until the next step.
        self._last_global_step_saved = self._step_seen = trainer.global_step
        # Restored here, not on load: the sanity check and loader setup in between must not shift it.
        if self._rng_to_restore:
            torch.set_rng_state(self._rng_to_restore["cpu"])
            if "cuda" in self._rng_to_restore and pl_module.device.type == "cuda":
                torch.cuda.set_rng_state(self._rng_to_restore["cuda"], pl_module.device)
            self._rng_to_restore = None
        self._arm()

    @staticmethod
    def _new_epoch(epoch_loop: Any) -> None:
        # Lightning's own loop counters, reset as it does when an epoch starts (tests/test_resume.py resumes each
        # kind of checkpoint that needs this and fails if a Lightning upgrade changes them).
        epoch_loop.batch_progress.reset_on_run()
        epoch_loop.scheduler_progress.reset_on_run()
        epoch_loop.automatic_optimization.optim_progress.reset_on_run()
        epoch_loop.val_loop.batch_progress.total.reset()

    # --- stopping early: a signal or a limit, with a checkpoint of the step reached ----------------------------

    # Ctrl-C and SIGTERM while the training loop runs: mnist_lit.signals hands them to catch()

    def _arm(self) -> None:
        self._stop_signal = None
        signals.arm(self)

    def _disarm(self) -> None:
        signals.disarm(self)

    def catch(self, signum: int) -> bool:
        """Take a signal during training: True for the first (stop at the next batch), False for a second."""
        if self._stop_signal is not None:
            return False
        self._stop_signal = signum
        return True

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._disarm()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._disarm()

    def _signal(self, trainer: Trainer, pl_module: LightningModule) -> int:
        """The signal this run stops on, 0 if none: under DDP every process names the one any of them got."""
        signum = self._stop_signal or 0
        if trainer.world_size > 1:
            signum = int(trainer.strategy.reduce(torch.tensor(signum, device=pl_module.device), reduce_op="max"))
        return signum

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        signum = self._signal(trainer, pl_module)
        stepped, self._step_seen = trainer.global_step != self._step_seen, trainer.global_step
        if batch_idx + 1 == trainer.num_training_batches:
            # An epoch's last batch: its validation, the callbacks' epoch-end state and the epoch's scheduler step
            # (ReduceLROnPlateau's included) come after it. A checkpoint taken here would miss them, and a resume
            # from it would skip them; a save or a stop due here waits for the next epoch's start (or train end).
            every = self._every_n_train_steps
            self._save_due = self._save_due or (every >= 1 and trainer.global_step % every == 0)
            trainer.should_stop, self._stop_asked = trainer.should_stop or self._stop_asked, False
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not stepped:
            # Mid gradient accumulation: the gradients summed so far go into no checkpoint, so a stop here would
            # lose them on resume. A signal waits for the batch that steps; so does a stop another callback asked
            # for (max_time's Timer), asked again there.
            self._stop_asked = self._stop_asked or trainer.should_stop
            trainer.should_stop = False
            return
        trainer.should_stop, self._stop_asked = trainer.should_stop or self._stop_asked, False
        # Callbacks that end training (max_time's Timer, EarlyStopping) run before this one (Lightning puts
        # checkpoint callbacks last): a stop they asked for is already set.
        if signum or trainer.should_stop or 0 <= trainer.max_steps <= trainer.global_step:
            self._save_now(trainer)  # now, while the loop's state still says where in the epoch it is
        if signum:
            self._stop(trainer, signum)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        signum = self._signal(trainer, pl_module)  # also one that came during the last epoch's validation
        if self._save_due and not self._should_skip_saving_checkpoint(trainer):
            self._save_periodic(trainer)
        self._save_due = False
        if signum:
            self._save_now(trainer)
            self._stop(trainer, signum)

    # private-lightning[loops]: Lightning 2.6's skipped ReduceLROnPlateau step after a resume (see the comment)
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        loop = trainer.fit_loop
        plateaus = [c.monitor for c in trainer.lr_scheduler_configs if c.reduce_on_plateau]
        if plateaus and loop.restarting and loop.epoch_loop.batch_progress.is_last_batch:
            # Lightning 2.6 skips ReduceLROnPlateau's step at the end of the first epoch after a resume, taking the
            # validation metrics for lost. Checkpoints here are never taken after an epoch's validation, so this
            # epoch validated anew: step as an uninterrupted run does (the non-plateau ones already stepped).
            if all(monitor in trainer.callback_metrics for monitor in plateaus):
                loop.epoch_loop.update_lr_schedulers("epoch", update_plateau_schedulers=True)

    def _stop(self, trainer: Trainer, signum: int) -> None:
        step, saved = trainer.global_step, self.newest_saved()
        if saved and self._last_global_step_saved == step:
            done = f"stopped at step {step} and saved {saved}; resume with `fit --ckpt_path last`"
        elif saved:
            done = f"stopped at step {step}; the newest checkpoint is {saved}; resume with `fit --ckpt_path last`"
        elif self.save_last or self.save_top_k != 0:
            done = f"stopped at step {step}, before any training step; nothing new was saved"
        else:
            done = f"stopped at step {step}; no checkpoint was saved (--checkpoint.save_last and save_top_k are off)"
        raise Interrupted(f"{signal.Signals(signum).name}: {done}", signum)
