"""A sweep's answer: the table of trials, best.yaml (the best trial's complete fit config) and figures."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

from mnist_lit.checkpoints import write_atomically
from mnist_lit.errors import printable
from mnist_lit.sweep.space import Space, short, show
from mnist_lit.sweep.study import trial_folder


def rows(study: Any, space: Space) -> list[list[str]]:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    # retry_history ends with the trial each one was enqueued for ("failed_trial" is the first of the line)
    retried_as = {t.system_attrs["retry_history"][-1]: t.number for t in trials if t.system_attrs.get("retry_history")}
    table = []
    for t in trials:
        attrs = t.user_attrs
        if attrs.get("surplus"):
            continue  # one asked for at the same moment as the last: never run
        state = t.state.name.lower()
        if t.state == TrialState.FAIL:
            state = f"failed: {attrs['error']}" if "error" in attrs else "stopped"
            if "error" not in attrs and t.number in retried_as:
                state += f", resumed as {retried_as[t.number]}"
        if t.state == TrialState.PRUNED and t.intermediate_values:
            state = f"pruned at epoch {max(t.intermediate_values)}"
        value = t.value
        params = [show(space.value(k, t.params[k])) if k in t.params else "" for k in space.distributions]
        seconds = attrs.get("seconds")
        table.append([
            str(t.number), str(trial_folder(Path(), t)), *params,
            "" if value is None else f"{value:.4f}", str(attrs.get("steps") or ""),
            "" if seconds is None else f"{seconds:.1f}", state,
        ])  # fmt: skip
    return table


def report(study: Any, root: Path, metric: str, space: Space) -> None:
    """The table on stdout; best.yaml and the figures in root."""
    from optuna.trial import TrialState

    header = ["trial", "folder", *(short(k) for k in space.distributions), metric, "steps", "wall s", "state"]
    table = [header, *rows(study, space)]
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    for row in table:  # its cells are the study's records, escaped: a study may come from elsewhere
        print(
            printable("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1])
        )
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        sys.exit(f"error: no trial of the sweep in {root} has completed, so there is no best.yaml yet")
    best = study.best_trial
    folder = trial_folder(root, best)
    config = (folder / "config.yaml").read_text()
    header_line = (
        f"# trial {best.number} of the sweep in {root}, in {folder.relative_to(root)}: {metric} {best.value:.4f}"
    )
    # CPU kernels sum in an order that depends on the thread count: with the trial's, a fit repeats it bit for bit
    threads = f"OMP_NUM_THREADS={best.user_attrs['threads']} " if "threads" in best.user_attrs else ""
    run = f"# {threads}python -m mnist_lit fit --config best.yaml --trainer.default_root_dir NEW_FOLDER"
    write_atomically(str(root / "best.yaml"), f"{header_line}\n{run}\n{config}".encode())
    figures = figures_of(study, root)
    print(f"\nbest: trial {best.number}, {metric} {best.value:.4f} ({len(complete)} completed):"
          f" {root / 'best.yaml'}; figures: {', '.join(figures) or 'none'}")  # fmt: skip


# Trials a ranking of the parameters' importance is drawn from: fANOVA on fewer ranks noise.
RANKED_FROM = 8


def figures_of(study: Any, root: Path) -> list[str]:
    """Optuna's matplotlib plots, as PNG files in root; those the trials so far cannot draw are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import io

    import matplotlib.pyplot as plt
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as plots

    completed = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    written = []
    for name, plot in (("history.png", plots.plot_optimization_history), ("importances.png",
                       plots.plot_param_importances), ("slices.png", plots.plot_slice)):  # fmt: skip
        if name == "importances.png" and completed < RANKED_FROM:
            written.append(f"no importances.png yet ({completed} trials completed; drawn from {RANKED_FROM})")
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna calls its matplotlib plots experimental
                axes = plot(study)
                figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
            if hasattr(axes, "flat"):  # one panel per parameter: room for each one's name
                figure.set_size_inches(5 * len(axes.flat), 4.8)
                for panel in axes.flat:
                    _readable(panel)
            buffer = io.BytesIO()
            figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
            plt.close(figure)
            write_atomically(str(root / name), buffer.getvalue())
            written.append(name)
        except (ValueError, RuntimeError, ZeroDivisionError):  # too few completed trials, or all the same
            continue
    return written


def _readable(panel: Any) -> None:
    """A slice's panel with ticks that do not run into each other: its parameter's short name, and a log axis
    narrower than a decade labelled at 1, 2 and 5 times its powers of ten in plain numbers (matplotlib labels
    every minor tick there, as 2x10^-2, 3x10^-2, ..., one over the next)."""
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    panel.set_xlabel(short(panel.get_xlabel()))
    if panel.get_xscale() == "log":
        panel.xaxis.set_major_locator(LogLocator(base=10, subs=(1, 2, 5)))
        panel.xaxis.set_major_formatter(FormatStrFormatter("%g"))
        panel.xaxis.set_minor_formatter(NullFormatter())
