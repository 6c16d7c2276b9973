"""A trained run on disk, as every command opens it: the one front door to checkpoints for fit, validate, test,
predict, export, serve and --model.init_from.

- `load` resolves 'last' (the run's newest checkpoint), reads and verifies the file once (checkpoints: digest, weights
  only, hyperparameters checked as data) and hands back a `Trained`: its path, contents, hyperparameters, dataset
  and network, each worked out once.
- `open_run` is what a Lightning subcommand does before anything is built: takes fit's run lock, refuses to write
  over an earlier run, resolves fit's 'auto', loads --ckpt_path and --model.init_from through `load`, and applies
  the rules of a resume (`check_resume_changes`, `resumed_seed`).

Taking the checkpoint's hyperparameters into the parsed options is the command line's part (mnist_lit.cli.lightning), as
only it holds the parser.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from mnist_lit.checkpoints import (
    AUTO,
    EXTENSION,
    LAST,
    RunLock,
    check_resumable,
    check_weights,
    hand_over,
    load_ckpt_path,
    load_weights,
    newest_checkpoint,
    refuse_link,
    refuse_linked_folder,
    resolve,
    run_seed,
    tunable,
)
from mnist_lit.datasets import DATASETS, recorded_dataset
from mnist_lit.errors import CheckpointError, ConfigError, DataError, Untrusted
from mnist_lit.model import GUIDE_SGD, NET_SPEC, LitMNIST, check_contract
from mnist_lit.trust import check_model_hparams, check_spec


@dataclass(eq=False)
class Trained:
    """One checkpoint of a trained run, read and verified once: what a command needs of it."""

    path: str  # the file ('last' resolved)
    checkpoint: dict[str, Any]  # its verified contents
    hparams: dict[str, Any]  # the LitMNIST arguments it was trained with, as specs
    dataset: str  # the name of the dataset it was trained on

    @functools.cached_property
    def net(self) -> nn.Module:
        """Its network, rebuilt from its spec with its weights, in eval mode (built on first use, then kept)."""
        return net_from(self.path, self.net_spec, self.checkpoint["state_dict"], prefix="net.")

    @property
    def net_spec(self) -> dict[str, Any]:
        return self.hparams.get("net") or NET_SPEC  # none recorded, or recorded as None: the guide's Net

    def weights_into(self, model: nn.Module) -> None:
        """Its weights into a model of the same shapes (--model.init_from's): refused in one line otherwise."""
        check_weights(self.path, self.checkpoint, model)
        model.load_state_dict(self.checkpoint["state_dict"], strict=True)

    def model(self) -> LitMNIST:
        """The whole LitMNIST with its weights, for your own code: `runs.load(path).model()` is the safe
        LitMNIST.load_from_checkpoint (Lightning's own builds whatever a file names: for files you trust only)."""
        model = LitMNIST(**{**self.hparams, "net": self.net.train()})
        model.hparams["net"] = self.net_spec
        model.load_state_dict(self.checkpoint["state_dict"], strict=True)
        return model


def load(ckpt_path: str | os.PathLike, directory: Path | None = None) -> Trained:
    """The checkpoint ckpt_path names ('last': the newest in directory), verified, with a network its weights fit."""
    path, checkpoint = load_ckpt_path(os.fspath(ckpt_path), directory or Path("checkpoints"), fitting=False)
    return _trained(path, checkpoint)


def hparams_from(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The LitMNIST arguments a checkpoint was trained with, checked as data (mnist_lit.trust), as specs."""
    hparams = check_model_hparams(checkpoint.get("hyper_parameters"))
    if "lr" in hparams or "momentum" in hparams:  # written before the optimizer became an option: the guide's SGD
        init_args = {**GUIDE_SGD["init_args"], "lr": hparams.pop("lr", 0.01), "momentum": hparams.pop("momentum", 0.5)}
        hparams["optimizer"] = {**GUIDE_SGD, "init_args": init_args}
    return hparams


def net_from(path: str, spec: Any, state_dict: dict[str, Any], prefix: str = "") -> nn.Module:
    """The network a file holds, built from its spec (checked as data first: mnist_lit.trust) with the weights
    under prefix ('net.' in a checkpoint), in eval mode; its convolutions in the plain layout (a channels_last
    run's are not)."""
    spec = spec or NET_SPEC  # none recorded: the guide's Net
    try:
        cls = check_spec("net", spec)
    except Untrusted as err:
        raise CheckpointError(f"refusing to load {path}: {err}") from None
    net = cls(**((spec.get("init_args") if isinstance(spec, dict) else None) or {}))
    check_weights(path, {"state_dict": state_dict}, nn.ModuleDict({"net": net}) if prefix else net)
    net.load_state_dict({k.removeprefix(prefix): v.contiguous() for k, v in state_dict.items()}, strict=True)
    try:  # what serve and export would otherwise find out from a request, or not at all
        check_contract(net)
    except ValueError as err:
        raise CheckpointError(f"{path} holds a network that is of no use here: {err}") from None
    return net.eval()


def open_weights(path: str) -> nn.Module:
    """The network in a .pth file that export wrote, read as data, with its weights (a bare state_dict: the
    guide's Net's)."""
    state = load_weights(path)
    if "net" not in state:
        return net_from(path, NET_SPEC, state)
    return net_from(path, state["net"], state["state_dict"] if isinstance(state.get("state_dict"), dict) else {})


def _trained(path: str, checkpoint: dict[str, Any]) -> Trained:
    trained = Trained(path, checkpoint, hparams_from(checkpoint), recorded_dataset(checkpoint))
    trained.net  # noqa: B018  (built now: a checkpoint whose weights do not fit its own network is refused here)
    return trained


@dataclass(eq=False)
class Run:
    """What a Lightning subcommand starts from, once open_run has checked it; close() when the command ends."""

    resume: Trained | None = None  # --ckpt_path's checkpoint: fit resumes it, the others evaluate its weights
    init: Trained | None = None  # --model.init_from's: a new run starts from its weights
    lock: RunLock | None = field(default=None, repr=False)  # fit's, held until close()

    def close(self) -> None:
        hand_over(None)
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def open_run(
    subcommand: str,
    ckpt_path: str | None,
    directory: Path,
    init_from: str | None = None,
    init_directory: Path | None = None,
    dataset: str | None = None,
    main_process: bool = True,
) -> Run:
    """Check a subcommand's checkpoints before anything is built or written.

    ckpt_path: --ckpt_path (fit: None starts a new run, 'auto' resumes one if there is one); directory: where this
    run's checkpoints are (fit's are written there); init_from and init_directory: --model.init_from and where its
    'last' is; dataset: --data.dataset as given (None: the checkpoint's); main_process: whether this process takes
    fit's run lock (one per run, not one per DDP process).
    """
    fitting = subcommand == "fit"
    if fitting:
        refuse_linked_folder(directory)
        if directory.exists() and not directory.is_dir():
            raise CheckpointError(f"{directory} is a file, but checkpoints go there: pass another --checkpoint.dirpath")
    run = Run()
    if init_from is not None:
        run.init = _open_init_from(init_from, ckpt_path, init_directory or directory, directory)
    try:
        if fitting and main_process:
            # Before the look for an earlier run: two fits started together must not both find none.
            run.lock = RunLock(directory)
            run.lock.acquire()
            # what a fit writes there must be a file or nothing: refused now, not after training (a link planted
            # as last.ckpt, a folder named like a checkpoint); looked for once no other fit can be writing there
            try:
                for path in sorted(directory.glob(f"*{EXTENSION}")):
                    refuse_link(path)
            except CheckpointError as err:
                raise CheckpointError(f"{err}; remove it, or pass another --trainer.default_root_dir") from None
        earlier = newest_checkpoint(directory) if fitting else None  # a run this fit would write over
        if fitting and ckpt_path == AUTO:  # resume if there is a run to resume, else start one
            ckpt_path = None if earlier is None else resolve(AUTO, directory, fitting)
        if ckpt_path is None:
            if earlier is not None:
                raise CheckpointError(
                    f"{earlier} holds an earlier run, which a new run would overwrite: resume it with --ckpt_path"
                    " last, or start the new run in another --trainer.default_root_dir"
                )
            if not fitting:  # the model's random initial weights would be evaluated as if trained
                raise CheckpointError(f"{subcommand} needs trained weights: pass --ckpt_path last or a checkpoint file")
            return run
        path, checkpoint = load_ckpt_path(ckpt_path, directory, fitting)
        trained = _trained(path, checkpoint)
        if fitting:
            check_resumable(path, checkpoint)
            if earlier is not None and Path(path).resolve().parent != directory.resolve():
                raise CheckpointError(
                    f"{earlier} holds another run, which resuming {path} here would overwrite: resume"
                    " it in its own --trainer.default_root_dir, or here in an empty one"
                )
        if dataset not in (None, trained.dataset):
            raise DataError(
                f"{path} was trained on {DATASETS[trained.dataset].title} ({trained.dataset}), not on"
                f" {DATASETS[dataset].title}: drop --data.dataset {dataset} (the checkpoint's dataset is used)"
            )
        run.resume = trained
        # Lightning's load of it (a resume, test's weights) takes this one. An evaluation restores its own loop's
        # progress from it, which it then resets, and reads it unchecked (a file without test_loop: a KeyError):
        # left out, as a run's own evaluation has nothing to restore.
        hand_over(path, checkpoint if fitting else {k: v for k, v in checkpoint.items() if k != "loops"})
        return run
    except BaseException:
        run.close()
        raise


def _open_init_from(init_from: str, ckpt_path: str | None, source: Path, directory: Path) -> Trained:
    """--model.init_from's checkpoint, checked: not with --ckpt_path, not the folder this run writes to."""
    if ckpt_path is not None:
        raise ConfigError(
            "--model.init_from starts a new run from a checkpoint's weights and --ckpt_path continues one: pass"
            " one of them"
        )
    path = resolve(init_from, source, fitting=False)
    if init_from == LAST and source.resolve() == directory.resolve():
        raise CheckpointError(
            f"--model.init_from last is {path}, in the folder this run's checkpoints would overwrite: give the"
            " new run its own --checkpoint.dirpath, or pass init_from the file and use another"
            " --trainer.default_root_dir"
        )
    return load(init_from, source)


# --- the rules of a resume -------------------------------------------------------------------------------------


def resumed_seed(trained: Trained, seed: Any, given: bool) -> Any:
    """The seed a resumed run goes on with: its own random state and data order, whatever --seed_everything says.
    One given anew (given) that differs is refused, not silently ignored; config.yaml records the run's own."""
    own = run_seed(trained.checkpoint)
    if own is None:
        return seed
    if given and seed != own:
        raise ConfigError(
            f"--seed_everything cannot change when resuming {trained.path} (its run's seed is {own}: the resumed"
            " run goes on with that run's random state and data order); start a new run for another seed"
        )
    return own


def run_split(checkpoint: dict[str, Any], subcommand: str) -> int | None:
    """The --data.val_size a fit or validate of this checkpoint's run takes (None: not one to keep): its own, so
    that the images it trains on, and those it is validated on, stay the ones it held out."""
    data = checkpoint.get("datamodule_hyper_parameters")
    if subcommand not in ("fit", "validate") or not isinstance(data, dict) or data.get("image_dir") is not None:
        return None
    size = data.get("val_size")
    return size if isinstance(size, int) and not isinstance(size, bool) and size >= 0 else None


def check_split(ckpt_path: str, then: int | None, now: int, subcommand: str) -> None:
    """Refuse a --data.val_size given anew that would change a resumed run's training images, or have validate
    score images the run trained on (then: the run's own, from run_split)."""
    if then is None:
        return
    if subcommand == "fit" and now != then:
        raise ConfigError(
            f"--data.val_size cannot change when resuming {ckpt_path} (it was {then}: the images it trains on would"
            " change); start a new run for another split"
        )
    if subcommand == "validate" and then == 0:
        raise DataError(
            f"{ckpt_path} was trained on all the training images (--data.val_size 0): none were held out to validate"
            " on; use test"
        )
    if subcommand == "validate" and now > then:
        raise DataError(
            f"{ckpt_path} was trained with --data.val_size {then}: a validation set of {now} would score images it"
            f" trained on; pass --data.val_size {then} or less"
        )


def _spec(value: Any) -> Any:
    """A class-path spec with its init_args spelt out, empty or not: one spelling for comparing two."""
    if isinstance(value, dict) and "class_path" in value:
        return {"class_path": value["class_path"], "init_args": value.get("init_args") or {}}
    return value


def check_resume_changes(ckpt_path: str, trained: dict[str, Any], given: dict[str, Any]) -> None:
    """Refuse, naming the option, a --model option given anew on a resume that the run cannot take from here on.

    A new number for the optimizer (lr, momentum, weight_decay, Adam's betas ...) is applied to the restored
    optimizer (LitMNIST.on_train_start); its class, its switches, the schedule and the model's layout are not:
    the restored optimizer and scheduler state belong to them.
    """
    where = f"resuming {ckpt_path}"
    for name in given.keys() | trained.keys():
        old, new = _spec(trained.get(name)), _spec(given.get(name))
        if old == new:
            continue
        if name != "optimizer":
            raise ConfigError(f"--model.{name} cannot change when {where} (it was {old!r}); start a new run for that")
        if old["class_path"] != new["class_path"]:
            raise ConfigError(
                f"--model.optimizer cannot change when {where} (it was {old['class_path']}, whose state the"
                " checkpoint holds); start a new run for another optimizer"
            )
        old_args, new_args = old.get("init_args", {}), new.get("init_args", {})
        for arg in sorted(old_args.keys() | new_args.keys()):
            before, after = old_args.get(arg), new_args.get(arg)
            if before == after:
                continue
            if not (tunable(before) and tunable(after)):
                raise ConfigError(
                    f"--model.optimizer.{arg} cannot change when {where} (it was {before!r}); start a new run for that"
                )
            if trained.get("lr_scheduler") and arg in ("lr", "momentum", "betas"):
                raise ConfigError(
                    f"--model.optimizer.{arg} cannot change when {where}: its --model.lr_scheduler sets it"
                )


def restored_epoch(checkpoint: dict[str, Any]) -> int | None:
    """The epoch a resume of this checkpoint starts in, as Lightning restores it (None: the file does not say)."""
    try:
        epoch = checkpoint["loops"]["fit_loop"]["epoch_progress"]["current"]["completed"]
    except (KeyError, TypeError):
        return None
    return epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else None


def nothing_to_train(ckpt_path: Any, step: Any, epoch: Any, max_epochs: Any, max_steps: Any) -> str:
    """The line a resume of a run already at (or past) its limits ends with."""
    return (
        f"nothing to train: {ckpt_path} is at step {step}, epoch {epoch}, already at the run's limits"
        f" (--trainer.max_epochs {max_epochs}, --trainer.max_steps {max_steps}): raise them to train further"
    )
