"""How far one training step of the guide's Net is from this machine's limit, and what the kernels could gain.

Counts the FLOPs of one step (forward + backward, batch 64) with torch's FlopCounterMode, times each of the Net's
FLOP-heavy kernels alone at the step's shapes (convolutions and GEMMs through oneDNN/MKL, forward and both
backward passes) to get the attainable step time, and times the whole step: eager in the best hand-written loop
(channels_last, fused SGD), the same in NCHW, with torch.compile (inductor), and under bf16 autocast.

    python tests/benchmarks/limit.py [--threads 2]
    python tests/benchmarks/limit.py --lightning   # Lightning's own cost per step, and what mnist_lit.lean saves

--lightning trains a one-layer model (4 inputs, one sample a batch: the step itself almost free) for 3000 steps, in
a hand-written loop and under Lightning's Trainer with a fit's number of callbacks (5, a ModelCheckpoint among them,
none saving), with each of mnist_lit.lean's pieces on in turn and all together, alternated over rounds, one thread.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[2]
BATCH, STEPS_PER_EPOCH = 64, 938  # 60k images: 937 batches of 64 and one of 32


def timed(fn: Callable[[], object], seconds: float = 1.0, rounds: int = 5) -> float:
    """Median seconds per call over rounds of about `seconds` each."""
    for _ in range(20):
        fn()
    per_round = []
    for _ in range(rounds):
        n, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds / rounds or n < 10:
            fn()
            n += 1
        per_round.append(elapsed / n)
    return statistics.median(per_round)


def net_and_step(
    compiled: bool = False, bf16: bool = False, layout: torch.memory_format = torch.channels_last
) -> tuple[torch.nn.Module, Callable[[], object]]:
    from mnist_lit.model import Net

    torch.manual_seed(1)
    net = Net().to(memory_format=layout)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.5, fused=True)
    forward = torch.compile(net) if compiled else net
    x = torch.randn(BATCH, 1, 28, 28).contiguous(memory_format=layout)
    y = torch.randint(0, 10, (BATCH,))

    def step() -> None:
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.nll_loss(forward(x), y)
        loss.backward()
        optimizer.step()

    return net, step


def flops_per_step() -> int:
    net, _ = net_and_step()
    x = torch.randn(BATCH, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    with FlopCounterMode(display=False) as counter:
        F.nll_loss(net(x), torch.randint(0, 10, (BATCH,))).backward()
    return counter.get_total_flops()


def kernel_times() -> dict[str, float]:
    """Each FLOP-heavy kernel of one step alone, at the step's shapes: forward, grad of input, grad of weight."""
    cl = torch.channels_last
    times = {}
    for name, (cin, cout, size) in {"conv1": (1, 10, 28), "conv2": (10, 20, 12)}.items():
        x = torch.randn(BATCH, cin, size, size).contiguous(memory_format=cl)
        w = torch.randn(cout, cin, 5, 5).contiguous(memory_format=cl)
        grad = F.conv2d(x, w).contiguous(memory_format=cl)
        mask = [name != "conv1", True, True]  # conv1's input is the data: no gradient for it
        times[f"{name} forward"] = timed(lambda x=x, w=w: F.conv2d(x, w))
        times[f"{name} backward"] = timed(
            lambda x=x, w=w, grad=grad, mask=mask: torch.ops.aten.convolution_backward(
                grad, x, w, [w.shape[0]], [1, 1], [0, 0], [1, 1], False, [0, 0], 1, mask
            )
        )
    for name, (n_in, n_out) in {"fc1": (320, 50), "fc2": (50, 10)}.items():
        a, w = torch.randn(BATCH, n_in), torch.randn(n_out, n_in)
        g = torch.randn(BATCH, n_out)
        times[f"{name} forward"] = timed(lambda a=a, w=w: a @ w.t())
        times[f"{name} backward"] = timed(lambda a=a, w=w, g=g: (g @ w, g.t() @ a))
    return times


def peak_gemm() -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    return 2 * 2048**3 / timed(lambda: a @ b, seconds=2.0)


def lightning_overhead(rounds: int = 4, steps: int = 3000) -> None:
    """Microseconds per step: a hand-written loop, and Lightning's loop with and without mnist_lit.lean's pieces."""
    import tempfile

    from lightning.pytorch import Callback, LightningModule, Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.profilers import PassThroughProfiler

    from mnist_lit.lean import LeanHooks, QuietProfiler

    torch.set_num_threads(1)
    x, y = torch.randn(steps, 1, 4), torch.randn(steps, 1)

    class Tiny(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
            return F.mse_loss(self.layer(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.5, fused=True)

    class TinyLean(LeanHooks, Tiny):
        pass

    class Batches:  # one (input, target) pair a step, as a loader gives them
        def __len__(self) -> int:
            return steps

        def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            return zip(x, y, strict=True)

    def plain() -> float:
        layer = torch.nn.Linear(4, 1)
        optimizer = torch.optim.SGD(layer.parameters(), lr=0.01, momentum=0.5, fused=True)
        start = time.perf_counter()
        for a, b in zip(x, y, strict=True):
            optimizer.zero_grad()
            F.mse_loss(layer(a), b).backward()
            optimizer.step()
        return (time.perf_counter() - start) / steps

    def lightning(model_class: type, profiler: PassThroughProfiler) -> float:
        epoch = [0.0]

        class Clock(Callback):
            def on_train_epoch_start(self, *args: object) -> None:
                epoch[0] = time.perf_counter()

            def on_train_epoch_end(self, *args: object) -> None:
                epoch[0] = time.perf_counter() - epoch[0]

        class Other(Callback):  # stand-ins for a fit's bar, curves and config saver: hooks that do nothing
            pass

        callbacks = [Clock(), Other(), Other(), Other(), ModelCheckpoint(scratch, every_n_train_steps=10**9)]
        trainer = Trainer(max_epochs=1, callbacks=callbacks, logger=False, enable_progress_bar=False,
                          enable_model_summary=False, profiler=profiler, accelerator="cpu", devices=1)  # fmt: skip
        trainer.fit(model_class(), train_dataloaders=Batches())
        return epoch[0] / steps

    sides: dict[str, Callable[[], float]] = {
        "hand-written loop": plain,
        "Lightning": lambda: lightning(Tiny, PassThroughProfiler()),
        "  + LeanHooks": lambda: lightning(TinyLean, PassThroughProfiler()),
        "  + QuietProfiler": lambda: lightning(Tiny, QuietProfiler()),
        "  + both": lambda: lightning(TinyLean, QuietProfiler()),
    }
    times: dict[str, list[float]] = {name: [] for name in sides}
    with tempfile.TemporaryDirectory() as scratch:  # the checkpoint callback's folder; it never saves
        for _ in range(rounds):
            for name, side in sides.items():
                times[name].append(side())
    base = statistics.median(times["Lightning"])
    for name, values in times.items():
        median = statistics.median(values)
        saved = f"  ({(median - base) * 1e6:+.0f} us against Lightning's)" if name.startswith("  ") else ""
        print(f"{name:28s} {median * 1e6:6.0f} us a step{saved}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lightning", action="store_true", help="Lightning's own cost per step (one thread)")
    args = parser.parse_args()
    if args.lightning:
        import logging

        logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
        lightning_overhead()
        return
    torch.set_num_threads(args.threads)
    flops = flops_per_step()
    print(f"FLOPs per step (forward + backward, batch {BATCH}): {flops / 1e6:.1f} M;"
          f" per epoch of 60k: {flops * 60000 / BATCH / 1e9:.1f} G")  # fmt: skip
    peak = peak_gemm()
    print(f"large GEMM (2048^3, {args.threads} threads): {peak / 1e9:.1f} GFLOP/s")
    kernels = kernel_times()
    attainable = sum(kernels.values())
    for name, seconds in kernels.items():
        print(f"  {name:16s} {seconds * 1e6:7.1f} us")
    print(
        f"the step's kernels alone: {attainable * 1e3:.3f} ms = {flops / attainable / 1e9:.1f} GFLOP/s at these shapes"
    )
    variants = {
        "eager": {},
        "eager, NCHW": {"layout": torch.contiguous_format},
        "torch.compile": {"compiled": True},
        "bf16 autocast": {"bf16": True},
    }
    for label, options in variants.items():
        start = time.perf_counter()
        _, step = net_and_step(**options)
        step()
        warm = time.perf_counter() - start
        seconds = timed(step, seconds=3.0)
        print(f"step, {label:14s} {seconds * 1e3:6.3f} ms  ({flops / seconds / 1e9:5.1f} GFLOP/s,"
              f" {seconds / attainable:4.2f}x the kernels alone; first step {warm:.1f} s)")  # fmt: skip


if __name__ == "__main__":
    main()
