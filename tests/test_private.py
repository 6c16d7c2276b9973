"""The register of private Lightning and Optuna names mnist_lit uses. Each use in the package carries the tag
`# private-lightning[NAME]: why` (or private-optuna[NAME]), and NAME is an entry here that checks the name is still
there with the signature the code relies on: an upgrade that moves or changes one fails here, by name, not somewhere
mid-run."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable

import pytest
from helpers.cli import ROOT

TAG = re.compile(r"#\s*private-(?:lightning|optuna)\[([\w.,-]+)\]:\s*(\S.*)")


def parameters(function: Callable) -> list[str]:
    return list(inspect.signature(function).parameters)


def cli() -> type:
    from lightning.pytorch.cli import LightningCLI

    return LightningCLI


def model_checkpoint() -> type:
    from lightning.pytorch.callbacks import ModelCheckpoint

    return ModelCheckpoint


def loops() -> tuple[type, type]:
    from lightning.pytorch.loops.fit_loop import _FitLoop
    from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop

    return _FitLoop, _TrainingEpochLoop


def check_parse_ckpt_path() -> None:
    # switched off (mnist_lit.runs does its work in parse_arguments): it must still be one call in
    # LightningCLI.__init__, right after parse_arguments and before anything is seeded or built
    assert parameters(cli()._parse_ckpt_path) == ["self"]
    init = inspect.getsource(cli().__init__)
    assert init.index("self.parse_arguments(") < init.index("self._parse_ckpt_path()") < init.index("self._set_seed()")
    assert init.index("self._parse_ckpt_path()") < init.index("self.instantiate_classes()")


def check_signal_connector() -> None:
    from lightning.pytorch import Trainer
    from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector

    assert parameters(_SignalConnector.register_signal_handlers) == ["self"]
    assert "_signal_connector" in inspect.getsource(Trainer.__init__)


def check_loops() -> None:
    from lightning.pytorch.loops.progress import _BatchProgress, _OptimizationProgress, _SchedulerProgress

    fit_loop, epoch_loop = loops()
    assert isinstance(inspect.getattr_static(fit_loop, "restarted_mid_epoch"), property)
    assert isinstance(inspect.getattr_static(epoch_loop, "restarted_on_train_batch_end"), property)
    assert parameters(fit_loop.reset_restart_stage) == parameters(epoch_loop.reset_restart_stage) == ["self"]
    for progress in (_BatchProgress, _SchedulerProgress, _OptimizationProgress):
        assert parameters(progress.reset_on_run) == ["self"]
    assert parameters(epoch_loop.update_lr_schedulers) == ["self", "interval", "update_plateau_schedulers"]


def check_cloud_io() -> None:
    from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
    from lightning.fabric.utilities.types import _PATH  # noqa: F401

    assert parameters(_is_local_file_protocol) == ["path"]
    assert _is_local_file_protocol("/tmp/x.ckpt") and not _is_local_file_protocol("s3://bucket/x.ckpt")


def check_model_checkpoint_state() -> None:
    checkpoint = model_checkpoint()(every_n_train_steps=10)
    assert checkpoint._every_n_train_steps == 10
    assert checkpoint._last_global_step_saved == 0 and checkpoint._last_checkpoint_saved == ""


def check_ddp_timeout() -> None:
    from lightning.pytorch.strategies import DDPStrategy

    assert "timeout" in parameters(DDPStrategy.__init__)
    assert "self._timeout" in inspect.getsource(DDPStrategy.__init__)
    assert "self._timeout" in inspect.getsource(DDPStrategy.setup_distributed)


def check_evaluation_verbose() -> None:
    # ResultsTable takes the loop's verbose (set by trainer.test/validate) and prints the table in its place
    from lightning.pytorch import Trainer
    from lightning.pytorch.loops.evaluation_loop import _EvaluationLoop

    assert "self.test_loop.verbose = verbose" in inspect.getsource(Trainer._test_impl)
    assert "self.validate_loop.verbose = verbose" in inspect.getsource(Trainer._validate_impl)
    run_end = inspect.getsource(_EvaluationLoop.on_run_end)
    assert "self._on_evaluation_end()" in run_end and "if self.verbose" in run_end
    assert run_end.index("self._on_evaluation_end()") < run_end.index("self._print_results(")


def check_current_fx_name() -> None:
    # mnist_lit.lean sets it as a plain attribute: Lightning must still keep it as one, set around each hook call
    from lightning.pytorch import LightningModule
    from lightning.pytorch.trainer import call

    assert "self._current_fx_name: Optional[str] = None" in inspect.getsource(LightningModule.__init__)
    for hooks in (call._call_lightning_module_hook, call._call_callback_hooks):
        assert "pl_module._current_fx_name = hook_name" in inspect.getsource(hooks)


def signature(owner: Callable[[], type], name: str, expected: list[str]) -> Callable[[], None]:
    def check() -> None:
        function = getattr(owner(), name)
        assert parameters(function)[: len(expected)] == expected, f"{name}{inspect.signature(function)}"

    return check


def check_trial_id() -> None:
    import optuna

    from mnist_lit.sweep.study import trial_id_of

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study()
    trial = study.ask()
    assert isinstance(trial_id_of(trial), int)
    assert study._storage.get_trial(trial_id_of(trial)).number == trial.number  # the id the storage knows it by


REGISTER: dict[str, Callable[[], None]] = {
    "LightningCLI._parse_ckpt_path": check_parse_ckpt_path,
    "LightningCLI._instantiate_trainer": signature(cli, "_instantiate_trainer", ["self", "config", "callbacks"]),
    "Trainer._signal_connector": check_signal_connector,
    "ModelCheckpoint._save_checkpoint": signature(
        model_checkpoint, "_save_checkpoint", ["self", "trainer", "filepath"]
    ),
    "ModelCheckpoint._save_topk_checkpoint": signature(
        model_checkpoint, "_save_topk_checkpoint", ["self", "trainer", "monitor_candidates"]
    ),
    "ModelCheckpoint._save_last_checkpoint": signature(
        model_checkpoint, "_save_last_checkpoint", ["self", "trainer", "monitor_candidates"]
    ),
    "ModelCheckpoint._monitor_candidates": signature(model_checkpoint, "_monitor_candidates", ["self", "trainer"]),
    "ModelCheckpoint._should_skip_saving_checkpoint": signature(
        model_checkpoint, "_should_skip_saving_checkpoint", ["self", "trainer"]
    ),
    "ModelCheckpoint.state": check_model_checkpoint_state,
    "loops": check_loops,
    "DDPStrategy._timeout": check_ddp_timeout,
    "cloud_io": check_cloud_io,
    "EvaluationLoop.verbose": check_evaluation_verbose,
    "LightningModule._current_fx_name": check_current_fx_name,
    "Trial._trial_id": check_trial_id,
}


def tagged() -> list[tuple[str, int, str, str]]:
    """(file, line, NAME, why) for every tag in the package (and the names in brackets on its comment lines)."""
    found = []
    for path in sorted((ROOT / "mnist_lit").rglob("*.py")):
        last = -10  # the line of this file's latest tag
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if match := TAG.search(line):
                found += [(path.name, number, name, match[2]) for name in match[1].split(",")]
                last = number
            elif line.lstrip().startswith("#") and last >= number - 2 and "their-words[" not in line:
                # further [NAME]s on the tag's comment lines: "... [ModelCheckpoint._monitor_candidates] what ..."
                if names := re.findall(r"\[([\w.]+)\]", line):
                    found += [(path.name, number, name, "") for name in names]
                    last = number
    return found


@pytest.mark.parametrize("name", list(REGISTER))
def test_each_private_name_is_still_there_with_the_signature_the_code_relies_on(name):
    REGISTER[name]()


def test_every_tag_in_the_package_names_an_entry_of_the_register_and_every_entry_is_used():
    tags = tagged()
    assert tags, "no private-lightning tags found"
    unknown = [f"{file}:{line} {name}" for file, line, name, _ in tags if name not in REGISTER]
    assert not unknown, f"tags without a register entry: {unknown}"
    unused = set(REGISTER) - {name for _, _, name, _ in tags}
    assert not unused, f"register entries no code uses: {unused}"
