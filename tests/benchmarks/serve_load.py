"""Load on `python -m mnist_lit serve`: concurrent clients on loopback posting real MNIST test digits as PNGs.

Starts the server with batching off (the default) and on (--max_batch_size 16), in turn, ROUNDS times; runs
CLIENTS connections that each post one image at a time, back to back, for SECONDS seconds or REQUESTS requests in
all (whichever comes first), and prints requests/s, p50 and p99 latency and the errors. Then times `predict` on
the same images written as files (the whole command, start-up included). A benchmark, not a test: the machine
is shared, so its figures vary.

    python tests/benchmarks/serve_load.py [--ckpt_path PATH] [--data_dir ../shared/mnist] [--clients 16] [--seconds 10]
                               [--rounds 3]

Without --ckpt_path it trains a checkpoint for 50 steps first (the speed of serving does not depend on how
well the weights read digits). The clients are asyncio streams speaking HTTP/1.1 keep-alive, so that the
client costs the shared CPU as little as it can.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gzip
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


def digits(data_dir: Path, count: int) -> list[bytes]:
    """The first `count` MNIST test digits as PNG files' bytes."""
    raw = gzip.decompress((data_dir / "t10k-images-idx3-ubyte.gz").read_bytes())[16:]
    pngs = []
    for i in range(count):
        buffer = io.BytesIO()
        Image.frombytes("L", (28, 28), raw[i * 784 : (i + 1) * 784]).save(buffer, "PNG")
        pngs.append(buffer.getvalue())
    return pngs


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def start(ckpt_path: str, port: int, options: list[str], log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "mnist_lit", "serve", "--ckpt_path", ckpt_path, "--port", str(port), *options]
    server = subprocess.Popen(command, env=env(), stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as response:
                if response.status == 200:
                    return server
        except OSError:
            time.sleep(0.1)
    server.kill()
    raise SystemExit(f"the server did not start; see {log}")


async def client(port: int, bodies: list[bytes], stop: float, budget: list[int], results: list) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    i = 0
    while time.monotonic() < stop and budget[0] > 0:
        budget[0] -= 1
        body = bodies[i % len(bodies)]
        i += 1
        head = f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        sent = time.perf_counter()
        writer.write(head.encode() + b"\r\n" + body)
        status = int((await reader.readline()).split()[1])
        length = 0
        while (line := await reader.readline()) != b"\r\n":
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        answer = await reader.readexactly(length)
        results.append((time.perf_counter() - sent, status == 200 and b'"digit"' in answer))
    writer.close()


async def load(port: int, bodies: list[bytes], clients: int, seconds: float, requests: int) -> list:
    results: list = []
    budget = [requests]
    stop = time.monotonic() + seconds
    await asyncio.gather(*(client(port, bodies[c::clients], stop, budget, results) for c in range(clients)))
    return results


def report(name: str, results: list, wall: float) -> None:
    latencies = sorted(seconds for seconds, _ in results)
    errors = sum(not ok for _, ok in results)
    p50, p99 = latencies[len(latencies) // 2], latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    print(
        f"{name:<34} {len(results) / wall:7.0f} req/s   p50 {p50 * 1e3:6.1f} ms   p99 {p99 * 1e3:6.1f} ms   "
        f"{len(results)} requests, {errors} errors"
    )


def measure(name: str, ckpt_path: str, options: list[str], bodies: list[bytes], args: argparse.Namespace) -> None:
    """One run: a fresh server, a second of warm-up, then the measured load."""
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        server = start(ckpt_path, port, options, Path(tmp) / "server.log")
        try:
            asyncio.run(load(port, bodies, args.clients, 1.0, 10**9))  # warm-up
            began = time.perf_counter()
            results = asyncio.run(load(port, bodies, args.clients, args.seconds, args.requests))
            report(name, results, time.perf_counter() - began)
        finally:
            server.terminate()
            server.wait(30)


def predict_rate(ckpt_path: str, pngs: list[bytes]) -> None:
    """`predict` on the same images as files, and on a tenth of them: the whole command's time, start-up included
    (the tenth shows how much of it start-up is)."""
    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        for count in (len(pngs), len(pngs) // 10):
            folder = Path(tmp) / f"digits{count}"
            folder.mkdir()
            for i, png in enumerate(pngs[:count]):
                (folder / f"{i:05d}.png").write_bytes(png)
            command = [sys.executable, "-m", "mnist_lit", "predict", "--ckpt_path", str(Path(ckpt_path).resolve())]
            options = ["--data.predict_path", str(folder), "--trainer.enable_progress_bar", "false"]
            began = time.perf_counter()
            subprocess.run([*command, *options], cwd=tmp, env=env(), check=True, capture_output=True)
            times[count] = time.perf_counter() - began
    big, small = times
    print(
        f"{'predict, the same images as files':<34} {big / times[big]:7.0f} images/s   ({big} files in"
        f" {times[big]:.1f} s, start-up included; {small} files take {times[small]:.1f} s)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt_path")
    parser.add_argument("--data_dir", type=Path, default=ROOT.parent / "shared" / "mnist")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--requests", type=int, default=20000, help="at most this many per run")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", nargs="*", help="serve options to measure instead, e.g. --only '--workers 2'")
    args = parser.parse_args()
    pngs = digits(args.data_dir, args.images)
    bodies = [json.dumps({"image": base64.b64encode(png).decode()}).encode() for png in pngs]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt_path = args.ckpt_path
        if ckpt_path is None:
            fit = ["fit", "--data.data_dir", str(args.data_dir), "--trainer.max_steps", "50"]
            quiet = ["--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "0"]
            subprocess.run([sys.executable, "-m", "mnist_lit", *fit, *quiet], cwd=tmp, env=env(), check=True,
                           capture_output=True)  # fmt: skip
            ckpt_path = str(Path(tmp) / "checkpoints" / "last.ckpt")
        print(f"{args.clients} clients, {args.seconds:g} s or {args.requests} requests a run, {os.cpu_count()} cores")
        runs = {f"serve {o}": o.split() for o in args.only} if args.only else {
            "serve, batching off (default)": [],
            "serve, batching on (16, 5 ms)": ["--max_batch_size", "16"],
        }  # fmt: skip
        for _ in range(args.rounds):  # alternating, so that a busy spell on a shared machine hits every side
            for name, options in runs.items():
                measure(name, ckpt_path, options, bodies, args)
        if not args.only:
            predict_rate(ckpt_path, pngs)


if __name__ == "__main__":
    main()
