"""The trial callback's old class path, mnist_lit.sweep_trial.Report, as the config files of sweeps started before
the sweep became a package name it: kept so that those trials resume. New trials name mnist_lit.sweep.trial.Report."""

from mnist_lit.sweep import Report

__all__ = ["Report"]
