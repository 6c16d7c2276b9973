"""Start-up cost of the command line: `python -m mnist_lit ARGS` as shipped, against the same with its start-up
imports collected as usual (mnist_lit.__main__._import_uncollected turned off: a benchmark seam), alternated A B,
B A over rounds. Each run starts in a fresh temporary folder (so `fit` may run every time). Prints each side's wall
times, their medians and the ratio.

    python tests/benchmarks/startup.py [--rounds 5] -- fit --help
    python tests/benchmarks/startup.py -- fit --data.data_dir ../shared/mnist --trainer.max_steps 50
    python tests/benchmarks/startup.py -- test --ckpt_path last --trainer.default_root_dir RUN --data.data_dir ...
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time

SIDES = {
    "shipped": "from mnist_lit.__main__ import main\nmain()\n",
    "collected": (  # the start-up imports with the collector on, as before it was turned off for them
        "import mnist_lit.__main__ as entry\nentry._import_uncollected = lambda: None\nentry.main()\n"
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("args", nargs=argparse.REMAINDER, help="-- then the command's arguments")
    options = parser.parse_args()
    args = options.args[1:] if options.args[:1] == ["--"] else options.args
    if not args:
        parser.error("give the command's arguments after --, e.g. -- fit --help")
    times: dict[str, list[float]] = {side: [] for side in SIDES}
    for round_ in range(options.rounds):
        for side in SIDES if round_ % 2 == 0 else reversed(SIDES):
            with tempfile.TemporaryDirectory() as folder:
                started = time.perf_counter()
                done = subprocess.run([sys.executable, "-c", SIDES[side], *args], cwd=folder, capture_output=True)
                times[side].append(time.perf_counter() - started)
            if done.returncode:
                sys.exit(f"{side} failed ({done.returncode}): {done.stderr.decode()[-500:]}")
    for side, seconds in times.items():
        print(f"{side:10s} median {statistics.median(seconds):6.2f} s   runs {', '.join(f'{s:.2f}' for s in seconds)}")
    ratio = statistics.median(times["shipped"]) / statistics.median(times["collected"])
    print(f"shipped / collected: {ratio:.2f}")


if __name__ == "__main__":
    main()
