"""The trust boundary: a checkpoint, a config file, a folder or an image from elsewhere is data, never code to run or
a path to follow. Every hostile file is refused (or skipped) in one line, and what it asked for never happens."""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import signal
import struct
import sys
import time
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.checkpoints import reseal, spec
from helpers.cli import KILLPOINTS, QUIET, SYNTHETIC, run_cli
from PIL import Image

from mnist_lit import runs
from mnist_lit.checkpoints.files import DIGEST_KEY, load_checkpoint, load_ckpt_path
from mnist_lit.cli.logfolder import claim_version
from mnist_lit.errors import CheckpointError


def hparam(field: str, value: object) -> Callable[[dict], None]:
    return lambda checkpoint: checkpoint["hyper_parameters"].__setitem__(field, value)


# name: (the change, words the one-line refusal must contain). MARKER in a value is replaced by the marker's path:
# the file a hostile spec would create if anything it names ran.
HOSTILE: dict[str, tuple[Callable[[str], Callable[[dict], None]], str]] = {
    "optimizer os.system": (lambda m: hparam("optimizer", spec("os.system", command=f"touch {m}")), "os.system"),
    "scheduler os.system": (lambda m: hparam("lr_scheduler", spec("os.system", command=f"touch {m}")), "os.system"),
    "optimizer subprocess.Popen": (lambda m: hparam("optimizer", spec("subprocess.Popen", args=["touch", m])), "Popen"),
    "scheduler builtins.exec": (
        lambda m: hparam("lr_scheduler", spec("builtins.exec", source=f"open({m!r}, 'w')")),
        "builtins.exec",
    ),
    "a module that is not allowed": (lambda m: hparam("optimizer", spec("this.Zen")), "this.Zen"),
    "a torch class of another kind": (
        lambda m: hparam("optimizer", spec("torch.nn.Linear")),
        "torch.nn.Linear was not imported: a file may name classes of torch.optim only",
    ),
    "a function by name where a number goes": (
        lambda m: hparam("optimizer", spec("torch.optim.SGD", lr="os.system")),
        "--model.optimizer.lr",
    ),
    "LambdaLR given a function by name": (
        lambda m: hparam("lr_scheduler", spec("torch.optim.lr_scheduler.LambdaLR", lr_lambda="os.system")),
        "lr_lambda",
    ),
    "an argument the class does not take": (
        lambda m: hparam("optimizer", spec("torch.optim.SGD", lr=0.1, command=f"touch {m}")),
        "takes no argument 'command'",
    ),
    "a nested object as an argument": (
        lambda m: hparam("optimizer", spec("torch.optim.SGD", lr={"class_path": "os.system"})),
        "not a plain value",
    ),
    "init_from naming a file to read": (lambda m: hparam("init_from", m), "--model.init_from"),
    "a lazy network, whose size cannot be counted": (
        lambda m: hparam("net", spec("torch.nn.LazyLinear", out_features=10)),
        "a lazy module",
    ),
    "a LightningModule as the network, naming a file to read": (
        lambda m: hparam("net", spec("mnist_lit.model.LitMNIST", init_from=m)),
        "is a LightningModule, not a network",
    ),
    "another instantiator": (lambda m: hparam("_instantiator", "os.system"), "os.system"),
    "hyperparameters that are a list": (
        lambda m: lambda checkpoint: checkpoint.__setitem__("hyper_parameters", ["os.system"]),
        "not a mapping",
    ),
    "freeze that is not a list of names": (lambda m: hparam("freeze", {"class_path": "os.system"}), "--model.freeze"),
}


@pytest.fixture
def root(tmp_path, trained_run):
    shutil.copytree(trained_run, tmp_path / "run")
    return tmp_path / "run"


def data_args(mnist_dir: Path) -> list[str]:
    return ["--data.data_dir", str(mnist_dir), *SYNTHETIC, *QUIET]


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_checkpoint_is_refused_in_one_line_and_nothing_it_names_runs(case, root, mnist_dir, run_main):
    marker = root / "PWNED"
    change, words = HOSTILE[case]
    reseal(root / "checkpoints" / "last.ckpt", root / "hostile.ckpt", change(str(marker)))
    commands = [
        ["test", "--ckpt_path", "hostile.ckpt", *data_args(mnist_dir)],
        ["predict", "--ckpt_path", "hostile.ckpt", "--data.predict_path", str(root), *data_args(mnist_dir)],
        ["export", "--ckpt_path", "hostile.ckpt", "--output", "out.pth"],
        ["serve", "--ckpt_path", "hostile.ckpt"],
    ]
    for command in commands:
        status, _out, err = run_main(*command, cwd=root)
        assert status != 0, (command, err[-2000:])
        last_line = err.strip().splitlines()[-1]
        assert last_line.startswith("error: refusing to load") and words in last_line, (command, err[-2000:])
        assert "Traceback" not in err
    with pytest.raises(CheckpointError, match="refusing to load"):
        runs.load(root / "hostile.ckpt").model()  # a user's own code
    assert not marker.exists()
    assert "this" not in sys.modules  # importing it would print the Zen of Python: nothing was imported
    assert not (root / "out.pth").exists()


@pytest.mark.slow  # in the slow suite, so the default one stays under 4 minutes
def test_a_network_that_breaks_the_contract_is_refused_by_export_and_serve(root, run_main):
    """One output per class for a batch of images: checked when a checkpoint's network is built, not left for a
    request to find (serve would answer 500)."""

    def identity(checkpoint: dict) -> None:
        checkpoint["hyper_parameters"]["net"] = spec("torch.nn.Identity")
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("net.")}

    reseal(root / "checkpoints" / "last.ckpt", root / "identity.ckpt", identity)
    for command in (["export", "--ckpt_path", "identity.ckpt", "--output", "out.pth"],
                    ["serve", "--ckpt_path", "identity.ckpt"]):  # fmt: skip
        status, _, err = run_main(*command, cwd=root)
        assert status != 0 and "a network that is of no use here" in err and "it must give (2, 10)" in err, err
    assert not (root / "out.pth").exists()


def test_a_hostile_checkpoint_as_last_is_refused_on_resume_validate_and_fine_tuning(root, mnist_dir, run_main):
    marker = root / "PWNED"
    last = root / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    reseal(last, last, hparam("lr_scheduler", spec("os.system", command=f"touch {marker}")))
    tune = ["fit", "--model.init_from", str(last), "--trainer.default_root_dir", "tuned"]
    for command in (
        ["fit", "--ckpt_path", "last", "--trainer.max_epochs", "3"],
        ["validate", "--ckpt_path", "last"],
        tune,
    ):
        status, _, err = run_main(*command, *data_args(mnist_dir), cwd=root)
        assert status != 0 and "error: refusing to load" in err and "os.system" in err, (command, err[-2000:])
    assert not marker.exists() and last.read_bytes() != before and not (root / "tuned").exists()


def test_a_class_the_user_names_on_the_command_line_is_trusted(root, mnist_dir, run_main, monkeypatch):
    # Outside torch.optim, a checkpoint's class is refused ... unless the user's own command line names its module.
    reseal(root / "checkpoints" / "last.ckpt", root / "asgd.ckpt", hparam("optimizer", spec("torch.optim.ASGD")))
    status, _out, err = run_main("test", "--ckpt_path", "asgd.ckpt", *data_args(mnist_dir), cwd=root)
    assert status == 0, err[-2000:]  # torch.optim's own: allowed
    monkeypatch.setenv("MNIST_LIT_TRUST", "")
    from mnist_lit.errors import Untrusted
    from mnist_lit.trust import KINDS, check_spec, trust_command_line

    with pytest.raises(Untrusted, match=r"a file may name classes of torch\.optim only"):
        check_spec("optimizer", spec("json.JSONDecoder"), trusted=())
    trust_command_line(["--model.optimizer", "json.JSONDecoder"])
    with pytest.raises(Untrusted, match=r"is not a torch\.optim optimizer"):  # trusted module, still the wrong kind
        check_spec("optimizer", spec("json.JSONDecoder"))
    trust_command_line([])
    assert KINDS["optimizer"].option == "--model.optimizer"


def test_a_config_file_naming_a_function_is_refused_before_it_is_called(tmp_path, mnist_dir, run_main):
    marker = tmp_path / "PWNED"
    (tmp_path / "evil.yaml").write_text(
        f"model:\n  optimizer:\n    class_path: os.system\n    init_args:\n      command: touch {marker}\n"
    )
    status, _, err = run_main("fit", "--config", "evil.yaml", *data_args(mnist_dir), "--print_config", cwd=tmp_path)
    assert status != 0 and "--config evil.yaml: --model.optimizer: os.system was not imported" in err, err[-2000:]
    assert not marker.exists()
    (tmp_path / "broken.yaml").write_text("model:\n  optimizer: [SGD\n")
    status, _out, err = run_main("fit", "--config", "broken.yaml", *data_args(mnist_dir), cwd=tmp_path)
    assert status != 0 and "--config broken.yaml: line 3, column 1: not valid YAML" in err, err[-2000:]


# --- the digest cannot be stripped by the damage it should catch ------------------------------------------------


def test_damage_to_the_digests_own_key_is_caught_and_the_intact_copy_named(root):
    last = root / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    checkpoint["mnist_lit_sha25X"] = checkpoint.pop(DIGEST_KEY)  # a flipped byte in the key's name
    checkpoint["state_dict"]["net.fc2.bias"][0] += 1  # and damage elsewhere that the digest would have caught
    torch.save(checkpoint, last)
    with pytest.raises(CheckpointError, match=r"is damaged: .*no checksum.*newest intact checkpoint beside it is .*18"):
        load_checkpoint(last)


def test_a_checkpoint_whose_pickle_is_damaged_into_code_names_the_intact_copy(root):
    last = root / "checkpoints" / "last.ckpt"

    class Code:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"state_dict": {}, "payload": Code()}, last)
    with pytest.raises(CheckpointError, match=r"pickled Python objects.*or it is damaged.*beside it is .*step=18"):
        load_checkpoint(last)


def test_test_last_beside_a_fit_that_removes_the_file_it_found_takes_the_newer_one(root, monkeypatch):
    # A fit saving every step removes the older periodic file right after writing the next: read the newest again.
    directory = root / "checkpoints"
    (directory / "last.ckpt").unlink()
    old = directory / "epoch=2-step=18.ckpt"
    newer = directory / "epoch=2-step=19.ckpt"
    from mnist_lit.checkpoints import files as storage

    load = storage.load_checkpoint

    def racing(path, data=None):
        if Path(path) == old and not newer.exists():
            shutil.copy(old, newer)  # the fit's next save ...
            os.utime(newer, ns=(old.stat().st_mtime_ns + 10**9,) * 2)
            old.unlink()  # ... and its removal of the older file, between our look and our read
        return load(path, data)

    monkeypatch.setattr(storage, "load_checkpoint", racing)
    path, checkpoint = load_ckpt_path("last", directory, fitting=False)
    assert path == str(newer) and checkpoint["global_step"] == 18


# --- links planted where a run writes are never followed --------------------------------------------------------


def test_a_link_planted_as_the_lock_or_a_checkpoint_is_refused_and_its_target_untouched(tmp_path, mnist_dir, run_main):
    target = tmp_path / "precious.txt"
    target.write_text("precious")
    (tmp_path / "a" / "checkpoints").mkdir(parents=True)
    (tmp_path / "a" / "checkpoints" / ".lock").symlink_to(target)
    status, _, err = run_main("fit", *data_args(mnist_dir), "--trainer.max_steps", "2", cwd=tmp_path / "a")
    assert status != 0 and "error: refusing to lock" in err and "symbolic link" in err, err[-2000:]
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    (tmp_path / "b" / "checkpoints" / "last.ckpt").symlink_to(target)
    (tmp_path / "b" / "checkpoints" / "last.ckpt.part").symlink_to(target)  # where older versions wrote first
    status, _, err = run_main("fit", *data_args(mnist_dir), "--trainer.max_steps", "2", cwd=tmp_path / "b")
    # refused before training
    assert status != 0 and "refusing to write" in err and "last.ckpt: it is a symbolic link" in err, err
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["last.ckpt", "last.ckpt.part"]
    assert target.read_text() == "precious"


@pytest.mark.slow  # whole runs: in the slow suite, so the default one stays under 4 minutes
def test_a_linked_checkpoint_or_log_folder_is_never_followed(tmp_path, mnist_dir, run_main, trained_run):
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(trained_run / "checkpoints", elsewhere)
    before = {p.name: p.read_bytes() for p in elsewhere.iterdir()}
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "checkpoints").symlink_to(elsewhere)
    for command in (
        ["fit", *data_args(mnist_dir), "--trainer.max_steps", "2"],
        ["fit", *data_args(mnist_dir), "--ckpt_path", "last", "--trainer.max_epochs", "3"],
        ["test", *data_args(mnist_dir), "--ckpt_path", "last"],
        ["export", "--ckpt_path", "last", "--output", "out.pth"],
    ):
        status, _, err = run_main(*command, cwd=tmp_path / "a")
        assert status != 0 and "checkpoints is a symbolic link" in err.strip().splitlines()[-1], (command, err[-2000:])
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "lightning_logs").symlink_to(elsewhere)
    status, _, err = run_main("fit", *data_args(mnist_dir), "--trainer.max_steps", "2", cwd=tmp_path / "b")
    assert status != 0 and "lightning_logs: a symbolic link" in err, err[-2000:]
    assert {p.name: p.read_bytes() for p in elsewhere.iterdir()} == before
    assert not (tmp_path / "a" / "out.pth").exists()


def test_a_link_planted_where_a_figure_goes_is_passed_over(tmp_path, mnist_dir, run_main):
    # Without a logger the figures go to the root, beside the user's own files: a link there is not written through
    target = tmp_path / "elsewhere.png"
    (tmp_path / "curves.png").symlink_to(target)  # dangling: os.path.exists says no file is there
    status, _out, err = run_main("fit", *data_args(mnist_dir), "--trainer.max_steps", "2", "--trainer.logger", "false",
                                cwd=tmp_path)  # fmt: skip
    assert status == 0, err[-2000:]
    assert not target.exists() and (tmp_path / "curves-1.png").is_file()


def test_two_fits_in_one_root_get_their_own_log_folders(tmp_path):
    folder = tmp_path / "lightning_logs"
    assert [claim_version(folder) for _ in range(2)] == [0, 1]
    (folder / "version_7").mkdir()
    assert claim_version(folder) == 8 and (folder / "version_8").is_dir()


# --- images from elsewhere: one bad file costs itself only ------------------------------------------------------


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def digit_image() -> Image.Image:
    image = Image.new("L", (28, 28), 0)
    image.paste(255, (12, 4, 16, 24))
    return image


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 28 28\n0 0 moveto 28 28 lineto stroke\nshowpage\n"


def hostile_images(folder: Path, outside: Path) -> None:
    """Beside good.png: non-finite pixels, a broken chunk after the image data, a header declaring 20000x20000
    pixels over a few bytes, an EPS file (Pillow would run Ghostscript on it), and a link to an image outside the
    folder."""
    folder.mkdir(parents=True, exist_ok=True)
    digit_image().save(folder / "good.png")
    pixels = np.zeros((28, 28), dtype=np.float32)
    pixels[4:24, 12:16] = np.nan
    Image.fromarray(pixels, mode="F").save(folder / "nan.tiff")
    good = png(digit_image())
    end = good.index(b"IEND") - 4
    (folder / "broken-chunk.png").write_bytes(good[:end] + chunk(b"zTXt", b"key\x00\x01data") + good[end:])
    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
    (folder / "huge.png").write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b""))
    )
    (folder / "page.eps").write_bytes(EPS)
    digit_image().save(outside)
    (folder / "link.png").symlink_to(outside)


def test_predict_skips_hostile_images_in_one_line_and_predicts_the_good_one(root, tmp_path, mnist_dir):
    hostile_images(tmp_path / "photos", tmp_path / "secret.png")
    result = run_cli("predict", "--ckpt_path", "last", "--data.predict_path", str(tmp_path / "photos"),
                     *data_args(mnist_dir), cwd=root)  # fmt: skip
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert [line.split("\t")[0] for line in result.stdout.splitlines()] == [str(tmp_path / "photos" / "good.png")]
    skipped = [line for line in result.stderr.splitlines() if line.startswith("skipped")]
    assert len(skipped) == 1 and skipped[0].startswith("skipped 4 of 5 files"), result.stderr  # the link: not listed
    assert "broken-chunk.png" in skipped[0] and "huge.png: its header declares more pixels than the limit" in skipped[0]
    assert "Ghostscript" not in result.stderr  # page.eps: not opened as EPS, so no program was looked for


def scan_bomb(scans: int, side: int = 2000) -> bytes:
    """A progressive JPEG whose last scan is repeated: libjpeg decodes every scan over every pixel, so a file of a
    thousand scans over 50 megapixels decoded for minutes."""
    pixels = np.zeros((side, side), np.uint8)
    pixels[side // 4 : 3 * side // 4, side // 2 - side // 20 : side // 2 + side // 20] = 255
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", progressive=True, quality=90)
    data = buffer.getvalue()
    end = data.rindex(b"\xff\xd9")
    last = data[data.rindex(b"\xff\xda") : end]
    return data[:end] + last * (scans - data.count(b"\xff\xda")) + data[end:]


def test_a_progressive_jpeg_of_many_scans_is_refused_before_it_is_decoded(tmp_path):
    """Decoding costs scans x pixels: bounded from the file's structure, for predict's files and serve's requests."""
    from mnist_lit.datasets.images import read
    from mnist_lit.serve import Refused, read_image

    for scans, words in ((500, "a progressive JPEG of over 100 scans over 2000x2000 pixels"),
                         (60, "a progressive JPEG of 60 scans over 5000x5000 pixels")):  # fmt: skip
        side = 2000 if scans == 500 else 5000
        (tmp_path / "scans.jpg").write_bytes(data := scan_bomb(scans, side))
        start = time.monotonic()
        with pytest.raises(ValueError, match=re.escape(words)):
            read(tmp_path / "scans.jpg", 0.1307, 0.3081)
        with pytest.raises(Refused, match=re.escape(words) if side <= 4096 else "this server decodes at most"):
            read_image({"image": base64.b64encode(data).decode()}, "mnist")
        assert time.monotonic() - start < 2  # refused from the header: nothing decoded
    (tmp_path / "ok.jpg").write_bytes(scan_bomb(10))  # an encoder's usual progression is read
    assert read(tmp_path / "ok.jpg", 0.1307, 0.3081).shape == (1, 28, 28)


def test_a_file_name_from_elsewhere_is_printed_escaped(root, tmp_path, mnist_dir, run_main):
    """A name may hold a terminal's escape sequences, or a newline that would forge a line of our own."""
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "evil\x1b[2J\x1b[31mFAKE\nerror: x.png").write_text("not an image")
    status, _, err = run_main("predict", "--ckpt_path", "last", "--data.predict_path", str(photos),
                              *data_args(mnist_dir), cwd=root)  # fmt: skip
    assert status != 0 and "\x1b" not in err and "evil\\x1b[2J\\x1b[31mFAKE\\x0aerror: x.png" in err, err
    assert [line for line in err.splitlines() if line.startswith("error: ")] == [
        "error: no readable images among the files --data.predict_path names"
    ]
    status, _, err = run_main("predict", "--ckpt_path", "last", "--data.predict_path", str(photos / "a\x1b[31m"),
                              *data_args(mnist_dir), cwd=root)  # fmt: skip
    assert status != 0 and "\x1b" not in err and "a\\x1b[31m" in err, err


def test_a_glob_walks_into_no_linked_folder_and_a_pipe_is_named_as_one(tmp_path):
    from mnist_lit.datasets.images import expand
    from mnist_lit.errors import DataError

    (tmp_path / "photos" / "day").mkdir(parents=True)
    digit_image().save(tmp_path / "photos" / "day" / "a.png")
    (tmp_path / "secret").mkdir()
    digit_image().save(tmp_path / "secret" / "s.png")
    (tmp_path / "photos" / "link").symlink_to(tmp_path / "secret")
    for pattern in ("photos/**/*.png", "photos/*/*.png", "*/*/*.png"):
        found = [p.relative_to(tmp_path) for p in expand(str(tmp_path / pattern))]
        assert found == [Path("photos/day/a.png")], (pattern, found)
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(DataError, match="pipe: not a regular file or a folder"):
        expand(str(tmp_path / "pipe"))


def test_image_dir_skips_hostile_images_and_refuses_a_linked_class_folder(tmp_path, capsys):
    from mnist_lit.data import MNISTDataModule

    hostile_images(tmp_path / "digits" / "1", tmp_path / "secret.png")
    for label in range(10):
        if label != 1:
            (tmp_path / "digits" / str(label)).mkdir()
            digit_image().save(tmp_path / "digits" / str(label) / "a.png")
    module = MNISTDataModule(image_dir=str(tmp_path / "digits"), image_val_fraction=0, image_test_fraction=0)
    module.setup("fit")
    assert len(module.splits["train"][1]) == 10
    err = capsys.readouterr().err
    assert err.startswith("skipped 5 of 15 files under") and "link.png: a symbolic link, not followed" in err, err
    shutil.rmtree(tmp_path / "digits" / "9")
    (tmp_path / "digits" / "9").symlink_to(tmp_path / "digits" / "8")
    with pytest.raises(RuntimeError, match="class folder 9 is a symbolic link"):
        MNISTDataModule(image_dir=str(tmp_path / "digits")).setup("fit")


# --- the rest: a resume's seed, a signal after the final save ---------------------------------------------------


def test_seed_everything_on_a_resume_is_refused_if_changed_and_recorded_as_the_runs(root, mnist_dir, run_main):
    fit = ["fit", "--ckpt_path", "last", "--trainer.max_epochs", "3", *data_args(mnist_dir)]
    status, _, err = run_main(*fit, "--seed_everything", "7", cwd=root)
    assert status != 0 and "--seed_everything cannot change when resuming" in err and "seed is 1" in err, err[-2000:]
    status, _, err = run_main(*fit, cwd=root)
    assert status == 0, err[-2000:]
    newest = max((root / "lightning_logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    assert "seed_everything: 1\n" in (newest / "config.yaml").read_text()


@pytest.mark.slow  # whole runs: in the slow suite, so the default one stays under 4 minutes
def test_a_signal_while_the_figures_are_drawn_names_the_final_checkpoint(tmp_path, mnist_dir):
    result = run_cli("curves-term", "0", "fit", *data_args(mnist_dir), "--trainer.max_steps", "3", cwd=tmp_path,
                     script=KILLPOINTS)  # fmt: skip
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-2000:]
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("SIGTERM: stopped at once; the newest checkpoint is") and "last.ckpt" in last_line


def deflated(source: Path, target: Path) -> None:
    """The same records, compressed: a file that expands as it loads."""
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as packed:
        for info in original.infolist():
            packed.writestr(info.filename, original.read(info.filename))


@pytest.mark.slow  # in the slow suite, so the default one stays under 4 minutes
@pytest.mark.parametrize(
    "kind, words",
    [
        ("meta", "not a plain one"),
        ("sparse", "not a plain one"),
        ("sparse weights, no digest", "not a plain one"),
        ("expanded", "a view that repeats its data"),
        ("deflated", "its records are compressed"),
    ],
)
def test_tensors_a_checkpoint_holds_are_plain_and_no_larger_than_its_bytes(kind, words, root, run_main):
    last, hostile = root / "checkpoints" / "last.ckpt", root / "hostile.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    checkpoint.pop(DIGEST_KEY)  # the digest itself could not be computed over such tensors
    if kind == "meta":
        checkpoint["extra"] = torch.empty(3, device="meta")
    elif kind == "sparse":
        checkpoint["extra"] = torch.zeros(3).to_sparse()
    elif kind == "sparse weights, no digest":
        checkpoint["state_dict"]["net.fc2.bias"] = checkpoint["state_dict"]["net.fc2.bias"].to_sparse()
        checkpoint.pop("rng_state")  # and no other mark of mnist_lit: a Lightning checkpoint from elsewhere
    elif kind == "expanded":
        checkpoint["extra"] = torch.zeros(1).expand(2**21, 2**21)  # 16 TB of float32 over 4 bytes
    if kind == "deflated":
        deflated(last, hostile)
    else:
        torch.save(checkpoint, hostile)
    for command in (["export", "--ckpt_path", "hostile.ckpt", "--output", "out.pth"], ["serve", "--ckpt_path",
                                                                                          "hostile.ckpt"]):  # fmt: skip
        status, _, err = run_main(*command, cwd=root)
        assert status != 0 and words in err.strip().splitlines()[-1] and "Traceback" not in err, err[-2000:]
    assert not (root / "out.pth").exists()


@pytest.mark.slow  # whole runs: in the slow suite, so the default one stays under 4 minutes
def test_paths_in_a_checkpoint_are_never_followed_to_remove_a_file(root, mnist_dir, run_main):
    """ModelCheckpoint removes the files it restores as its earlier saves: a checkpoint naming "<folder>/../x" (or
    any file elsewhere) must not get a resume to delete it."""
    victim = root.parent / "victim.txt"
    victim.write_text("precious")
    folder = root / "checkpoints"

    def aim(checkpoint: dict) -> None:
        for key, state in checkpoint["callbacks"].items():
            if key.startswith("Checkpoint"):
                state["dirpath"] = str(folder.resolve())  # as if written here: ModelCheckpoint restores it all
                state["best_model_path"] = state["last_model_path"] = f"{folder.resolve()}/../../{victim.name}"
                state["kth_best_model_path"] = str(victim)
                state["best_k_models"] = {str(victim): torch.tensor(1.0)}

    reseal(folder / "last.ckpt", folder / "last.ckpt", aim)
    # the run's own checkpoint settings (ModelCheckpoint's state is keyed by them): its state is restored
    status, _, err = run_main(
        "fit", "--ckpt_path", "last", "--trainer.max_epochs", "3", "--checkpoint.every_n_train_steps", "3",
        *data_args(mnist_dir), cwd=root,
    )  # fmt: skip
    assert status == 0, err[-2000:]
    assert victim.read_text() == "precious"


@pytest.mark.parametrize(
    "change",
    [
        lambda c: c.__setitem__("rng_state", {"cpu": torch.zeros(7, dtype=torch.uint8)}),
        lambda c: c.__setitem__("optimizer_states", [{"state": [], "param_groups": "os.system"}]),
        lambda c: c.__setitem__("global_step", "18"),
        lambda c: c.__setitem__("lr_schedulers", "x"),
        lambda c: c["optimizer_states"][0]["state"][0].__setitem__("momentum_buffer", torch.zeros(3, 3)),
        lambda c: (
            c.pop("callbacks"),
            c["optimizer_states"][0]["state"][0].__setitem__("momentum_buffer", torch.ones(3)),
        ),
        lambda c: c["optimizer_states"][0]["state"][1].__setitem__("momentum_buffer", "x"),
        lambda c: c["optimizer_states"][0]["param_groups"][0].__setitem__("params", [0]),
        lambda c: c["optimizer_states"][0]["param_groups"][0].__setitem__("lr", "fast"),
        lambda c: c["optimizer_states"][0]["param_groups"][0].pop("momentum"),
        lambda c: c["loops"].__setitem__("fit_loop", 5),
        lambda c: c["loops"]["fit_loop"]["epoch_progress"]["total"].__setitem__("ready", "x"),
        lambda c: c["loops"]["fit_loop"]["epoch_progress"]["current"].__setitem__("completed", -4),
        lambda c: c["loops"]["fit_loop"]["epoch_progress"].__setitem__("total", {"ready": 1}),
        lambda c: c.__setitem__("lr_schedulers", [{"step": 1}]),
    ],
    ids=[
        "a random state of the wrong size",
        "optimizer state of the wrong shape",
        "a step count that is text",
        "schedulers that are not a list",
        "a momentum buffer of another shape (a fused step would write past it)",
        "the same in a file without callbacks' state (Lightning then calls no callback's on_load_checkpoint)",
        "a momentum buffer that is text",
        "parameter groups naming one parameter",
        "a learning rate that is text",
        "settings without the momentum",
        "a loop state that is a number",
        "a progress count that is text",
        "a negative progress count",
        "a progress count missing",
        "a scheduler's state for a run without one",
    ],
)
def test_state_a_resume_restores_is_checked_as_data_before_lightning_sees_it(change, root, mnist_dir, run_main):
    reseal(root / "checkpoints" / "last.ckpt", root / "checkpoints" / "last.ckpt", change)
    status, _, err = run_main(
        "fit", "--ckpt_path", "last", "--trainer.max_epochs", "3", *data_args(mnist_dir), cwd=root
    )
    assert status != 0 and re.search(r"cannot be resumed: (its|it holds)|place in the data order", err), err[-2000:]
    assert "Traceback" not in err


def test_a_data_position_that_would_ask_for_an_endless_order_is_refused():
    from mnist_lit.datasets.batches import EpochBatches
    from mnist_lit.errors import DataError

    sampler = EpochBatches(100, 10, shuffle=True)
    sampler.load_state_dict({"seed": 1, "epoch": 2, "seen": 30, "position": 30})
    for bad in ({"seed": 1, "epoch": 2, "seen": -(10**12), "position": 0}, {"seed": "x"}, ["seen"]):
        with pytest.raises(DataError, match="place in the data order"):
            sampler.load_state_dict(bad)
    assert sampler.state_dict() == {"seed": 1, "epoch": 2, "seen": 30, "position": 30}


@pytest.mark.slow  # a fit: about 10 s
@pytest.mark.parametrize("name", ["config.yaml", "hparams.yaml"])
def test_a_link_planted_in_the_runs_log_folder_is_refused_and_what_it_points_to_is_untouched(name, tmp_path, mnist_dir):
    """A log version folder that is already there (a logger given its version) may hold a planted link as one of
    the files the run writes there: config.yaml goes through the one writer, and Lightning's own hparams.yaml (which
    it writes through a link that points to no file yet) is refused before the run starts."""
    target = tmp_path / "victim.txt"
    if name == "config.yaml":
        target.write_text("keep me")
    version = tmp_path / "lightning_logs" / "version_0"
    version.mkdir(parents=True)
    (version / name).symlink_to(target)
    logger = [
        "--trainer.logger",
        "TensorBoardLogger",
        "--trainer.logger.save_dir",
        ".",
        "--trainer.logger.version",
        "0",
    ]
    fit = run_cli("fit", "--data.data_dir", str(mnist_dir), *SYNTHETIC, *QUIET, *logger, "--trainer.max_steps", "2",
                  cwd=tmp_path)  # fmt: skip
    assert fit.returncode != 0 and "is a symbolic link" in fit.stderr and name in fit.stderr, fit.stderr
    assert [line for line in fit.stderr.splitlines() if line.startswith("error")] == [
        fit.stderr.strip().splitlines()[-1]
    ]
    assert "Traceback" not in fit.stderr
    assert (target.read_text() == "keep me") if name == "config.yaml" else not target.exists()


def test_the_default_loggers_hparams_yaml_goes_through_the_one_writer(tmp_path):
    from mnist_lit.cli.logfolder import RunLogger

    logger = RunLogger(save_dir=tmp_path, version=0)
    logger.log_hyperparams({"lr": 0.01})
    logger.save()
    written = tmp_path / "lightning_logs" / "version_0" / "hparams.yaml"
    assert written.is_file() and not written.is_symlink() and "lr: 0.01" in written.read_text()
    logger = RunLogger(save_dir=tmp_path, version=1)
    (tmp_path / "lightning_logs" / "version_1").mkdir()
    (tmp_path / "lightning_logs" / "version_1" / "hparams.yaml").symlink_to(tmp_path / "victim")
    logger.log_hyperparams({"lr": 0.01})
    with pytest.raises(CheckpointError, match="is a symbolic link"):
        logger.save()
    assert not (tmp_path / "victim").exists()


def test_a_trials_log_opens_only_as_a_regular_file_of_its_own(tmp_path):
    from mnist_lit.checkpoints import open_log

    with open_log(tmp_path / "fit.log") as log:
        log.write("one\n")
    with open_log(tmp_path / "fit.log") as log:
        log.write("two\n")
    assert (tmp_path / "fit.log").read_text() == "one\ntwo\n"
    target = tmp_path / "victim.txt"
    target.write_text("keep me")
    (tmp_path / "link.log").symlink_to(target)
    os.mkfifo(tmp_path / "pipe.log")
    for name, why in (("link.log", "symbolic link"), ("pipe.log", "not a regular file")):
        with pytest.raises(CheckpointError, match=why):
            open_log(tmp_path / name)
    assert target.read_text() == "keep me"


def _alias_bomb() -> str:
    """850 bytes of YAML whose aliases name 9**9 values (a "billion laughs")."""
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for previous, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{name}: &{name} [{', '.join([f'*{previous}'] * 9)}]")
    return "\n".join([*lines, "trainer:", "  plugins: *i", ""])


CONFIG_FILES = {
    "an alias bomb": (_alias_bomb().encode(), "over 100,000 values"),
    "UTF-16": ("trainer:\n  max_epochs: 1\n".encode("utf-16"), "not UTF-8 text (byte 0)"),
    "Latin-1": (b"trainer:\n  max_epochs: 1  # caf\xe9\n", "not UTF-8 text (byte 31)"),
    "nested 20,000 deep": (("trainer: " + "[" * 20000 + "]" * 20000 + "\n").encode(), "nested over 50 deep"),
    "nested 60 deep": (("trainer: " + "[" * 60 + "]" * 60 + "\n").encode(), "nested over 50 deep"),
    "over a MiB": (b"trainer:\n  max_epochs: 1\n" + b"#" * 2**20 + b"\n", "over 1 MiB"),
}


@pytest.mark.parametrize("command", ["fit", "sweep"])
@pytest.mark.parametrize("case", list(CONFIG_FILES))
def test_a_config_file_is_read_bounded_and_refused_in_one_line_naming_it(case, command, tmp_path, run_main):
    data, needle = CONFIG_FILES[case]
    (tmp_path / "c.yaml").write_bytes(data)
    status, _, err = run_main(command, "--config", str(tmp_path / "c.yaml"), cwd=tmp_path)
    assert status == 1 and len(err.strip().splitlines()) == 1, err[-2000:]
    assert f"--config {tmp_path / 'c.yaml'}: " in err and needle in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]  # nothing written


@pytest.mark.parametrize(
    "how",
    ["--data FILE", "--model.optimizer FILE", "a --config naming it", "a --config naming a file naming it"],
)
def test_a_file_of_options_given_any_other_way_is_read_by_the_same_bounded_reader(how, tmp_path, run_main):
    """jsonargparse loads a file of options given as a group's or a class's value, and one a config names by path:
    each goes through the one reader first, whichever way it comes."""
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(_alias_bomb())
    (tmp_path / "outer.yaml").write_text(f"model:\n  optimizer: {bomb}\n")
    (tmp_path / "outermost.yaml").write_text("data: outer.yaml\n")
    args = {
        "--data FILE": ["--data", str(bomb)],
        "--model.optimizer FILE": [f"--model.optimizer={bomb}"],
        "a --config naming it": ["--config", str(tmp_path / "outer.yaml")],
        "a --config naming a file naming it": ["--config", str(tmp_path / "outermost.yaml")],
    }[how]
    start = time.monotonic()
    status, _, err = run_main("fit", *args, cwd=tmp_path)
    assert status == 1 and len(err.strip().splitlines()) == 1, err[-2000:]
    assert f"{bomb}: over 100,000 values" in err and time.monotonic() - start < 30, err


def test_a_value_a_checkpoint_gives_is_refused_in_one_line_naming_the_file(root, tmp_path, mnist_dir, run_main):
    """A checkpoint's hyperparameter that passes as data but not as an option (a layer the network lacks, a negative
    learning rate) is refused naming the file, not as an option of the command line; an evaluation reads no loop
    state from it (Lightning ended one without test_loop in a KeyError)."""
    last = root / "checkpoints" / "last.ckpt"
    reseal(last, root / "freeze.ckpt", hparam("freeze", ["nope"]))
    status, _, err = run_main("test", "--ckpt_path", "freeze.ckpt", *data_args(mnist_dir), cwd=root)
    assert status == 1 and err.strip().splitlines()[-1] == (
        "error: freeze.ckpt holds --model.freeze: nope is not a layer of the Net; it has conv1, conv2, fc1, fc2"
        " (from its hyperparameters)"
    ), err[-2000:]
    status, _, err = run_main("test", "--ckpt_path", "freeze.ckpt", "--model.freeze", "[nope2]", *data_args(mnist_dir),
                              cwd=root)  # fmt: skip
    assert status == 1 and "error: --model.freeze: nope2 is not a layer" in err, err[-2000:]  # the command line's
    reseal(last, root / "loops.ckpt", lambda c: c["loops"].pop("test_loop"))
    status, _, err = run_main("test", "--ckpt_path", "loops.ckpt", *data_args(mnist_dir), cwd=root)
    assert status == 0 and "Traceback" not in err, err[-2000:]
    (tmp_path / "lr" / "checkpoints").mkdir(parents=True)
    sgd = {"class_path": "torch.optim.SGD", "init_args": {"lr": -1.0, "momentum": 0.5}}
    reseal(last, tmp_path / "lr" / "checkpoints" / "last.ckpt", hparam("optimizer", sgd))
    status, _, err = run_main("fit", "--ckpt_path", "last", "--trainer.default_root_dir", "lr", *data_args(mnist_dir),
                              cwd=tmp_path)  # fmt: skip
    assert status == 1 and err.strip().splitlines()[-1].startswith(
        "error: lr/checkpoints/last.ckpt holds --model.optimizer: Invalid learning rate: -1.0"
    ), err[-2000:]
