"""Each door for outside input, fuzzed (Hypothesis): a checkpoint's bytes and its dictionary, export's .pth, an
image file, a request to serve, a config file, the study's record of a trial's folder. Whatever comes in, the door
gives a result or the project's own error (one line), never another exception, within a bounded time, and nothing
outside the run is touched or imported. Twenty examples each in the default suite, hundreds in the slow one;
derandomized, so a run is repeatable."""

from __future__ import annotations

import asyncio
import base64
import functools
import io
import json
import sys
import time
from collections import Counter
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mnist_lit import runs
from mnist_lit.checkpoints import DIGEST_KEY, load_checkpoint, load_weights
from mnist_lit.checkpoints.digest import digest
from mnist_lit.cli import read_yaml
from mnist_lit.errors import UserError
from mnist_lit.model import GUIDE_SGD, Net

BUDGETS = [pytest.param(20, id="quick"), pytest.param(400, id="thorough", marks=pytest.mark.slow)]
SECONDS = 10.0  # the most one example may take: a door that hangs or grinds fails here


def fuzz(examples: int, *strategies: st.SearchStrategy) -> Callable[[Callable[..., str]], Callable[[], None]]:
    """Run the decorated check on `examples` generated inputs, each timed; the check returns its outcome ('read',
    'refused'), counted and printed (pytest -s shows the counts)."""

    def wrap(check: Callable[..., str]) -> Callable[[], None]:
        outcomes: Counter[str] = Counter()

        @functools.wraps(check)  # its signature, which Hypothesis reads
        def timed(*args: Any, **kwargs: Any) -> None:
            start = time.monotonic()
            outcomes[check(*args, **kwargs)] += 1
            assert time.monotonic() - start < SECONDS, f"one example took {time.monotonic() - start:.1f} s"

        run = settings(
            max_examples=examples,
            deadline=None,  # timed above, with room for a busy machine
            derandomize=True,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        )(given(*strategies)(timed))

        def counted() -> None:
            run()
            print(f"{check.__qualname__.split('.')[0]}: {sum(outcomes.values())} examples, {dict(outcomes)}")

        return counted

    return wrap


def checkpoint(hparams: Any = None) -> dict[str, Any]:
    """A checkpoint as fit writes one, sealed: the guide's Net, a step, its dataset and hyperparameters."""
    contents = {
        "state_dict": {f"net.{k}": v for k, v in Net().state_dict().items()},
        "pytorch-lightning_version": "2.6.6",
        "epoch": 1,
        "global_step": 9,
        "hyper_parameters": {"optimizer": GUIDE_SGD} if hparams is None else hparams,
        "datamodule_hyper_parameters": {"dataset": "mnist"},
    }
    contents[DIGEST_KEY] = digest(contents)
    return contents


def saved(contents: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(contents, buffer)
    return buffer.getvalue()


def mutations(data: bytes) -> st.SearchStrategy[bytes]:
    """data with bytes overwritten, cut short or spliced in: what damage or an attacker's edits look like."""

    def mutate(draw: st.DrawFn) -> bytes:
        out = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            kind = draw(st.sampled_from(["flip", "cut", "insert", "zero"]))
            at = draw(st.integers(0, max(len(out) - 1, 0)))
            if kind == "flip" and out:
                out[at] ^= draw(st.integers(1, 255))
            elif kind == "cut":
                del out[at:]
            elif kind == "insert":
                out[at:at] = draw(st.binary(min_size=1, max_size=16))
            else:
                out[at : at + 8] = bytes(min(8, len(out) - at))
        return bytes(out)

    return st.composite(mutate)()


# Plain values of the kinds YAML and a checkpoint's hyperparameters hold, nested.
PLAIN = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=True) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
CLASS_PATHS = st.sampled_from([
    "torch.optim.SGD", "torch.optim.Adam", "torch.optim.LBFGS", "torch.optim.lr_scheduler.StepLR",
    "torch.optim.lr_scheduler.OneCycleLR", "torch.optim.lr_scheduler.LambdaLR", "mnist_lit.model.Net",
    "mnist_lit.model.ConvNet", "mnist_lit.model.LitMNIST", "torch.nn.Linear", "torch.nn.Upsample", "os.system",
    "this.s", "builtins.eval", "torchvision.models.resnet18", "SGD", "../x", "",
])  # fmt: skip
SPECS = st.fixed_dictionaries(
    {"class_path": CLASS_PATHS}, optional={"init_args": st.dictionaries(st.text(max_size=12), PLAIN, max_size=3)}
)
HPARAMS = st.dictionaries(
    st.sampled_from(
        [
            "net",
            "optimizer",
            "lr_scheduler",
            "channels_last",
            "freeze",
            "lr",
            "momentum",
            "init_from",
            "_instantiator",
            "_class_path",
            "other",
        ]
    ),
    SPECS | PLAIN,
    max_size=4,
)


def modules_before() -> set[str]:
    return set(sys.modules)


def assert_nothing_imported(before: set[str]) -> None:
    new = {m for m in set(sys.modules) - before if not m.startswith(("torch", "torchvision", "mnist_lit", "PIL"))}
    assert "this" not in new and not {m for m in new if m.split(".")[0] in ("os", "subprocess", "builtins")}, new


@pytest.mark.parametrize("examples", BUDGETS)
def test_the_checkpoint_reader_takes_any_bytes(examples, tmp_path):
    """Damaged or edited checkpoint bytes: the verified contents, or a CheckpointError; nothing else."""
    original = saved(checkpoint())

    @fuzz(examples, mutations(original) | st.binary(max_size=2048))
    def check(data: bytes) -> str:
        try:
            contents = load_checkpoint(tmp_path / "fuzzed.ckpt", data)
        except UserError as err:
            assert "\n" not in str(err)
            return "refused"
        assert contents[DIGEST_KEY] == digest(contents)  # a mutation that loads changed nothing sealed
        return "read"

    check()


@pytest.mark.parametrize("examples", BUDGETS)
def test_a_checkpoints_hyperparameters_are_data_whatever_they_hold(examples, tmp_path):
    """A sealed checkpoint whose hyperparameters are anything (class paths of every kind, plain values, keys a
    checkpoint may not set): runs.load gives a network or one line, and imports nothing a file names."""
    path = tmp_path / "checkpoints" / "fuzzed.ckpt"
    path.parent.mkdir()
    before = modules_before()

    @fuzz(examples, HPARAMS)
    def check(hparams: dict[str, Any]) -> str:
        path.write_bytes(saved(checkpoint(hparams)))
        try:
            trained = runs.load(path)
        except UserError as err:
            assert "\n" not in str(err)
            assert_nothing_imported(before)
            return "refused"
        assert trained.net(torch.zeros(1, 1, 28, 28)).shape == (1, 10)
        assert_nothing_imported(before)
        return "read"

    check()


@pytest.mark.parametrize("examples", BUDGETS)
def test_exports_pth_reader_takes_any_bytes(examples, tmp_path):
    original = saved({"net": {"class_path": "mnist_lit.model.Net", "init_args": {}}, "state_dict": Net().state_dict()})
    path = tmp_path / "fuzzed.pth"
    before = modules_before()

    @fuzz(examples, mutations(original) | st.binary(max_size=1024) | SPECS.map(lambda s: saved({"net": s})))
    def check(data: bytes) -> str:
        path.write_bytes(data)
        try:
            load_weights(path)
            net = runs.open_weights(str(path))
        except UserError as err:
            assert "\n" not in str(err)
            assert_nothing_imported(before)
            return "refused"
        assert net(torch.zeros(1, 1, 28, 28)).shape == (1, 10)
        assert_nothing_imported(before)
        return "read"

    check()


def image_files() -> dict[str, bytes]:
    """A small digit in each format Pillow is allowed to open here."""
    pixels = np.zeros((28, 28), dtype=np.uint8)
    pixels[6:22, 12:16] = 255
    files = {}
    for name in ("PNG", "JPEG", "BMP"):
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format=name)
        files[name] = buffer.getvalue()
    return files


def request(body: bytes) -> tuple[Any, Any]:
    """serve's whole decoding of a request body: the Gate, then read_image. A tensor, or the refusal's status."""
    from mnist_lit.serve import Gate, Refused, read_image

    scope = {"type": "http", "headers": [(b"content-type", b"application/json")]}
    messages = iter([{"type": "http.request", "body": body, "more_body": False}])

    async def receive() -> dict[str, Any]:
        return next(messages)

    read = asyncio.run(Gate(app=None, body_timeout=5).read(scope, receive))
    if not isinstance(read, bytes):
        return None, read.status_code
    try:
        return read_image(json.loads(read), "mnist"), None
    except Refused as refused:
        return None, refused.status


@pytest.mark.parametrize("examples", BUDGETS)
def test_a_request_to_serve_is_an_image_or_a_4xx(examples):
    """Any body, any image bytes inside it (each format's file damaged, or random bytes): a prepared image or a
    refusal with a 4xx status, never an exception that LitServe would answer 500."""
    pytest.importorskip("litserve")
    valid = image_files()
    images = st.sampled_from(list(valid.values())).flatmap(mutations) | st.binary(max_size=512)

    def body(image: bytes, prefix: str, wrap: str) -> bytes:
        text = prefix + base64.b64encode(image).decode()
        return {"json": json.dumps({"image": text}), "raw": text, "list": json.dumps([text])}[wrap].encode()

    prefixes = st.sampled_from(["", "data:image/png;base64,"])
    bodies = st.builds(body, images, prefixes, st.sampled_from(["json", "raw", "list"]))

    @fuzz(examples, bodies | st.binary(max_size=512))
    def check(data: bytes) -> str:
        image, status = request(data)
        assert (image is not None and image.shape == (1, 28, 28)) or 400 <= status < 500, status
        return "read" if image is not None else str(status)

    check()
    for name, data in valid.items():  # and the valid files themselves are read
        assert request(json.dumps({"image": base64.b64encode(data).decode()}).encode())[0] is not None, name


@pytest.mark.parametrize("examples", BUDGETS)
def test_the_config_reader_takes_any_file(examples, tmp_path):
    """Any bytes as a --config file: its values, or a ConfigError naming the file; bounded however it nests or
    aliases."""
    path = tmp_path / "fuzzed.yaml"
    bombs = st.integers(2, 40).map(
        lambda n: "\n".join(["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
                            + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, n)])
    )  # fmt: skip
    deep = st.integers(1, 3_000).map(lambda n: "[" * n + "]" * n)  # 20,000 deep: CONFIG_FILES in test_trust.py
    texts = st.text(max_size=200).map(str.encode) | st.binary(max_size=200) | bombs.map(str.encode)
    texts = texts | deep.map(str.encode) | PLAIN.map(lambda v: json.dumps(v).encode())

    @fuzz(examples, texts)
    def check(data: bytes) -> str:
        path.write_bytes(data)
        try:
            read_yaml(str(path))
        except UserError as err:
            assert str(path) in str(err) and "\n" not in str(err)
            return "refused"
        return "read"

    check()


@pytest.mark.parametrize("examples", BUDGETS)
def test_the_studys_record_of_a_trials_folder_stays_in_the_sweep(examples, tmp_path):
    """A study from elsewhere may record anything as a trial's folder: trials/<an earlier number>, or one line."""
    pytest.importorskip("optuna")
    from mnist_lit.sweep.study import trial_folder

    @fuzz(examples, st.integers(0, 1000), PLAIN | st.integers() | st.text().map(lambda t: "../" + t))
    def check(number: int, recorded: Any) -> str:
        trial = SimpleNamespace(number=number, user_attrs={"folder": recorded})
        try:
            folder = trial_folder(tmp_path, trial)
        except UserError as err:
            assert "\n" not in str(err)
            return "refused"
        assert folder.parent == tmp_path / "trials" and 0 <= int(folder.name) <= number
        return "read"

    check()
