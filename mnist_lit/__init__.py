"""The guide's MNIST recipe as a PyTorch Lightning project."""

__version__ = "0.1.0"

# Every subcommand and its line of help: the one list. The top-level help below, the dispatch in mnist_lit.__main__
# and the "did you mean" of a misspelt subcommand (cli/messages.py) read it. Here, so that `python -m mnist_lit --help`
# answers without importing torch.
COMMANDS = {
    "fit": "Train. A checkpoint every 10 steps; resume a stopped run with --ckpt_path last.",
    "validate": "Evaluate on the validation hold-out.",
    "test": "Evaluate on the 10k test set; --ckpt_path last tests the last fit's weights.",
    "predict": "Classify your own digit images: --ckpt_path last --data.predict_path PATH.",
    "export": "Write the trained Net as .pth (the guide's state_dict) or .onnx.",
    "serve": "Serve it over HTTP: a page to draw digits on, POST /predict (--ckpt_path last).",
    "sweep": "Search fit options with Optuna, each trial a fit of its own: --config configs/sweep.yaml.",
}
LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")  # LightningCLI's; the others are mnist_lit's own

USAGE = f"""\
usage: python -m mnist_lit {{{",".join(COMMANDS)}}} [options]

Train and use the guide's MNIST model (Grokking PyTorch) with PyTorch Lightning.

subcommands (each has its own --help, e.g. python -m mnist_lit fit --help):
{chr(10).join(f"  {name:<10} {line}" for name, line in COMMANDS.items())}

Options come from config files and flags: --config configs/smoke.yaml --model.optimizer.lr 0.05 --print_config."""
