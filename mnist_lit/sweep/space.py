"""A sweep's search space: fit options by their config keys, each a list of choices or a numeric range."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from mnist_lit.checkpoints import write_atomically
from mnist_lit.errors import ConfigError

# Set by the sweep for each trial: a space cannot choose them.
RESERVED = ("trainer.default_root_dir", "ckpt_path", "checkpoint.dirpath", "trainer.callbacks")
RANGE_KEYS = {"low", "high", "log", "step"}


class Space:
    """`space` checked against `base` (fit's complete config): every key an option there, every range non-empty."""

    def __init__(self, space: dict[str, Any], base: dict[str, Any]) -> None:
        import optuna

        if not space:
            raise ConfigError("--sweep.space is empty: name at least one fit option to search (see configs/sweep.yaml)")
        self.base = base
        self.distributions: dict[str, Any] = {}
        self.encoded: set[str] = set()  # choices Optuna cannot store as they are (a class and its arguments)
        for key, spec in space.items():
            where = f"--sweep.space {key}"
            if not isinstance(key, str) or key in RESERVED or key.startswith(RESERVED):
                raise ConfigError(f"{where}: the sweep sets this option itself; it cannot be searched")
            locate(base, key)
            if isinstance(spec, list):
                if not spec:
                    raise ConfigError(f"{where}: an empty list of choices")
                if any(isinstance(choice, dict | list) for choice in spec):
                    self.encoded.add(key)
                    spec = [json.dumps(choice, sort_keys=True) for choice in spec]
                self.distributions[key] = optuna.distributions.CategoricalDistribution(spec)
            elif isinstance(spec, dict) and {"low", "high"} <= set(spec) and set(spec) <= RANGE_KEYS:
                self.distributions[key] = _range(where, spec)
            else:
                raise ConfigError(
                    f"{where}: {spec!r} is neither a list of choices nor a range {{low: ..., high: ...}}"
                    " (log: true, step: ... optional)"
                )

    @classmethod
    def from_fingerprint(cls, root: Path) -> Space:
        recorded = json.loads((root / "sweep.json").read_text())
        return cls(recorded["space"], recorded["base"])

    def value(self, key: str, param: Any) -> Any:
        return json.loads(param) if key in self.encoded else param

    def apply(self, base: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
        """A complete fit config: base with the trial's parameters."""
        config = copy.deepcopy(base)
        for key, param in params.items():
            parent, leaf = locate(config, key)
            parent[leaf] = self.value(key, param)
        return config

    def describe(self, params: dict[str, Any]) -> str:
        return ", ".join(f"{short(key)} {show(self.value(key, params[key]))}" for key in self.distributions)

    def validate(self, parse_fit: Callable[[list[str]], Any], scratch: Path, metric: str) -> None:
        """Refuse, before any trial, a value fit would refuse: each choice and each end of each range is parsed by
        fit's own command line (and the optimizer and schedule checked as fit checks them)."""
        from mnist_lit.cli import check_optimizer, check_scheduler

        if not self.base["data"].get("val_size") or self.base["trainer"].get("limit_val_batches") == 0:
            raise ConfigError(
                f"--sweep.metric {metric} needs a validation set, and this recipe has none (--data.val_size)"
            )
        for key, distribution in self.distributions.items():
            if hasattr(distribution, "choices"):
                candidates = list(distribution.choices)
            else:
                candidates = [distribution.low, distribution.high]
            for candidate in candidates:
                config = self.apply(self.base, {key: candidate})
                path = scratch / "check.yaml"
                write_atomically(str(path), yaml.safe_dump(config).encode())
                problem = parse_fit(["--config", str(path)])
                if not isinstance(problem, str):
                    try:
                        check_optimizer(problem["model"]["optimizer"])
                        check_scheduler(problem["model"]["optimizer"], problem["model"].get("lr_scheduler"))
                    except ValueError as err:
                        problem = str(err)
                if isinstance(problem, str):
                    raise ConfigError(
                        f"--sweep.space {key}: {show(self.value(key, candidate))} is refused by fit: {problem}"
                    )


def locate(config: dict[str, Any], key: str) -> tuple[dict[str, Any], str]:
    """The dict that holds key's option, and its name there; `model.optimizer.lr` means its init_args.lr too."""
    *parents, leaf = key.split(".")
    node: Any = config
    for depth, part in enumerate(parents):
        if isinstance(node, dict) and part not in node and isinstance(node.get("init_args"), dict):
            node = node["init_args"]
        if not isinstance(node, dict) or not isinstance(node.get(part), dict):
            where = ".".join(parents[: depth + 1])
            why = "is not set in the base config (give it a class there)" if isinstance(node, dict) and (
                part in node) else "is not an option group of fit"  # fmt: skip
            raise ConfigError(f"--sweep.space {key}: {where} {why}")
        node = node[part]
    if leaf not in node and isinstance(node.get("init_args"), dict):
        node = node["init_args"]
    if leaf not in node:
        raise ConfigError(f"--sweep.space {key}: not an option of fit (fit --print_config lists them)")
    return node, leaf


def _range(where: str, spec: dict[str, Any]) -> Any:
    import optuna

    low, high, log, step = spec["low"], spec["high"], bool(spec.get("log", False)), spec.get("step")
    for name, number in (("low", low), ("high", high), ("step", step)):
        if number is not None and (isinstance(number, bool) or not isinstance(number, int | float)):
            raise ConfigError(f"{where}: {name} {number!r} is not a number")
    if not low < high:
        raise ConfigError(f"{where}: the range {low} to {high} is empty; low must be < high")
    if log and low <= 0:
        raise ConfigError(f"{where}: a log range must start above 0 (low is {low})")
    if log and step is not None:
        raise ConfigError(f"{where}: a range is either log or stepped, not both")
    if step is not None and step <= 0:
        raise ConfigError(f"{where}: step {step} must be > 0")
    if all(isinstance(n, int) for n in (low, high, step or 1)):
        return optuna.distributions.IntDistribution(low, high, log=log, step=step or 1)
    return optuna.distributions.FloatDistribution(float(low), float(high), log=log, step=step)


def short(key: str) -> str:
    """model.optimizer.init_args.lr -> optimizer.lr, data.batch_size -> batch_size."""
    parts = [p for p in key.split(".") if p != "init_args"]
    return ".".join(parts[1:] if len(parts) > 1 else parts)


def show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return str(value.get("class_path", json.dumps(value))).rpartition(".")[2]
    return "null" if value is None else str(value)
