"""The register of other libraries' message text mnist_lit reads. Where the package matches a library's words (to
rewrite its error as one line, to recognise a lost peer, to filter a warning that says nothing true), it carries the
tag `# their-words[NAME]: why`, and NAME is an entry here that makes the library say those words for real and checks
what the package makes of them (or, for gloo's C++ and Lightning's warnings, finds the words in the library itself):
an upgrade that rewords one fails here, by name, instead of a user seeing a traceback wall or a warning come back."""

from __future__ import annotations

import inspect
import io
import os
import pickle
import re
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Literal

import pytest
import torch
from helpers.cli import ROOT

TAG = re.compile(r"#\s*their-words\[([\w.-]+)\]:\s*(\S.*)")


def refusal(*args: str) -> str:
    """jsonargparse's own message for args, from a parser with the kinds of option the CLI has."""
    from jsonargparse import ArgumentError, ArgumentParser
    from jsonargparse.typing import PositiveInt

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--model.batch", type=PositiveInt, default=1)
    parser.add_argument("--model.maybe", type=int | None, default=None)
    parser.add_argument("--model.n", type=int, default=1)
    parser.add_argument("--model.kind", type=Literal["a", "b"], default="a")
    parser.add_argument("--model.optimizer", type=Callable[[Iterable], torch.optim.Optimizer], default=None)
    parser.add_argument("--model.net", type=torch.nn.Module, default=None)
    parser.add_argument("--needed", type=int, required=True)
    with pytest.raises(ArgumentError) as raised:
        parser.parse_args([*args, *(["--needed", "1"] if "--needed" not in args else [])])
    return str(raised.value)


def explained(*args: str) -> str:
    from mnist_lit.cli.messages import explain

    return explain(refusal(*args))


def check_restriction() -> None:
    assert explained("--model.batch", "0") == "--model.batch: 0 is out of range; it must be > 0"


def check_not_a_number() -> None:
    assert explained("--model.batch", "x") == "--model.batch: 'x' is not valid; it takes an int > 0"


def check_union() -> None:
    assert explained("--model.maybe", "x") == "--model.maybe: 'x' is not valid; it takes int or null"


def check_type() -> None:
    assert explained("--model.n", "x") == "--model.n: 'x' is not valid; it takes int"


def check_literal() -> None:
    assert explained("--model.kind", "c") == "--model.kind: 'c' is not valid; it takes one of 'a', 'b'"


def check_class() -> None:
    assert explained("--model.optimizer", "NoSuch") == (
        "--model.optimizer: no class named 'NoSuch' (give the name of a class it takes, or its import path)"
    )
    assert explained("--model.net", "torch.nn.Linear") == (
        "--model.net Linear needs in_features, out_features: add --model.net.in_features VALUE"
        " --model.net.out_features VALUE"
    )
    assert explained("--model.net", "nosuch.Thing") == "--model.net Thing: No module named 'nosuch'"
    bogus = explained("--model.optimizer", "SGD", "--model.optimizer.bogus", "1")
    assert bogus == "--model.optimizer.bogus: SGD has no option 'bogus'"
    assert explained("--model.optimizer", "SGD", "--model.optimizer.lr", "x").startswith(
        "--model.optimizer.lr: 'x' is not valid; it takes float"
    )


def check_required() -> None:
    from jsonargparse import ArgumentError, ArgumentParser

    from mnist_lit.cli.messages import explain

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--needed", type=int, required=True)
    with pytest.raises(ArgumentError) as raised:
        parser.parse_args([])
    assert explain(str(raised.value)) == "the following options are required: --needed"


def check_choice() -> None:
    from jsonargparse import ArgumentError, ArgumentParser

    from mnist_lit.cli.messages import explain

    parser = ArgumentParser(exit_on_error=False)
    commands = parser.add_subcommands()
    for name in ("fit", "test"):
        commands.add_subcommand(name, ArgumentParser(exit_on_error=False))
    with pytest.raises(ArgumentError) as raised:
        parser.parse_args(["fitt"])
    assert explain(str(raised.value)).startswith("'fitt' is not a subcommand; choose from "), str(raised.value)
    assert explain(str(raised.value)).endswith("; did you mean fit?")


def check_unrecognized() -> None:
    from jsonargparse import ArgumentError, ArgumentParser

    from mnist_lit.cli.messages import explain

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--model.lr", type=float, default=0.01)
    with pytest.raises(ArgumentError) as raised:
        parser.parse_args(["--model.lrr", "1"])
    assert explain(str(raised.value), names=["--model.lr"]).endswith("; did you mean --model.lr?")


def check_config_key() -> None:
    from jsonargparse import ArgumentError, ArgumentParser

    from mnist_lit.cli.messages import config_key_error

    parser = ArgumentParser(exit_on_error=False)
    commands = parser.add_subcommands()
    fit = ArgumentParser(exit_on_error=False)
    fit.add_argument("--config", action="config")
    fit.add_argument("--trainer.max_epochs", type=int, default=10)
    commands.add_subcommand("fit", fit)
    with tempfile.TemporaryDirectory() as folder:
        config = Path(folder) / "mine.yaml"
        config.write_text("trainer:\n  max_epoch: 2\n")
        with pytest.raises(ArgumentError) as raised:
            parser.parse_args(["fit", "--config", str(config)])
        error = config_key_error(str(raised.value), ["fit", "--config", str(config)])
    assert error is not None, str(raised.value)
    assert (
        str(error) == f"--config {config}: trainer.max_epoch is not an option of fit; did you mean trainer.max_epochs?"
    )


def check_accelerator() -> None:
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch import Trainer

    from mnist_lit.cli.messages import explain_accelerator

    if torch.cuda.is_available():
        pytest.skip("this machine has the GPU whose absence the message is about")
    for accelerator in ("gpu", "cuda"):
        with pytest.raises(MisconfigurationException) as raised:
            Trainer(accelerator=accelerator, logger=False, enable_checkpointing=False)
        assert explain_accelerator(str(raised.value), None) is not None, str(raised.value)


def check_val_check_interval() -> None:
    from lightning.pytorch import Trainer
    from lightning.pytorch.demos.boring_classes import BoringModel

    from mnist_lit.cli.messages import error_line

    trainer = Trainer(
        max_epochs=1, val_check_interval=10_000, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    with pytest.raises(ValueError) as raised:
        trainer.fit(BoringModel())
    assert (error_line(raised.value) or "").startswith("error: --trainer.val_check_interval ("), str(raised.value)


def source_of(module: str) -> str:
    return inspect.getsource(__import__(module, fromlist=["_"]))


def check_lightning_warnings() -> None:
    # each filter of mnist_lit.cli.messages.quiet_lightning, and the library module whose words it matches
    for words, module in (
        ("💡 Tip", "lightning.pytorch.trainer.connectors.logger_connector.logger_connector"),
        ("💡 Tip", "lightning.pytorch.trainer.connectors.callback_connector"),
        ("`isinstance(treespec, LeafSpec)` is deprecated", "torch.utils._pytree"),
        ("Please add the following callbacks", "lightning.pytorch.trainer.call"),
        ("exists and is not empty", "lightning.pytorch.callbacks.model_checkpoint"),
        ("Total length of `", "lightning.pytorch.utilities.data"),
        ("is smaller than the logging interval", "lightning.pytorch.loops.fit_loop"),
        ("`srun` command is available on your system but is not used", "lightning.fabric.plugins.environments.slurm"),
    ):
        assert words in source_of(module), (words, module)


def check_gloo() -> None:
    # gloo and the TCP store are C++: their words are in torch's library, where mnist_lit.nodes looks for them
    library = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    if not library.exists():
        pytest.skip(f"{library} is not there on this platform")
    data = library.read_bytes()
    for words in ("Connection closed by peer", "pair closure", "waiting for clients", "Timed out", "connectFullMesh",
                  "wait timeout"):  # fmt: skip
        assert words.encode() in data, words


def check_weights_only() -> None:
    from mnist_lit.checkpoints.files import _unpickle
    from mnist_lit.errors import CheckpointError

    class Hostile:
        def __reduce__(self) -> tuple:
            return (os.system, ("true",))

    buffer = io.BytesIO()
    torch.save({"hostile": Hostile()}, buffer)
    with pytest.raises(pickle.UnpicklingError):  # torch's own refusal, read by the package below
        torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    with pytest.raises(CheckpointError, match="it holds pickled Python objects, not just tensors"):
        _unpickle("hostile.ckpt", buffer.getvalue(), "checkpoint")


def check_help() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--model.net", type=torch.nn.Module, default=None)
    assert re.search(r"known\s+subclasses:", parser.format_help())


def check_litserve_monitoring() -> None:
    assert 'logger.exception("Monitoring worker crashed")' in source_of("litserve.server")


REGISTER: dict[str, Callable[[], None]] = {
    "jsonargparse.restriction": check_restriction,
    "jsonargparse.not-a-number": check_not_a_number,
    "jsonargparse.union": check_union,
    "jsonargparse.type": check_type,
    "jsonargparse.literal": check_literal,
    "jsonargparse.class": check_class,
    "jsonargparse.config-key": check_config_key,
    "jsonargparse.help": check_help,
    "argparse.required": check_required,
    "argparse.choice": check_choice,
    "argparse.unrecognized": check_unrecognized,
    "lightning.accelerator": check_accelerator,
    "lightning.val_check_interval": check_val_check_interval,
    "lightning.warnings": check_lightning_warnings,
    "gloo": check_gloo,
    "torch.weights_only": check_weights_only,
    "litserve.monitoring": check_litserve_monitoring,
}


def tagged() -> list[tuple[str, int, str]]:
    return [
        (str(path.relative_to(ROOT)), number, match[1])
        for path in sorted((ROOT / "mnist_lit").rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if (match := TAG.search(line))
    ]


@pytest.mark.parametrize("name", list(REGISTER))
def test_each_librarys_words_are_still_what_the_package_reads(name):
    REGISTER[name]()


def test_every_tag_names_an_entry_of_the_register_and_every_entry_is_used():
    tags = tagged()
    unknown = [f"{file}:{line} {name}" for file, line, name in tags if name not in REGISTER]
    assert not unknown, f"tags without a register entry: {unknown}"
    assert not set(REGISTER) - {name for _, _, name in tags}, "register entries no code uses"
