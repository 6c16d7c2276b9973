"""The figures a run leaves: training curves, the confusion matrix, the misclassified images (matplotlib, drawn off
screen). Drawing only: when they are drawn and where they go is report.py's."""

from __future__ import annotations

import io
from typing import Any

from torch import Tensor

from mnist_lit.datasets import Known


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend: figures for files, never a window."""
    import matplotlib  # only when a figure is drawn: slow to import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curves_figure(plt: Any, train: list[tuple[int, float]], val: list[tuple[int, float, float]]) -> Any:
    """Loss (train and validation) and validation accuracy against steps done: TrainingCurves' points."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4), layout="tight")
    steps, losses = zip(*train, strict=True)
    ax_loss.plot(steps, losses, label="train (mean between points)", lw=1)
    if val:
        val_steps, val_losses, val_accs = zip(*val, strict=True)
        ax_loss.plot(val_steps, val_losses, "o-", label="validation")
        ax_acc.plot(val_steps, [100 * a for a in val_accs], "o-", color="C2", clip_on=False)  # a point at 100% whole
        bottom, top = ax_acc.get_ylim()
        ax_acc.set_ylim(max(bottom, 0), min(top, 100))  # autoscale's margin would run past 100%
        ax_acc.set(xlabel="steps done", ylabel="accuracy (%)")
        ax_acc.grid(alpha=0.3)
    else:
        ax_acc.axis("off")
        ax_acc.text(0.5, 0.5, "no validation set\n(--data.val_size 0)", ha="center", va="center")
    ax_acc.set_title("Validation accuracy")
    ax_loss.set(xlabel="steps done", ylabel="NLL loss", yscale="log", title="Loss")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    return fig


def confusion_figure(plt: Any, confusion: Tensor, classes: tuple[str, ...]) -> Any:
    """The test confusion matrix, each row shaded by its share of the true class, counts written in."""
    named = any(not name.isdigit() for name in classes)
    fig, ax = plt.subplots(figsize=(8, 7) if named else (6.5, 5.5), layout="tight")
    shown = confusion.float() / confusion.sum(1, keepdim=True).clamp(min=1)
    ax.imshow(shown.sqrt().numpy(), cmap="Blues")  # sqrt: the few mistakes stay visible beside the large diagonal
    for true in range(10):
        for pred in range(10):
            count = int(confusion[true, pred])
            if count:
                color = "white" if true == pred else "black"
                ax.text(pred, true, str(count), ha="center", va="center", fontsize=8, color=color)
    accuracy = confusion.trace() / confusion.sum().clamp(min=1)
    ax.set(xticks=range(10), yticks=range(10), xlabel="predicted", ylabel="true")
    ax.set_xticklabels(classes, rotation=45 if named else 0, ha="right" if named else "center")
    ax.set_yticklabels(classes)
    ax.set_title(f"Test confusion matrix (accuracy {100 * accuracy:.2f}%)")
    return fig


def mistakes_figure(plt: Any, mistakes: list[tuple[Tensor, int, int]], total: int, known: Known) -> Any:
    """The misclassified images (normalised, as the model saw them), ten a row, each titled true → predicted."""
    columns, width, height, band = 10, 1.1, 1.3, 0.6  # inches: a tile's width and height, the figure title's band
    rows = max(1, -(-len(mistakes) // columns))
    tall = rows * height + band
    fig = plt.figure(figsize=(columns * width, tall))
    # One axes, each image drawn at its place in it: a subplot for each image, laid out by constrained layout, took
    # 3.3 s to draw 100 of them (half of a 6.5 s `test`), against 0.3 s here.
    ax = fig.add_axes((0, 0, 1, rows * height / tall))
    side = max((max(image.shape) for image, _, _ in mistakes), default=28)  # 28 pixels: 0.9 inch, as before
    cell_x, cell_y = width * side / 0.9, height * side / 0.9  # a tile, in image pixels
    for k, (image, true, pred) in enumerate(mistakes):
        row, column = divmod(k, columns)
        x, y = column * cell_x + (cell_x - image.shape[1]) / 2, (row + 0.9) * cell_y - image.shape[0]  # room above
        ax.imshow((image * known.std + known.mean).numpy(), cmap="gray_r", vmin=0, vmax=1,
                  extent=(x, x + image.shape[1], y + image.shape[0], y))  # fmt: skip
        title = f"{known.classes[true]} → {known.classes[pred]}"
        title = title.replace(" → ", " →\n") if len(title) > 10 else title
        ax.text(x + image.shape[1] / 2, y - 0.05 * side, title, fontsize=8, color="C3", ha="center", va="bottom")
    ax.set(xlim=(0, columns * cell_x), ylim=(rows * cell_y, 0))
    ax.axis("off")
    shown = f"the first {len(mistakes)} of {total}" if total > len(mistakes) else f"all {total}"
    fig.suptitle(f"Misclassified test images, true → predicted ({shown})", y=1 - 0.15 / tall, va="top")
    return fig


def image_bytes(fig: Any, format: str) -> bytes:
    """The figure as an image file's bytes, laid out as it was built to be; the figure is cleared."""
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=100, format=format)
    fig.clf()
    return buffer.getvalue()
