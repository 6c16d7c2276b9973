"""What a file from elsewhere may ask for. A checkpoint's hyperparameters (and a config file's class paths) are data:
they are checked here, as data, before anything they name is imported, built or called.

The rule for a class path that comes from a file: it names a class (never a function) of the kind its option takes
(an optimizer of torch.optim, a scheduler of torch.optim.lr_scheduler, a network of torch.nn, torchvision.models or
mnist_lit), or of a module the user trusts, and no other module is imported; its arguments are plain values
(numbers, strings, booleans, None, lists of them) of the types the class's signature declares for them, never an
argument whose type is a callable or an object; a network's size is counted on the meta device before it is built.
The user trusts a module by naming a class of it on the command line (`--model.net my_pkg.MyNet`) or in
MNIST_LIT_TRUST (comma-separated module names).
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import jsonargparse.typing
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mnist_lit.errors import Untrusted

TRUST_ENV = "MNIST_LIT_TRUST"
# Names a signature's annotation may hold for an argument a file may set: plain values and containers of them.
PLAIN_TYPE_NAMES = {
    "float", "int", "bool", "str", "None", "NoneType", "Tensor", "torch", "tuple", "Tuple", "list", "List",
    "Sequence", "Iterable", "collections", "abc", "typing", "Optional", "Union", "Literal",
    # jsonargparse.typing's numbers with a range (mnist_lit.model's networks): ints and floats, their range checked
    # by the type (check_spec) before the class is built
    "PositiveInt", "NonNegativeInt", "PositiveFloat", "NonNegativeFloat", "ClosedUnitInterval", "OpenUnitInterval",
}  # fmt: skip
MAX_DEPTH = 2  # a list of lists at most (OneCycleLR's max_lr per group, Adafactor's eps pair)


@dataclass(frozen=True)
class Kind:
    """One class-typed option: where a file may find its class, what the class must be, and the argument we give."""

    option: str
    noun: str
    roots: tuple[str, ...]
    bases: tuple[type, ...]
    given: str | None  # the first argument, which mnist_lit passes itself (the parameters, the optimizer)


KINDS = {
    "optimizer": Kind(
        "--model.optimizer", "a torch.optim optimizer", ("torch.optim",), (torch.optim.Optimizer,), "params"
    ),
    "lr_scheduler": Kind(
        "--model.lr_scheduler",
        "a torch.optim.lr_scheduler scheduler",
        ("torch.optim.lr_scheduler",),
        (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau),
        "optimizer",
    ),
    "net": Kind(
        "--model.net", "a torch.nn.Module", ("mnist_lit", "torch.nn", "torchvision.models"), (nn.Module,), None
    ),
}
# A network's size, counted on the meta device (no memory) before it is built: a file's arguments must not make
# us allocate what the machine does not have. 100 million numbers (400 MB of float32) is far beyond MNIST's needs.
MAX_NET_NUMBERS = 100_000_000
MAX_NET_LAYERS = 10_000  # modules in the network: a ResNet-152 has about 500
# A batch of 2 images through the network: one layer's output at most 25 million numbers (100 MB of float32; the
# Net's largest is 11,520) and 20 billion operations in all (the Net takes 2 million, a ResNet-50 on 28x28 about 0.3
# billion): an upsampling by 1000, a padding of 10,000, a stride that multiplies the size, refused before they run.
MAX_ACTIVATION = 25_000_000
MAX_FLOPS = 20_000_000_000
# The LitMNIST hyperparameters a checkpoint may hold, and what each must be. init_from is never saved: a file
# naming one would make loading it read another file.
MODEL_FIELDS = {"net", "optimizer", "lr_scheduler", "channels_last", "freeze", "lr", "momentum"}
LIGHTNING_INSTANTIATORS = ("lightning.pytorch.cli.instantiate_module", "pytorch_lightning.cli.instantiate_module")
MODEL_CLASS_PATH = "mnist_lit.model.LitMNIST"
CLASS_OPTIONS = tuple(kind.option for kind in KINDS.values())


_named_by_user: list[str] = []  # modules of the class paths on this process's command line


def trust_command_line(args: Iterable[str]) -> None:
    """Trust the modules of the class paths the user's own command line names (--model.optimizer my_pkg.MyOpt)."""
    _named_by_user[:] = named_on(args)


def trusted_modules() -> tuple[str, ...]:
    """Modules the user trusts: those named on the command line, and MNIST_LIT_TRUST's."""
    from_env = [m.strip() for m in os.environ.get(TRUST_ENV, "").split(",") if m.strip()]
    return tuple(dict.fromkeys([*_named_by_user, *from_env]))


def named_on(args: Iterable[str]) -> list[str]:
    """The modules of class paths given as values of class-typed options in args."""
    args = list(args)
    named = []
    for i, arg in enumerate(args):
        option, equals, value = arg.partition("=")
        if not equals:
            value = args[i + 1] if i + 1 < len(args) else ""
        if option in CLASS_OPTIONS and re.fullmatch(r"[A-Za-z]\w*(\.[A-Za-z]\w*)+", value):
            named.append(value.rpartition(".")[0])
    return named


def _within(module: str, roots: Iterable[str]) -> bool:
    return any(module == root or module.startswith(f"{root}.") for root in roots)


def import_trusted(kind: Kind, class_path: Any, trusted: Iterable[str]) -> type:
    """The class a file's class path names, imported only if its module is torch's or trusted."""
    if not isinstance(class_path, str) or not re.fullmatch(r"[A-Za-z]\w*(\.[A-Za-z]\w*)*", class_path):
        raise Untrusted(f"{kind.option}: {class_path!r} is not a class path")
    module, _, name = class_path.rpartition(".")
    module = module or kind.roots[0]  # a short name, e.g. SGD
    allowed = (*kind.roots, *trusted)
    if not _within(module, allowed):
        raise Untrusted(
            f"{kind.option}: {class_path} was not imported: a file may name classes of {', '.join(allowed)} only"
            f" (to trust another module, name the class on the command line or in {TRUST_ENV})"
        )
    try:
        found = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        raise Untrusted(f"{kind.option}: no class named {class_path!r}") from None
    if not (isinstance(found, type) and issubclass(found, kind.bases)):
        raise Untrusted(f"{kind.option}: {class_path} is not {kind.noun}")
    if kind.given is None:  # a network: never a whole LightningModule, which may read files (LitMNIST's init_from)
        from lightning.pytorch import LightningModule

        if issubclass(found, LightningModule):
            raise Untrusted(f"{kind.option}: {class_path} is a LightningModule, not a network")
    return found


def check_spec(field: str, spec: Any, trusted: Iterable[str] | None = None, partial: bool = False) -> type | None:
    """Check a class-path spec ({"class_path": ..., "init_args": {...}}, or a bare class path) as data; return the
    class it names (None for no class). Nothing is built or called. partial: a config file's override of the
    arguments alone (no class_path), whose values must be plain."""
    kind = KINDS[field]
    trusted = trusted_modules() if trusted is None else trusted
    if spec is None:
        return None
    if isinstance(spec, str):
        spec = {"class_path": spec}
    if not isinstance(spec, dict) or set(spec) - {"class_path", "init_args"}:
        raise Untrusted(f"{kind.option}: {_short(spec)} is not a class path with init_args")
    if partial and "class_path" not in spec:
        init_args = spec.get("init_args") or {}
        if not isinstance(init_args, dict) or not all(_plain(value) for value in init_args.values()):
            raise Untrusted(f"{kind.option}.init_args: {_short(init_args)} is not a mapping of names to plain values")
        return None
    cls = import_trusted(kind, spec.get("class_path"), trusted)
    init_args = spec.get("init_args") or {}
    if not isinstance(init_args, dict):
        raise Untrusted(f"{kind.option}.init_args: {_short(init_args)} is not a mapping of argument names to values")
    parameters = inspect.signature(cls.__init__).parameters
    for name, value in init_args.items():
        option = f"{kind.option}.{name}"
        parameter = parameters.get(name) if isinstance(name, str) else None
        if parameter is None or name in ("self", kind.given) or parameter.kind in (parameter.VAR_POSITIONAL,
                                                                                   parameter.VAR_KEYWORD):  # fmt: skip
            raise Untrusted(f"{option}: {cls.__name__} takes no argument {name!r}")
        annotation = _annotation_text(parameter.annotation)
        if (
            annotation is None
            and parameter.annotation is inspect.Parameter.empty
            and _plain(value)
            and not (_has_str(value) or isinstance(value, (list, tuple)))
        ):
            annotation = "a number or a boolean"  # unannotated (a user's network): plain numbers only
        if annotation is None:
            raise Untrusted(
                f"{option}: {cls.__name__}'s {name} is not declared as a plain value, so a file may not set it"
            )
        if not _plain(value):
            raise Untrusted(f"{option}: {_short(value)} is not a plain value (a number, a string, a boolean or a list)")
        if _has_str(value) and not re.search(r"\bstr\b|Literal", annotation):
            raise Untrusted(f"{option}: {_short(value)} is a string, and {cls.__name__}'s {name} takes {annotation}")
        if (ranged := _ranged_type(cls, parameter.annotation)) is not None:
            _check_range(option, ranged, value)
    if field == "net":
        _check_size(kind, cls, init_args)
    return cls


class _OverLimit(Exception):
    """Raised inside a probe's construction the moment it passes a limit: the rest is never built."""


def _check_size(kind: Kind, cls: type, init_args: dict[str, Any]) -> None:
    """Build the network on the meta device (shapes, no memory), stopped as soon as it passes a limit on its layers
    or its numbers (a block count of a million would otherwise take minutes to build even there); then run a batch
    of 2 images through it there, sizing each layer's output and counting the operations, before any real forward
    pass (the contract check's) may allocate them."""
    built = {"layers": 0, "numbers": 0}

    def count(layers: int, numbers: int) -> None:
        built["layers"] += layers
        built["numbers"] += numbers
        if built["layers"] > MAX_NET_LAYERS:
            raise _OverLimit(f"makes over {MAX_NET_LAYERS:,} layers")
        if built["numbers"] > MAX_NET_NUMBERS:
            raise _OverLimit(f"makes weights over the limit of {MAX_NET_NUMBERS:,}")

    module = torch.nn.modules.module
    hooks = [
        module.register_module_module_registration_hook(lambda parent, name, child: count(1, 0)),
        module.register_module_parameter_registration_hook(lambda m, name, p: count(0, _numel(p))),
        module.register_module_buffer_registration_hook(lambda m, name, b: count(0, _numel(b))),
    ]
    try:
        # quiet: a warning of the class's own (torch's on a layer of no size) is the real build's to give, once
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            probe = cls(**init_args)
    except _OverLimit as err:
        raise Untrusted(f"{kind.option} {cls.__name__}: {_short(init_args)} {err}") from None
    except Exception as err:  # the arguments do not fit the class
        raise Untrusted(f"{kind.option} {cls.__name__}: cannot be built from {_short(init_args)} ({err})") from None
    finally:
        for hook in hooks:
            hook.remove()
    if any(nn.parameter.is_lazy(t) for t in (*probe.parameters(), *probe.buffers())):
        raise Untrusted(
            f"{kind.option} {cls.__name__}: has layers of no set size (a lazy module), so it cannot be counted"
        )
    numbers = sum(t.numel() for t in (*probe.parameters(), *probe.buffers()))
    if numbers > MAX_NET_NUMBERS:
        raise Untrusted(
            f"{kind.option} {cls.__name__}: {_short(init_args)} makes {numbers:,} weights, over the limit of"
            f" {MAX_NET_NUMBERS:,}"
        )
    _check_forward(kind, cls, probe)


def _check_forward(kind: Kind, cls: type, probe: nn.Module) -> None:
    """A batch of 2 images through the meta-device probe: no layer's output over MAX_ACTIVATION numbers, no more
    than MAX_FLOPS operations. A network whose forward cannot run on the meta device (one that reads its tensors'
    values) is left to the contract check; torch's own layers all run there."""
    largest = [0]

    def size(module: nn.Module, inputs: Any, output: Any) -> None:
        numbers = _numel(output) if isinstance(output, torch.Tensor) else 0
        largest[0] = max(largest[0], numbers)
        if numbers > MAX_ACTIVATION:
            raise _OverLimit(
                f"one of its layers ({type(module).__name__}) gives {numbers:,} numbers for a batch of 2 images, over"
                f" the limit of {MAX_ACTIVATION:,}"
            )

    hooks = [m.register_forward_hook(size) for m in probe.modules()]
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            probe.eval()(torch.zeros(2, 1, 28, 28, device="meta"))
    except _OverLimit as err:
        raise Untrusted(f"{kind.option} {cls.__name__}: {err}") from None
    except Exception:  # not runnable on the meta device: the contract check runs it for real
        return
    finally:
        for hook in hooks:
            hook.remove()
    if (flops := counter.get_total_flops()) > MAX_FLOPS:
        raise Untrusted(
            f"{kind.option} {cls.__name__}: takes {flops:,} operations for a batch of 2 images, over the limit of"
            f" {MAX_FLOPS:,}"
        )


def _numel(tensor: Any) -> int:
    """Numbers in a tensor; none yet in a lazy module's (refused once it is built)."""
    return tensor.numel() if isinstance(tensor, torch.Tensor) and not nn.parameter.is_lazy(tensor) else 0


def _annotation_text(annotation: Any) -> str | None:
    """The annotation as text, if it declares only plain values (else None: a callable, an object, or nothing)."""
    if annotation is inspect.Parameter.empty:
        return None
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", None) or str(annotation)
    if annotation in (float, int, bool, str):
        return text
    names = set(re.findall(r"[A-Za-z_]\w*", re.sub(r"'[^']*'|\"[^\"]*\"", "", text)))
    return text if names and names <= PLAIN_TYPE_NAMES else None


def _ranged_type(cls: type, annotation: Any) -> type | None:
    """The jsonargparse ranged number type an annotation names (PositiveInt, ClosedUnitInterval), if it
    is one: the class's module's name for it where annotations are text (`from __future__ import annotations`)."""
    if isinstance(annotation, str):
        annotation = getattr(inspect.getmodule(cls), annotation, None) or getattr(jsonargparse.typing, annotation, None)
    if isinstance(annotation, type) and issubclass(annotation, (int, float)) and annotation not in (int, float, bool):
        return annotation if annotation.__module__ == jsonargparse.typing.__name__ else None
    return None


def range_rule(restriction: str) -> str:
    """A jsonargparse restriction as words of a rule: "v>=0 and v<=1" as ">= 0 and <= 1"."""
    return re.sub(r"v\s*([<>=]+)\s*", r"\1 ", restriction)


def _check_range(option: str, ranged: type, value: Any) -> None:
    """A file's value for a ranged argument, checked by the type itself, as the command line checks it: before the
    class is built with it (a width of 0 or a dropout of nan would otherwise reach torch, or pass unseen)."""
    try:
        ranged(value)
    except OverflowError:  # an int past any float (10**400 where a float goes)
        raise Untrusted(f"{option}: {_short(value)} is out of range; it is too large for a float") from None
    except (TypeError, ValueError) as err:
        # their-words[jsonargparse.restriction]: the type's refusal, read for its bounds
        if bounds := re.search(r"does not conform to restriction (.+)", str(err)):
            raise Untrusted(f"{option}: {_short(value)} is out of range; it must be {range_rule(bounds[1])}") from None
        takes = "an int" if issubclass(ranged, int) else "a number"
        raise Untrusted(f"{option}: {_short(value)} is not valid; it takes {takes}") from None


def _plain(value: Any, depth: int = 0) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)) and depth < MAX_DEPTH:
        return all(_plain(item, depth + 1) for item in value)
    return False


def _has_str(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, (list, tuple)) and any(_has_str(v) for v in value))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


def check_model_hparams(hparams: Any) -> dict[str, Any]:
    """A checkpoint's LitMNIST hyperparameters, checked as data (the optimizer and the schedule by check_spec)."""
    if hparams is None:
        return {}
    if not isinstance(hparams, dict):
        raise Untrusted(f"its hyperparameters are a {type(hparams).__name__}, not a mapping")
    instantiator = hparams.get("_instantiator")
    if instantiator is not None and instantiator not in LIGHTNING_INSTANTIATORS:
        raise Untrusted(f"its hyperparameters name {_short(instantiator)} to build the model, not Lightning's own")
    class_path = hparams.get("_class_path")
    if class_path is not None and class_path != MODEL_CLASS_PATH:
        raise Untrusted(f"its hyperparameters name the model class {_short(class_path)}, not {MODEL_CLASS_PATH}")
    fields = {k: v for k, v in hparams.items() if k not in ("_instantiator", "_class_path")}
    if unknown := sorted(map(str, set(fields) - MODEL_FIELDS)):
        raise Untrusted(
            f"--model.{unknown[0]}: not an option a checkpoint may set (it may set {', '.join(sorted(MODEL_FIELDS))})"
        )
    for field in KINDS:
        if field in fields:
            check_spec(field, fields[field])
    if not isinstance(fields.get("channels_last", True), bool):
        raise Untrusted(f"--model.channels_last: {_short(fields['channels_last'])} is not true or false")
    freeze = fields.get("freeze", [])
    if not isinstance(freeze, (list, tuple)) or not all(isinstance(name, str) for name in freeze):
        raise Untrusted(f"--model.freeze: {_short(freeze)} is not a list of layer names")
    for old in ("lr", "momentum"):  # written before the optimizer became an option: the guide's SGD's numbers
        if old in fields and (isinstance(fields[old], bool) or not isinstance(fields[old], (int, float))):
            raise Untrusted(f"--model.{old}: {_short(fields[old])} is not a number")
    return fields
