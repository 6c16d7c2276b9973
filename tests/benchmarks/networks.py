"""Training steps per second of the built-in networks, side by side: the cost of a step, apart from everything else.

Each network trains on one random batch held in memory (channels_last, fused SGD, the threads torch has), warmed up,
then timed over about 6,000 images; the networks alternate round by round, so that a slow spell on a shared machine
hits all of them alike. Prints images a second per round and, per network, the median over rounds of its ratio to the
first network's time per step.

    python tests/benchmarks/networks.py [--batch_size 128] [--rounds 3] [--bf16]
        [--nets Net,BatchNormNet,ConvNet:width=24:dropout=0]   # classes of mnist_lit.model, NAME:ARG=NUMBER...
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from mnist_lit import model


def images_per_second(name: str, batch_size: int, bf16: bool) -> float:
    torch.manual_seed(0)
    cls, *settings = name.split(":")
    kwargs = {key: float(value) if "." in value else int(value) for key, value in (s.split("=") for s in settings)}
    net = getattr(model, cls)(**kwargs).to(memory_format=torch.channels_last)
    optimiser = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, fused=True)
    images = torch.randn(batch_size, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (batch_size,))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            outputs = net(images)
        optimiser.zero_grad()
        F.nll_loss(model.log_probabilities(net, outputs.float()), labels).backward()
        optimiser.step()

    for _ in range(10):
        step()
    steps = max(20, 6000 // batch_size)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch_size / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--nets", default="Net,BatchNormNet,ConvNet:width=24:dropout=0")
    parser.add_argument("--bf16", action="store_true", help="under bf16 autocast")
    args = parser.parse_args()
    nets = args.nets.split(",")
    print(f"{torch.get_num_threads()} threads, batch {args.batch_size}, {'bf16' if args.bf16 else 'fp32'}")
    rates: dict[str, list[float]] = {name: [] for name in nets}
    for _ in range(args.rounds):
        for name in nets:
            rates[name].append(images_per_second(name, args.batch_size, args.bf16))
        print("  ".join(f"{name} {rates[name][-1]:7.0f} img/s" for name in nets), flush=True)
    for name in nets:
        ratio = statistics.median(first / own for first, own in zip(rates[nets[0]], rates[name], strict=True))
        print(f"{name:30s} median {statistics.median(rates[name]):7.0f} img/s   step x {nets[0]}: {ratio:.2f}")


if __name__ == "__main__":
    main()
