"""`python -m mnist_lit` and the `mnist-lit` command."""

from __future__ import annotations

import os
import sys

USAGE = """\
usage: python -m mnist_lit {fit,validate,test,predict,export} [options]

Train and use the guide's MNIST model (Grokking PyTorch) with PyTorch Lightning.

subcommands (each has its own --help, e.g. python -m mnist_lit fit --help):
  fit        Train. A checkpoint every 10 steps; resume a stopped run with --ckpt_path last.
  validate   Evaluate on the validation hold-out.
  test       Evaluate on the 10k test set; --ckpt_path last tests the last fit's weights.
  predict    Classify your own digit images: --ckpt_path last --data.predict_path PATH.
  export     Write the trained Net as .pth (the guide's state_dict) or .onnx.

Options come from config files and flags: --config configs/smoke.yaml --model.optimizer.lr 0.05 --print_config."""


def main() -> None:
    try:
        _main()
        sys.stdout.flush()  # here, where a closed pipe can still be answered quietly, not at interpreter exit
    except BrokenPipeError:  # `mnist-lit --help | head -3`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        sys.exit(141)  # 128 + SIGPIPE, what the shell reports for a command a closed pipe ended


def _main() -> None:
    args = sys.argv[1:]
    # Listing the subcommands needs neither torch nor Lightning: answer at once instead of in seconds.
    if args in (["-h"], ["--help"]):
        print(USAGE)
        return
    if not args:
        sys.exit(f"{USAGE}\n\nerror: choose a subcommand")
    try:
        from mnist_lit.cli import main as run

        run()
    except KeyboardInterrupt:  # Ctrl-C before training started (imports, parsing, loading): nothing to save
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
