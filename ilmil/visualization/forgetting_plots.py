"""PNG plots of class-incremental runs, read from their results.json dicts.

- ``forgetting_curve.png``: AP50 over all seen / old / new classes after each
  stage, one line per run, labelled by method; the old classes' line starts at
  the first stage's AP50 (there they are all the classes: the teacher's level). A single-stage run (joint
  training) is a dashed horizontal reference: on each panel, the mean of its
  per-class AP50 over the classes that panel covers at the last stage of the
  longest run (all, old, new).
- ``per_class_heatmap.png``: per-class AP50, classes x stages; grey before a
  class is learned, values written in the cells when there are few classes.
- ``per_class_first_vs_final.png``: per-class AP50 at the stage that learned the
  class next to AP50 after the last stage: the gap is the class's forgetting.

Figure heights grow with the class count so that 80 class names stay readable.
Figures are drawn with matplotlib's object API (``Figure`` rendered by Agg):
no GUI backend and no pyplot global state, so plotting works in any process.
"""
import math
import os
import re

import numpy as np
import yaml
from matplotlib import colormaps
from matplotlib.figure import Figure

from ..config import ConfigError, method_preset
from ..file_io import atomic_write

__all__ = ["plot_first_vs_final", "plot_forgetting_curve", "plot_per_class_heatmap", "plot_runs", "run_labels"]

DPI = 110
# Height per class row (inches): fits a 8 pt class name with some spacing.
ROW_HEIGHT = 0.22
# Above this many classes x stages, the heat map's cells are too small for their values.
MAX_ANNOTATED_CELLS = 200
NOT_LEARNED_COLOUR = "#d9d9d9"
# Up to this many classes the bar chart writes each bar's value.
MAX_LABELLED_BARS = 30
# Runs after the first get other, hollow markers: where runs coincide (methods
# sharing stage 0), the earlier run's marker still shows inside the later one's.
MARKERS = "osD^v<>ph*"


def _value(x):
    return math.nan if x is None else float(x)


def _title(results, label=None):
    return f"{label or results['method']} on {results['dataset']} {results['stages_spec']}"


def _switches(ilmil):
    """What an ``ILMIL`` config mapping switches on: its distillation terms (lower-case), its
    pseudo-labels and its unbiased classification."""
    on = [name.lower() for name, section in (ilmil.get("DISTILL") or {}).items()
          if isinstance(section, dict) and section.get("ENABLED")]
    for name, key in (("pseudo-labels", "PSEUDO_LABELS"), ("unbiased-cls", "UNBIASED_CLS")):
        if (ilmil.get(key) or {}).get("ENABLED"):
            on.append(name)
    return on


def method_label(results):
    """A run's method, with what its config switched on or off against the method's preset
    (``finetune +feat``, ``ilmil -rpn``, ``finetune +pseudo-labels``); for a compression run (its
    results hold its teacher's) the terms it was distilled with, e.g. ``KD: feat+rcn``, or ``no KD``."""
    config = results.get("config") or {}
    on = _switches(config.get("ILMIL") or {})
    if "teacher" in results:
        terms = [name for name in on if name not in ("pseudo-labels", "unbiased-cls")]
        return f"KD: {'+'.join(terms)}" if terms else "no KD"
    architecture = (config.get("MODEL") or {}).get("META_ARCHITECTURE")
    if not architecture:  # results written without their config: the method's name alone
        return results["method"]
    try:
        with open(method_preset(results["method"], architecture)) as f:
            preset = _switches(((yaml.safe_load(f) or {}).get("ILMIL") or {}))
    except (ConfigError, OSError):  # a method of another version: its name alone
        return results["method"]
    changes = [f"+{name}" for name in on if name not in preset] + [f"-{name}" for name in preset if name not in on]
    return " ".join([results["method"], *changes])


def run_labels(runs, names=None):
    """Legend labels: each run's method, with its name (e.g. its folder) where two share a
    method, and numbered where they share that too (exp1/ilmil, exp2/ilmil): each run's
    plots are files of its own label."""
    methods = [method_label(results) for results in runs]
    names = names or [str(i) for i in range(len(runs))]
    labels = [m if methods.count(m) == 1 else f"{m} ({n})" for m, n in zip(methods, names)]
    return [label if labels.count(label) == 1 else f"{label} #{labels[:i].count(label) + 1}"
            for i, label in enumerate(labels)]


def _mean_over(per_class, classes, metric):
    values = [_value(per_class[c].get(metric)) for c in classes if c in per_class]
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def plot_forgetting_curve(runs, path, labels=None, metric="AP50"):
    """``metric`` over all / old / new classes against the stage, one line per run."""
    labels = labels or run_labels(runs)
    curves = [r for r in runs if len(r["stages"]) > 1]
    longest = max(curves, key=lambda r: len(r["stages"]), default=None)
    panels = [("", "all seen classes"), ("_old", "old classes (learned in earlier stages)"),
              ("_new", "new classes (learned in this stage)")]
    fig = Figure(figsize=(15, 4.8), layout="constrained")
    axes = fig.subplots(1, 3, sharey=True)
    for ax, (suffix, panel_title) in zip(axes, panels):
        for i, (results, label) in enumerate(zip(runs, labels)):
            stages = [e["stage"] for e in results["stages"]]
            values = [_value(e.get(metric + suffix)) for e in results["stages"]]
            if suffix == "_old" and len(stages) > 1 and not results["stages"][0]["old_classes"]:
                # The old classes' curve starts at the first stage, where (in a run from stage 0)
                # they are all the classes: its AP is the teacher's, from which forgetting is seen.
                values[0] = _value(results["stages"][0].get(metric))
            if len(stages) > 1:
                # clip_on=False: markers at AP 0 show whole, not cut by the axis
                ax.plot(stages, values, marker=MARKERS[i % len(MARKERS)], markersize=8, clip_on=False,
                        fillstyle="full" if i == 0 else "none", markeredgewidth=1.5, color=f"C{i}", label=label)
                continue
            # One stage (joint training): a reference level over the incremental stages.
            reference = values[0]
            if longest is not None:
                final = longest["stages"][-1]
                classes = {"": final["old_classes"] + final["new_classes"], "_old": final["old_classes"],
                           "_new": final["new_classes"]}[suffix]
                reference = _mean_over(results["stages"][0]["per_class"], classes, metric)
            if not math.isnan(reference):
                ax.axhline(reference, color=f"C{i}", linestyle="--", linewidth=1.8, label=f"{label} (one stage)")
                if longest is None:  # no incremental run to compare with: mark the run's own stage
                    ax.plot(stages, [reference], marker="s", color=f"C{i}")
        if not ax.get_lines():
            ax.text(0.5, 0.5, "no such classes in these runs", transform=ax.transAxes, ha="center", color="#555555")
        ax.set_title(panel_title, fontsize=11)
        ax.set_xlabel("stage")
        ax.grid(alpha=0.3)
    # One scale for the three panels, from 0 to just above the highest value.
    plotted = [y for ax in axes for line in ax.get_lines() for y in line.get_ydata() if not math.isnan(y)]
    axes[0].set_ylim(0, max(10.0, min(100.0, 1.1 * max(plotted, default=0.0)) + 2))
    all_stages = sorted({e["stage"] for r in runs for e in r["stages"]})
    for ax in axes:
        ax.set_xticks(all_stages)
        if longest is not None and all(r["stages_spec"] == longest["stages_spec"] for r in curves):
            seen = {e["stage"]: len(e["old_classes"]) + len(e["new_classes"]) for e in longest["stages"]}
            ax.set_xticklabels([f"{k}\n{seen[k]} classes" if k in seen else str(k) for k in all_stages])
        ax.set_xlim(all_stages[0] - 0.3, all_stages[-1] + 0.3)
    axes[0].set_ylabel(f"{metric} (%)")
    axes[0].legend(fontsize=9, loc="lower left")
    specs = " / ".join(dict.fromkeys(f"{r['dataset']} {r['stages_spec']}" for r in runs))
    fig.suptitle(f"{metric} after each stage: {specs}", fontsize=13)
    _save(fig, path)
    return path


def _per_class_matrix(results, metric):
    """(classes, values[class, stage column], learned_at[class] = first column that has the class).

    Classes are in the order the stages learned them; values are NaN where a class
    is not learned yet or has no test objects. A run started at a later stage has
    classes learned before its first column (learned_at 0, and not a new class there).
    """
    learned_at = {}
    for j, entry in enumerate(results["stages"]):
        for name in entry["old_classes"] + entry["new_classes"]:
            learned_at.setdefault(name, j)
    classes = list(learned_at)
    values = np.full((len(classes), len(results["stages"])), math.nan)
    for j, entry in enumerate(results["stages"]):
        for name, scores in entry["per_class"].items():
            values[classes.index(name), j] = _value(scores.get(metric))
    return classes, values, learned_at


def _learned_label(results, name, column):
    entry = results["stages"][column]
    return f"stage {entry['stage']}" if name in entry["new_classes"] else f"before stage {entry['stage']}"


def _figure_height(num_classes):
    return max(3.5, 1.6 + ROW_HEIGHT * num_classes)


def plot_per_class_heatmap(results, path, label=None, metric="AP50"):
    """Per-class ``metric`` after every stage (classes x stages)."""
    classes, values, learned_at = _per_class_matrix(results, metric)
    stages = results["stages"]
    fig = Figure(figsize=(max(6.0, 3.0 + 1.1 * len(stages)), _figure_height(len(classes))), layout="constrained")
    ax = fig.subplots()
    cmap = colormaps["viridis"].with_extremes(bad=NOT_LEARNED_COLOUR)
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0, vmax=100, aspect="auto",
                      interpolation="nearest")
    ax.set_xticks(range(len(stages)))
    ax.set_xticklabels([f"stage {e['stage']}\n+{len(e['new_classes'])} classes" for e in stages], fontsize=9)
    ax.set_yticks(range(len(classes)))
    ax.set_yticklabels(classes, fontsize=8)
    ax.set_xlabel("stage")
    ax.set_ylabel("class")
    # White rules between the class groups of successive stages.
    for i in range(1, len(classes)):
        if learned_at[classes[i]] != learned_at[classes[i - 1]]:
            ax.axhline(i - 0.5, color="white", linewidth=2)
    if values.size <= MAX_ANNOTATED_CELLS:
        for (i, j), v in np.ndenumerate(values):
            if j < learned_at[classes[i]]:
                continue
            if math.isnan(v):
                ax.text(j, i, "n/a", ha="center", va="center", fontsize=8, color="#555555")
            else:
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=8, color="black" if v > 60 else "white")
    fig.colorbar(image, ax=ax, label=f"{metric} (%)", shrink=min(1.0, 8 / max(len(classes), 1) + 0.3))
    ax.set_title(f"Per-class {metric} after each stage\n{_title(results, label)}", fontsize=11)
    _save(fig, path)
    return path


def plot_first_vs_final(results, path, label=None, metric="AP50"):
    """Per-class ``metric`` when the class was learned next to after the last stage."""
    classes, values, learned_at = _per_class_matrix(results, metric)
    first = np.array([values[i, learned_at[c]] for i, c in enumerate(classes)])
    final = values[:, -1]
    final_stage = results["stages"][-1]["stage"]
    positions = np.arange(len(classes))
    fig = Figure(figsize=(9, _figure_height(len(classes))), layout="constrained")
    ax = fig.subplots()
    height = 0.4
    ax.barh(positions - height / 2, np.nan_to_num(first), height, color="#9ecae1",
            label="at the stage that learned the class")
    ax.barh(positions + height / 2, np.nan_to_num(final), height, color="#d94801",
            label=f"after the last stage (stage {final_stage})")
    ax.set_yticks(positions)
    ax.set_yticklabels([f"{c} ({_learned_label(results, c, learned_at[c])})" for c in classes], fontsize=8)
    ax.set_ylim(len(classes) - 0.5, -0.5)  # the first class on top, as in the heat map
    # Zoomed to the data (a weak model's bars would be slivers on 0-100), never past 100.
    x_max = min(100.0, max(10.0, 1.1 * np.nanmax(np.concatenate([first, final, [0.0]]))))
    ax.set_xlim(0, x_max)
    for i in np.flatnonzero(np.isnan(first) & np.isnan(final)):
        ax.text(0.01 * x_max, i, "n/a (no test objects)", va="center", fontsize=8, color="#555555")
    if len(classes) <= MAX_LABELLED_BARS:  # values at the bar ends (a 0 bar is otherwise invisible)
        for offset, values_of_bars in ((-height / 2, first), (height / 2, final)):
            for i, v in enumerate(values_of_bars):
                if not math.isnan(v):
                    ax.text(v + 0.01 * x_max, i + offset, f"{v:.1f}", va="center", fontsize=7)
    ax.set_xlabel(f"{metric} (%)")
    ax.set_ylabel("class (stage that learned it)")
    ax.grid(axis="x", alpha=0.3)
    fig.legend(loc="outside lower center", ncol=2, fontsize=9)
    fig.suptitle(f"Per-class {metric}: when learned vs after the last stage\n{_title(results, label)}", fontsize=11)
    _save(fig, path)
    return path


def _save(fig, path):
    """The figure as a PNG at ``path``, written atomically."""
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=DPI))


def _file_label(label):
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_")


def plot_runs(runs, out_dir, names=None):
    """All plots of ``runs`` into ``out_dir``; returns their paths.

    The forgetting curve compares all runs on one chart; each run gets its own
    heat map and bar chart, suffixed with its label when there are several runs.
    """
    os.makedirs(out_dir, exist_ok=True)
    labels = run_labels(runs, names)
    paths = [plot_forgetting_curve(runs, os.path.join(out_dir, "forgetting_curve.png"), labels)]
    for results, label in zip(runs, labels):
        suffix = "" if len(runs) == 1 else "_" + _file_label(label)
        per_run = (("per_class_heatmap", plot_per_class_heatmap), ("per_class_first_vs_final", plot_first_vs_final))
        for name, plot in per_run:
            paths.append(plot(results, os.path.join(out_dir, f"{name}{suffix}.png"), label))
    return paths
