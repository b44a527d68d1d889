"""Plots of class-incremental runs (forgetting curves, per-class AP heat maps and bar charts)."""
from .forgetting_plots import (method_label, plot_first_vs_final, plot_forgetting_curve, plot_per_class_heatmap,
                               plot_runs, run_labels)

__all__ = ["method_label", "plot_first_vs_final", "plot_forgetting_curve", "plot_per_class_heatmap", "plot_runs",
           "run_labels"]
