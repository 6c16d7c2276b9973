"""serve: a real server on a free loopback port answers as `predict` does, refuses bad requests and keeps
serving, stops cleanly; and its page, driven in headless Chromium, reads digits drawn with the mouse."""

from __future__ import annotations

import base64
import contextlib
import csv
import http.client
import itertools
import json
import math
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.cli import QUIET, cli_env, run_cli
from helpers.images import mnist_digits, png
from helpers.server import Server, free_port
from PIL import Image

pytest.importorskip("litserve")

CHROMEDRIVER = Path("/usr/bin/chromedriver")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, trained_run) -> Path:
    """A copy of the session's trained run (conftest), for the server's log and predict's files."""
    root = tmp_path_factory.mktemp("served") / "run"
    shutil.copytree(trained_run, root)
    return root


@pytest.fixture(scope="module")
def server(trained):
    server = Server(trained, "--ckpt_path", "last", "--body_timeout", "2")
    yield server
    server.stop()


def test_a_body_that_stalls_is_answered_408_and_let_go(server):
    """A client that sends part of a body and stops holds the server's memory for --body_timeout at most."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000000\r\n\r\n" + b"{" + b" " * 100_000)  # fmt: skip
        started, answer = time.monotonic(), b""
        while b"}" not in answer and (part := sock.recv(4096)):  # the status line and the JSON may come apart
            answer += part
    assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive within 2 s" in answer, answer
    assert time.monotonic() - started < 10
    assert server.get("/health")[0] == 200


def same_as_predict(server: Server, images: dict[str, bytes], folder: Path, run_main) -> None:
    """Each image posted to /predict gets the digit and the ten probabilities `predict` writes for its file."""
    folder.mkdir()
    for name, data in images.items():
        (folder / name).write_bytes(data)
    status, _out, err = run_main("predict", "--ckpt_path", "last", "--data.predict_path", str(folder), *QUIET,
                                cwd=server.log.parent)  # fmt: skip
    assert status == 0, err[-2000:]
    csv_path = next(line.split(": ", 1)[1] for line in err.splitlines() if line.startswith("Predictions: "))
    expected = {Path(row["path"]).name: row for row in csv.DictReader(open(csv_path))}
    assert expected.keys() == images.keys()
    for name, data in images.items():
        status, answer = server.predict(data)
        assert status == 200, answer
        row = expected[name]
        assert answer["digit"] == int(row["digit"]), name
        assert answer["probability"] == pytest.approx(float(row["probability"]), abs=1e-4)  # the CSV's 4 places
        assert answer["probabilities"] == pytest.approx([float(row[f"p{d}"]) for d in range(10)], abs=1e-5), name


def test_predict_answers_as_the_predict_command(server, mnist_dir, tmp_path, run_main):
    digits = mnist_digits(mnist_dir, 6)
    images = {f"{i}.png": png(image) for i, image in enumerate(digits)}
    images["ink-on-paper.jpg"] = png(Image.eval(digits[0].resize((90, 90)), lambda v: 255 - v).convert("RGB"), "JPEG")
    images["scan.bmp"] = png(digits[1].resize((56, 56)), "BMP")
    same_as_predict(server, images, tmp_path / "digits", run_main)


def test_real_mnist_digits_answer_as_the_predict_command(server, real_mnist, tmp_path, run_main):
    images = {f"{i}.png": png(image) for i, image in enumerate(mnist_digits(real_mnist, 10))}
    same_as_predict(server, images, tmp_path / "digits", run_main)


def test_a_data_url_is_read_as_its_image(server, mnist_dir):
    image = png(mnist_digits(mnist_dir, 1)[0])
    plain, from_url = server.predict(image), server.predict("data:image/png;base64," + base64.b64encode(image).decode())
    assert plain[0] == from_url[0] == 200 and plain[1] == from_url[1]


def test_health_and_a_self_contained_page(server):
    assert server.get("/health") == (200, b"ok")
    status, page = server.get("/")
    assert status == 200 and b"<canvas" in page and b'type="file"' in page
    assert b"http://" not in page and b"https://" not in page and b"//cdn" not in page  # works offline


def class_labels(html: bytes) -> list[str]:
    start = html.index(b'<script id="classes" type="application/json">')
    return json.loads(html[html.index(b">", start) + 1 : html.index(b"</script>", start)])


def test_the_pages_bars_carry_the_models_class_names(server):
    from mnist_lit.datasets.catalog import DATASETS
    from mnist_lit.serve import page

    assert class_labels(server.get("/")[1]) == [str(d) for d in range(10)]
    assert class_labels(page(DATASETS["fashion_mnist"].classes))[:2] == ["T-shirt/top", "Trouser"]
    assert class_labels(page(("</script>",) * 10)) == ["</script>"] * 10  # a name cannot end the element


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height and holds a few bytes of data: decoding it would fail, not finish."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    idat = zlib.compress(b"\x00" * 64)
    data = struct.pack(">I", len(idat)) + b"IDAT" + idat + struct.pack(">I", zlib.crc32(b"IDAT" + idat))
    return b"\x89PNG\r\n\x1a\n" + chunk + data


def nan_tiff() -> bytes:
    pixels = np.zeros((28, 28), dtype=np.float32)
    pixels[4:24, 12:16] = np.nan
    return png(Image.fromarray(pixels, mode="F"), "TIFF")


def broken_chunk_png() -> bytes:
    """A digit whose PNG holds, after its image data, a zTXt chunk that Pillow raises a SyntaxError on."""
    image = Image.new("L", (28, 28), 0)
    image.paste(255, (12, 4, 16, 24))
    good = png(image)
    end, body = good.index(b"IEND") - 4, b"key\x00\x01data"
    chunk = struct.pack(">I", len(body)) + b"zTXt" + body + struct.pack(">I", zlib.crc32(b"zTXt" + body))
    return good[:end] + chunk + good[end:]


def as_json(data: bytes) -> bytes:
    return json.dumps({"image": base64.b64encode(data).decode()}).encode()


BAD_REQUESTS = {
    # name: (body, content type, status, words the error must contain)
    "empty body": (b"", "application/json", 400, "empty"),
    "not JSON": (b"hello", "application/json", 400, "not JSON"),
    "JSON without an image": (b'{"picture": "x"}', "application/json", 400, '"image"'),
    "not base64": (b'{"image": "%%%"}', "application/json", 400, "base64"),
    "not an image": (as_json(b"hello, I am text"), "application/json", 422, "not an image"),
    "EPS, which Pillow would hand to Ghostscript": (
        as_json(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 28 28\nshowpage\n"),
        "application/json",
        422,
        "not an image",
    ),
    "a PNG cut short": (as_json(png(Image.new("L", (64, 64), 90))[:60]), "application/json", 422, "not a readable"),
    "blank drawing": (as_json(png(Image.new("RGB", (280, 280), "white"))), "application/json", 422, "blank"),
    "20000x20000 PNG": (as_json(png_header(20000, 20000)), "application/json", 413, "20000x20000"),
    "50 MB body": (b'{"image": "' + b"A" * (50 * 2**20) + b'"}', "application/json", 413, "bytes"),
    "JSON nested deeper than Python's stack": (b"[" * 100_000 + b"]" * 100_000, "application/json", 400, "not JSON"),
    "an image string that is not ASCII": ('{"image": "ÿÿÿÿ"}'.encode(), "application/json", 400, "base64"),
    "pixels that are not finite": (as_json(nan_tiff()), "application/json", 422, "finite"),
    "a broken chunk after the image data": (as_json(broken_chunk_png()), "application/json", 422, "not a readable"),
    "wrong content type": (b"x" * 100, "text/plain", 415, "content type"),
    "raw PNG bytes": (png(Image.new("L", (28, 28))), "image/png", 415, "application/json"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_a_bad_request_gets_a_4xx_and_one_line_and_the_next_one_is_served(server, mnist_dir, case):
    body, content_type, expected, needle = BAD_REQUESTS[case]
    status, answer = server.post(body, content_type)
    assert status == expected, answer
    assert b"\n" not in answer.strip() and needle in json.loads(answer)["error"], answer
    status, good = server.predict(png(mnist_digits(mnist_dir, 1)[0]))
    assert status == 200 and 0 <= good["digit"] <= 9


def test_a_body_without_a_length_is_cut_off_at_the_limit(server):
    def chunks():
        yield b'{"image": "'
        for _ in range(50):
            yield b"A" * 2**20
        yield b'"}'

    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    connection.request("POST", "/predict", chunks(), {"Content-Type": "application/json"}, encode_chunked=True)
    response = connection.getresponse()
    assert response.status == 413 and "over" in json.loads(response.read())["error"]
    connection.close()


def test_one_log_line_per_request(server, mnist_dir):
    before = server.log.read_text().splitlines()
    server.predict(png(mnist_digits(mnist_dir, 1)[0]))
    server.post(b"", "application/json")
    new = server.log.read_text().splitlines()[len(before) :]  # a request's line is written before its answer
    assert len(new) == 2 and new[0].startswith("127.0.0.1 POST /predict 200") and " 400 " in new[1], new


def test_a_pth_export_serves_the_same_net(trained, tmp_path):
    from mnist_lit import runs
    from mnist_lit.export import export
    from mnist_lit.serve import load_net

    export(trained / "checkpoints" / "last.ckpt", tmp_path / "model.pth")
    checkpoint, (pth, dataset, _) = (
        runs.load(trained / "checkpoints" / "last.ckpt").net,
        load_net(str(tmp_path / "model.pth")),
    )
    assert dataset == "mnist"
    assert all(
        torch.equal(a, b) for a, b in zip(checkpoint.state_dict().values(), pth.state_dict().values(), strict=True)
    )


def test_a_port_in_use_is_a_one_line_error(trained, run_main):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        status, _, err = run_main("serve", "--ckpt_path", "last", "--port", port, cwd=trained)
    assert status != 0 and err.strip().splitlines()[-1].startswith(
        f"error: --port: cannot listen on 127.0.0.1 port {port}"
    )


def test_help_names_the_options(tmp_path, run_main):
    status, out, _ = run_main("serve", "--help", cwd=tmp_path)
    assert status == 0
    for option in ("--ckpt_path", "--trainer.default_root_dir", "--host", "--port", "--max_batch_size", "--workers"):
        assert option in out


def running(pids: list[int]) -> list[int]:
    """Those of pids that still run (zombies, finished but not yet reaped, do not count)."""
    alive = []
    for pid in pids:
        try:
            if "\tZ" not in Path(f"/proc/{pid}/status").read_text():
                alive.append(pid)
        except OSError:  # gone
            pass
    return alive


def test_sigterm_stops_the_server_and_all_its_processes(server):
    """Last in this file: it stops the module's server."""
    children = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            if f"\nPPid:\t{server.process.pid}\n" in status.read_text():
                children.append(int(status.parent.name))
        except OSError:
            pass
    assert len(running(children)) >= 3, children  # LitServe's queue manager, inference worker and HTTP process
    exit_status = server.stop(signal.SIGTERM)
    log = server.log.read_text()
    assert exit_status == 0 and "Traceback" not in log and log.rstrip().endswith("stopped"), (exit_status, log)
    deadline = time.monotonic() + 10
    while running(children) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not running(children), [Path(f"/proc/{pid}/cmdline").read_text() for pid in running(children)]
    assert server.get("/health")[0] is None  # nothing listens on the port any more


# The page, in a real browser. The model must really read digits: trained on the real MNIST for one epoch.


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None or not CHROMEDRIVER.exists():
        pytest.skip("Chromium and its driver are not installed (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=900,640"):
        options.add_argument(argument)
    from selenium.webdriver.chrome.service import Service

    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def reader(tmp_path_factory, real_mnist):
    root = tmp_path_factory.mktemp("reader")
    result = run_cli("fit", "--data.data_dir", str(real_mnist), *QUIET, "--trainer.max_epochs", "1", cwd=root)
    assert result.returncode == 0, result.stderr[-2000:]
    server = Server(root, "--ckpt_path", "last")
    yield server
    assert server.stop() == 0


# Strokes in the 280x280 pad's pixels: a vertical stroke, a closed loop, a bar and a slanted stem.
DRAWINGS = {
    "1": [[(140, 50 + 9 * i) for i in range(21)]],
    "0": [[(140 + 60 * math.sin(math.pi * i / 18), 140 - 90 * math.cos(math.pi * i / 18)) for i in range(38)]],
    "7": [[(80 + 12 * i, 60) for i in range(11)] + [(200 - 6 * i, 60 + 16 * i) for i in range(1, 13)]],
}


@pytest.mark.slow
def test_the_page_reads_digits_drawn_with_the_mouse_and_uploaded(reader, browser, tmp_path, real_mnist):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def shown() -> str:
        WebDriverWait(browser, 20).until(
            lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-busy") == "no"
        )
        return browser.find_element(By.ID, "digit").text

    browser.get(f"http://127.0.0.1:{reader.port}/")
    pad = browser.find_element(By.ID, "pad")
    for expected, strokes in DRAWINGS.items():
        browser.find_element(By.ID, "clear").click()
        assert shown() == "?"
        for stroke in strokes:
            points = [(round(x), round(y)) for x, y in stroke]
            actions = ActionChains(browser, duration=10)  # real mouse events: down, moves, up
            actions.move_to_element_with_offset(pad, points[0][0] - 140, points[0][1] - 140).click_and_hold()
            for (x0, y0), (x1, y1) in itertools.pairwise(points):
                actions.move_by_offset(x1 - x0, y1 - y0)
            actions.release().perform()
        assert shown() == expected
        bars = [browser.find_element(By.ID, f"bar-{d}") for d in range(10)]
        assert "top" in bars[int(expected)].get_attribute("class")
        browser.save_screenshot(str(tmp_path / f"drawn-{expected}.png"))
    shutil.copy(tmp_path / "drawn-7.png", "/tmp/serve-page.png")  # for a person to look at
    # A photo of a digit through the file picker: the real test digit 7, as dark ink on light paper.
    photo = tmp_path / "photo.jpg"
    Image.eval(mnist_digits(real_mnist, 1)[0].resize((200, 200)), lambda v: 255 - v).save(photo)
    browser.find_element(By.ID, "file").send_keys(str(photo))
    WebDriverWait(browser, 20).until(lambda b: b.find_element(By.ID, "digit").text != "?")
    assert shown() == "7"
    # A file that is not an image: the page shows the server's refusal, and no digit
    (tmp_path / "notes.txt").write_text("not a digit")
    browser.find_element(By.ID, "file").send_keys(str(tmp_path / "notes.txt"))
    WebDriverWait(browser, 20).until(lambda b: "not an image" in b.find_element(By.ID, "status").text)
    assert shown() == "?"


def process_group(pgid: int) -> list[int]:
    """The running processes of a process group."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: only a listener refuses
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def answers(port: int) -> bool:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", "/health")
        return connection.getresponse().status == 200
    except OSError:
        return False
    finally:
        connection.close()


@pytest.mark.slow  # whole runs: in the slow suite, so the default one stays under 4 minutes
def test_sigkill_of_serves_main_process_leaves_no_process_and_frees_the_port(trained):
    port = free_port()
    command = [sys.executable, "-m", "mnist_lit", "serve", "--ckpt_path", "last", "--port", str(port)]
    with (trained / f"serve-{port}.log").open("w") as log:
        process = subprocess.Popen(command, cwd=trained, env=cli_env(), stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not answers(port):
            assert process.poll() is None and time.monotonic() < deadline, (trained / f"serve-{port}.log").read_text()
            time.sleep(0.2)
        # main, LitServe's queue manager, its model process and its HTTP process
        assert len(process_group(process.pid)) >= 4, process_group(process.pid)
        process.kill()
        process.wait()
        killed = time.monotonic()
        while (process_group(process.pid) or port_in_use(port)) and time.monotonic() - killed < 10:
            time.sleep(0.1)
        left = [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in process_group(process.pid)]
        assert not left and not port_in_use(port), (left, port_in_use(port))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)


def test_a_pipe_named_as_a_pth_is_refused_at_once(tmp_path, run_main):
    # read as a checkpoint is read: a regular file only, so a FIFO cannot hang serve waiting for a writer
    os.mkfifo(tmp_path / "model.pth")
    status, _, err = run_main("serve", "--ckpt_path", str(tmp_path / "model.pth"), cwd=tmp_path)
    assert status != 0 and err.count("\n") == 1 and "not a regular file" in err, err
