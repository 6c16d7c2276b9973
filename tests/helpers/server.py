"""`serve` as a user starts it, on a free loopback port."""

from __future__ import annotations

import base64
import http.client
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from helpers.cli import cli_env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`python -m mnist_lit serve ARGS` as a user starts it, on a free loopback port; its log in a file."""

    def __init__(self, root: Path, *args: str) -> None:
        self.port = free_port()
        self.log = root / f"serve-{self.port}.log"
        command = [sys.executable, "-m", "mnist_lit", "serve", *args, "--port", str(self.port)]
        with self.log.open("w") as log:
            self.process = subprocess.Popen(command, cwd=root, env=cli_env(), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while self.get("/health")[0] != 200:
            assert self.process.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.2)

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, response.read()
        except ConnectionError:
            return None, b""
        finally:
            connection.close()

    def get(self, path: str) -> tuple[int | None, bytes]:
        return self.request("GET", path)

    def predict(self, image: bytes | str) -> tuple[int | None, dict]:
        data = image if isinstance(image, str) else base64.b64encode(image).decode()
        status, body = self.post(json.dumps({"image": data}).encode())
        return status, json.loads(body)

    def post(self, body: bytes, content_type: str = "application/json") -> tuple[int | None, bytes]:
        return self.request("POST", "/predict", body, {"Content-Type": content_type})

    def stop(self, signum: int = signal.SIGTERM) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signum)
        try:
            return self.process.wait(60)
        finally:
            if self.process.poll() is None:
                self.process.kill()
