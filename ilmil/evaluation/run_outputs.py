"""The files of a finished run beyond its per-stage results: written from results.json.

``finalize_run(OUT)`` (called by the stage runner at the end of every run, and by
``tools/eval_incremental.py``) adds to ``OUT``::

    results.json                forgetting keys per stage and a run-level "summary" (forgetting.py)
    per_class_ap.csv            per-class AP50: rows = classes in class order, columns = stages,
                                empty before a class is learned (or when it has no test objects)
    per_class_ap_50_95.csv      the same for COCO AP@[.5:.95]
    per_class_voc07_ap50.csv, per_class_voc_area_ap50.csv   the same for VOC AP50 (VOC datasets)
    forgetting_curve.png, per_class_heatmap.png, per_class_first_vs_final.png   (ilmil.visualization)
    report.md                   schedule, AP tables, forgetting, time per stage, the plots

Each stage's detections are in ``OUT/stage_K/detections.json`` (see incremental_evaluator.py).
"""
import csv
import json
import math
import os

from ..file_io import atomic_write
from ..visualization import plot_runs
from .forgetting import add_forgetting, per_class_metrics
from .report import format_report

__all__ = ["PER_CLASS_CSV", "NotARunError", "finalize_run", "load_run_results", "read_results", "run_folder",
           "write_json", "write_per_class_csv", "write_run_outputs"]

# The per-class CSV of each metric; AP50 (the primary metric) gets the plain name.
PER_CLASS_CSV = {
    "AP50": "per_class_ap.csv",
    "AP": "per_class_ap_50_95.csv",
    "VOC07_AP50": "per_class_voc07_ap50.csv",
    "VOC_AREA_AP50": "per_class_voc_area_ap50.csv",
}


def _json_safe(value):
    """NaN (AP of a class without test objects) becomes null: strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json(path, data):
    """Write atomically (a crash never leaves a half-written results.json), NaN as null."""
    text = json.dumps(_json_safe(data), indent=2, allow_nan=False)
    atomic_write(path, lambda f: f.write(text), mode="w")


class NotARunError(ValueError):
    """A folder or file given as a run that does not hold a run's outputs."""


# What readers of a run's results.json rely on, at the top and in each stage.
RESULTS_FIELDS = {"method", "dataset", "stages_spec", "stages"}
STAGE_FIELDS = {"stage", "old_classes", "new_classes", "per_class"}


def read_results(run_dir):
    with open(os.path.join(run_dir, "results.json")) as f:
        return json.load(f)


def run_folder(run):
    """The run folder of ``run`` (a run folder or its results.json)."""
    run = os.path.abspath(run)
    return os.path.dirname(run) if os.path.isfile(run) else run


def load_run_results(run):
    """The results of ``run`` (a run folder or its results.json), refused with
    :class:`NotARunError` naming the file unless it holds a run's evaluated stages."""
    path = os.path.join(run, "results.json") if os.path.isdir(run) else run
    fix = "fix: give a run folder of tools/train_incremental.py or eval_incremental.py, or its results.json"
    if not os.path.isfile(path):
        raise NotARunError(f"{path} not found; {fix}")
    try:
        with open(path) as f:
            results = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NotARunError(f"{path} is not valid JSON ({e}); {fix}") from None
    if not isinstance(results, dict) or not RESULTS_FIELDS <= results.keys():
        raise NotARunError(
            f"{path} is not a run's results (it needs the fields {', '.join(sorted(RESULTS_FIELDS))}); {fix}")
    stages = results["stages"]
    if not stages or not isinstance(stages, list) or not all(
            isinstance(s, dict) and STAGE_FIELDS <= s.keys() for s in stages):
        raise NotARunError(f"{path}: field 'stages' is not a list of evaluated stages "
                           f"({', '.join(sorted(STAGE_FIELDS))}); {fix}")
    return results


def write_per_class_csv(results, path, metric="AP50"):
    """Per-class ``metric``: a row per class (class order), a column per stage."""
    classes = list(dict.fromkeys(c for e in results["stages"] for c in e["old_classes"] + e["new_classes"]))

    def write_rows(f):
        writer = csv.writer(f)
        writer.writerow(["class"] + [f"stage_{e['stage']}" for e in results["stages"]])
        for name in classes:
            cells = []
            for entry in results["stages"]:
                value = entry["per_class"].get(name, {}).get(metric)
                cells.append("" if value is None or math.isnan(value) else f"{value:.4f}")
            writer.writerow([name] + cells)

    atomic_write(path, write_rows, mode="w")
    return path


def write_run_outputs(results, output_dir):
    """Forgetting keys into ``results``, then results.json, the CSVs, the plots and report.md
    in ``output_dir``; returns the extended results."""
    results = add_forgetting(results)
    write_json(os.path.join(output_dir, "results.json"), results)
    metrics = per_class_metrics(results)
    data_files = [
        write_per_class_csv(results, os.path.join(output_dir, name), metric)
        for metric, name in PER_CLASS_CSV.items()
        if metric in metrics
    ]
    data_files += [
        path
        for path in (os.path.join(output_dir, f"stage_{e['stage']}", "detections.json") for e in results["stages"])
        if os.path.isfile(path)
    ]
    plots = plot_runs([results], output_dir) if results["stages"] else []
    report = format_report(results, output_dir, plots, data_files)
    atomic_write(os.path.join(output_dir, "report.md"), lambda f: f.write(report), mode="w")
    return results


def finalize_run(output_dir):
    """Complete the run folder ``output_dir`` from its results.json (see the module docstring)."""
    return write_run_outputs(read_results(output_dir), output_dir)
