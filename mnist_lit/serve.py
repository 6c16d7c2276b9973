"""Serve a trained Net with LitServe: POST /predict, GET /health, and a page at / to draw digits on."""

# No `from __future__ import annotations`: LitServe reads decode_request's and encode_response's annotations
# as objects to build its route, and a string there would break it.

import asyncio
import base64
import binascii
import io
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import litserve as ls
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from torch import Tensor, nn

from mnist_lit import runs, signals
from mnist_lit.datasets import DATASETS, DEFAULT, FORMATS, check_cost, open_image, prepare
from mnist_lit.model import log_probabilities

PAGE = Path(__file__).with_name("page.html")
MAX_BODY = 16 * 2**20  # bytes: a 12-megapixel phone photo, base64-encoded, fits
# bytes of request bodies one HTTP process holds while they arrive: many slow uploads must not exhaust memory
MAX_HELD = 4 * MAX_BODY
MAX_PIXELS = 4096 * 4096  # read from the image's header, before anything is decoded
USAGE = 'send {"image": "<base64 of a PNG, JPEG or BMP>"} as application/json'


class Refused(ValueError):
    """A request answered with a 4xx status and {"error": message}."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def load_net(ckpt_path: str, directory: Path | None = None) -> tuple[nn.Module, str, str]:
    """The network in a mnist_lit checkpoint ('last': the newest in directory), or in a .pth that `export` wrote (the
    guide's state_dict, or another network's spec and weights); the dataset it was trained on (the checkpoint's; a
    .pth records none, and is taken for MNIST); and the file it came from."""
    if Path(ckpt_path).suffix.lower() not in (".pth", ".pt"):
        trained = runs.load(ckpt_path, directory)
        return trained.net, trained.dataset, trained.path
    return runs.open_weights(ckpt_path), DEFAULT, ckpt_path


def read_image(request: dict[str, Any], dataset: str) -> Tensor:
    """The request's image, prepared exactly as `predict` prepares a file."""
    data: str = request["image"]  # the Gate lets only {"image": str} through
    if data.startswith("data:"):  # a data URL, as a browser's canvas.toDataURL() gives it
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise Refused(400, f'"image" is not base64: {USAGE}') from None
    if not raw:
        raise Refused(400, f'"image" is empty: {USAGE}')
    try:
        image = open_image(io.BytesIO(raw))
    except UnidentifiedImageError:
        raise Refused(422, f"not an image: send a PNG, JPEG or BMP ({', '.join(FORMATS)} are read)") from None
    except Exception as err:  # a header Pillow chokes on: bytes from a client can make it raise nearly anything
        raise Refused(422, f"not a readable image ({type(err).__name__})") from None
    if image.width * image.height > MAX_PIXELS:
        size = f"{image.width}x{image.height}"
        raise Refused(413, f"the image is {size} pixels; this server decodes at most {MAX_PIXELS} (4096x4096)")
    try:
        check_cost(image)
    except ValueError as err:
        raise Refused(413, str(err)) from None
    try:
        known = DATASETS[dataset]
        return prepare(ImageOps.exif_transpose(image), known.mean, known.std, known.box)
    except ValueError as err:  # prepare's "no digit found (the image is blank)"
        raise Refused(422, str(err)) from None
    except Exception as err:  # a header that opens over data that does not decode: Pillow raises many kinds
        raise Refused(422, f"not a readable image ({type(err).__name__}: {err})") from None


def refusal(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class DigitAPI(ls.LitAPI):
    """The Net behind POST /predict. A refused image travels through batch and predict as its Refused, so that
    one bad request in a batch fails only itself (LitServe fails a whole batch on an exception)."""

    def __init__(self, net: nn.Module, dataset: str, max_batch_size: int, batch_timeout: float) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout)
        self.net, self.dataset = net, dataset
        self.server_pid = os.getpid()  # LitServe spawns the model processes from serve's main process

    def setup(self, device: str) -> None:
        # A spawned process (fork and exec) runs no fork hook: it asks for its parent's death signal here.
        signals.die_with_parent(self.server_pid)
        # Measured on the 2-core machine, busy: a forward pass took 0.25 ms on one thread, 13 ms on two.
        torch.set_num_threads(1)
        Image.MAX_IMAGE_PIXELS = None  # read_image checks the size itself, before decoding, against a lower limit
        signals.ignore_ctrl_c()
        self.net.to(device)

    def decode_request(self, request: Request) -> Tensor | Refused:
        # Annotated Request, LitServe parses the body as JSON and hands over that dict
        try:
            return read_image(request, self.dataset)
        except Refused as refused:
            return refused
        except Exception as err:  # LitServe would answer 500: whatever a request's bytes cause is the request's
            return Refused(422, f"not a readable image ({type(err).__name__})")

    def batch(self, inputs: list[Tensor | Refused]) -> list[Tensor | Refused]:
        return inputs

    @torch.inference_mode()
    def predict(self, x: Any) -> Any:
        inputs = x if self.max_batch_size > 1 else [x]
        images = [i for i in inputs if isinstance(i, Tensor)]
        if images:
            outputs = self.net(torch.stack(images).to(self.device))
            probabilities = iter(log_probabilities(self.net, outputs).exp().cpu())
        outputs = [next(probabilities) if isinstance(i, Tensor) else i for i in inputs]
        return outputs if self.max_batch_size > 1 else outputs[0]

    def encode_response(self, output: Tensor | Refused) -> Response:
        if isinstance(output, Refused):
            return refusal(output.status, str(output))
        probabilities = output.tolist()
        digit = max(range(10), key=probabilities.__getitem__)
        name = DATASETS[self.dataset].classes[digit]
        return JSONResponse(
            {"digit": digit, "class": name, "probability": probabilities[digit], "probabilities": probabilities}
        )


def page(classes: tuple[str, ...]) -> bytes:
    """The drawing page, its bars labelled with the model's class names."""
    digits = json.dumps(list(DATASETS[DEFAULT].classes))  # the page's own labels, replaced by the names
    names = json.dumps(list(classes)).replace("</", "<\\/")  # inside a <script> element
    return PAGE.read_text(encoding="utf-8").replace(digits, names).encode()


class Gate:
    """ASGI middleware in front of LitServe's routes: the page at GET /, early refusal of a POST /predict whose
    body cannot be a request (LitServe would answer a body that is not JSON with a 500), one log line a request."""

    held = 0  # bytes of bodies this process is receiving (one event loop: no lock needed)

    def __init__(
        self, app: ASGIApp, classes: tuple[str, ...] = DATASETS[DEFAULT].classes, body_timeout: float = 30.0
    ) -> None:
        self.app = app
        self.page = page(classes)
        self.body_timeout = body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        method, path = scope["method"], scope["path"]
        client = (scope.get("client") or ("-",))[0]

        async def logged(message: Message) -> None:
            if message["type"] == "http.response.start":  # logged before the answer leaves: in order with it
                milliseconds = (time.perf_counter() - start) * 1e3
                print(f"{client} {method} {path} {message['status']} {milliseconds:.1f} ms", file=sys.stderr)
            await send(message)

        if method in ("GET", "HEAD") and path == "/":
            await Response(self.page, media_type="text/html; charset=utf-8")(scope, receive, logged)
        elif method == "POST" and path == "/predict":
            body_or_refusal = await self.read(scope, receive)
            if isinstance(body_or_refusal, Response):
                await body_or_refusal(scope, receive, logged)
            else:
                await self.app(scope, replay(body_or_refusal, receive), logged)
        else:
            await self.app(scope, receive, logged)

    async def read(self, scope: Scope, receive: Receive) -> bytes | JSONResponse:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if headers.get("content-type", "").partition(";")[0].strip().lower() != "application/json":
            return refusal(415, f"content type {headers.get('content-type', '(none)')!r}: {USAGE}")
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > MAX_BODY:  # refused before a byte of it is read
            return refusal(413, f"the body is {int(length)} bytes; this server takes at most {MAX_BODY}")
        # A client that sends slowly, or stops, holds its part of the body here: for body_timeout at most, and
        # all of them together for MAX_HELD bytes at most.
        body, deadline = bytearray(), time.monotonic() + self.body_timeout
        try:
            while True:
                try:
                    message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.0))
                except TimeoutError:
                    return refusal(408, f"the body did not arrive within {self.body_timeout:g} s")
                chunk = message.get("body", b"")
                if Gate.held + len(chunk) > MAX_HELD:
                    return refusal(503, "the server is receiving too many large requests at once: try again later")
                body += chunk
                Gate.held += len(chunk)
                if len(body) > MAX_BODY:
                    return refusal(413, f"the body is over {MAX_BODY} bytes, the most this server takes")
                if not message.get("more_body"):
                    break
        finally:
            Gate.held -= len(body)
        if not body:
            return refusal(400, f"the body is empty: {USAGE}")
        try:
            request = json.loads(body)
        except (ValueError, RecursionError):  # RecursionError: JSON nested deeper than Python's stack
            return refusal(400, f"the body is not JSON this server reads: {USAGE}")
        if not isinstance(request, dict) or not isinstance(request.get("image"), str):
            return refusal(400, f'the JSON has no "image" string: {USAGE}')
        return bytes(body)


def replay(body: bytes, receive: Receive) -> Receive:
    """The body the Gate read, for the app behind it; then the client's own messages (a disconnect)."""
    sent = False

    async def again() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return again


def serve(
    net: nn.Module,
    dataset: str,
    host: str,
    port: int,
    max_batch_size: int,
    batch_timeout: float,
    workers: int,
    accelerator: str,
    body_timeout: float = 30.0,
) -> None:
    """Run the server until Ctrl-C or SIGTERM."""
    api = DigitAPI(net, dataset, max_batch_size=max_batch_size, batch_timeout=batch_timeout)
    server = ls.LitServer(
        api,
        accelerator=accelerator,
        workers_per_device=workers,
        middlewares=[(Gate, {"classes": DATASETS[dataset].classes, "body_timeout": body_timeout})],
    )
    stopping = False

    def stop() -> None:
        nonlocal stopping
        stopping = True

    # LitServe's worker monitor, a thread here, polls the queue manager that stopping shuts down; when the two meet,
    # it logs "Monitoring worker crashed" and a traceback, of a stop that went well.
    # their-words[litserve.monitoring]: the monitor thread's crash line
    logging.getLogger("litserve.server").addFilter(lambda r: not (stopping and r.getMessage().startswith("Monitoring")))
    signals.stop_server_on_signals(stop)  # SIGTERM and Ctrl-C: LitServer stops its processes cleanly
    # Every process LitServer forks (its queue manager, the HTTP servers) dies with the process that forked it;
    # the model processes, spawned, see to it in DigitAPI.setup.
    signals.children_die_with_this_process()
    server.run(host=host, port=port, log_level="warning", generate_client_file=False)
