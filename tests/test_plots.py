"""Plots, per-class CSVs and report.md of a run, from synthetic results.json dicts in
the real format (no training): 1, 2 and 6-stage runs, and several runs on one chart."""
import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO_ROOT
from ilmil.data import parse_stage_spec
from ilmil.evaluation import add_forgetting, finalize_run, format_report, summarize_old_new
from ilmil.evaluation.run_outputs import write_json
from ilmil.visualization import forgetting_plots, plot_forgetting_curve, plot_runs

# AP kept from one stage to the next: finetune forgets most, ilmil little.
KEEP = {"finetune": 0.3, "ilmil": 0.85, "faster-ilod": 0.7}


def synthetic_results(spec="10+2x5", method="finetune", num_classes=20, seed=0, voc=False):
    """A results.json dict as the stage runner writes it: per-class AP50 drawn when a class
    is learned, then multiplied by the method's retention at every later stage."""
    rng = np.random.default_rng(seed)
    classes = [f"class_{i:02d}" for i in range(num_classes)]
    counts = [sum(parse_stage_spec(spec))] if method == "joint" else parse_stage_spec(spec)
    learned_ap50 = {c: float(rng.uniform(40, 90)) for c in classes}
    stages, start = [], 0
    for k, count in enumerate(counts):
        old, new = classes[:start], classes[start:start + count]
        per_class = {}
        for c in old + new:
            ap50 = learned_ap50[c] * KEEP.get(method, 1.0) ** (k - _stage_of(c, classes, counts))
            per_class[c] = {"AP": 0.55 * ap50, "AP50": ap50}
            if voc:
                per_class[c].update(VOC07_AP50=ap50 - 1.0, VOC_AREA_AP50=ap50 + 0.5)
        if "class_03" in per_class:
            per_class["class_03"] = {m: math.nan for m in per_class["class_03"]}  # no test objects
        info = {"index": k, "old_classes": old, "new_classes": new, "num_train_images": 100 + k,
                "num_test_images": 50}
        stages.append({"stage": k, **info, **summarize_old_new(per_class, old, new), "num_detections": 500,
                       "num_images": 50, "eval_time_s": 3.0, "train_time_s": 60.0 + k})
        start += count
    return {"dataset": "voc_2007" if voc else "shapes", "stages_spec": spec, "method": method, "seed": seed,
            "config": {}, "stages": stages}


def _stage_of(name, classes, counts):
    index, start = classes.index(name), 0
    for k, count in enumerate(counts):
        if index < start + count:
            return k
        start += count
    raise ValueError(name)


def _write_run(tmp_path, results, name="run"):
    out = tmp_path / name
    out.mkdir()
    write_json(str(out / "results.json"), results)  # as the runner writes it: NaN as null
    return out


def _assert_png(path, min_size=(400, 250)):
    assert os.path.getsize(path) > 5000, path
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size[0] >= min_size[0] and image.size[1] >= min_size[1], image.size
        # Not blank: a drawn figure has many distinct colours.
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20) or ()) > 20


@pytest.mark.parametrize("spec,method", [("20", "joint"), ("10+10", "finetune"), ("10+2x5", "ilmil")])
def test_finalize_writes_csv_plots_and_report_for_1_2_and_6_stages(tmp_path, spec, method):
    results = synthetic_results(spec, method)
    out = _write_run(tmp_path, results)
    extended = finalize_run(str(out))
    for name in ("forgetting_curve.png", "per_class_heatmap.png", "per_class_first_vs_final.png"):
        _assert_png(out / name)
    with open(out / "results.json") as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(extended))
    assert [s["stage"] for s in saved["stages"]] == list(range(len(results["stages"])))
    assert saved["summary"]["num_stages"] == len(results["stages"])
    report = (out / "report.md").read_text()
    for entry in results["stages"]:
        assert f"| {entry['stage']} " in report.split("## AP after each stage")[1].split("## Forgetting")[0]
    for name in ("forgetting_curve.png", "per_class_heatmap.png", "per_class_first_vs_final.png"):
        assert f"]({name})" in report


def test_per_class_csv_reads_back_in_class_order_with_blanks_before_learning(tmp_path):
    results = synthetic_results("10+2x5", "finetune")
    out = _write_run(tmp_path, results)
    finalize_run(str(out))
    with open(out / "per_class_ap.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["class"] + [f"stage_{k}" for k in range(6)]
    assert [r[0] for r in rows[1:]] == [f"class_{i:02d}" for i in range(20)]
    by_class = {r[0]: r[1:] for r in rows[1:]}
    assert by_class["class_19"][:5] == [""] * 5
    stages = results["stages"]
    assert float(by_class["class_19"][5]) == pytest.approx(stages[5]["per_class"]["class_19"]["AP50"], abs=1e-4)
    assert by_class["class_03"] == [""] * 6  # no test objects
    assert float(by_class["class_00"][2]) == pytest.approx(stages[2]["per_class"]["class_00"]["AP50"], abs=1e-4)
    with open(out / "per_class_ap_50_95.csv", newline="") as f:
        coco = {r[0]: r[1:] for r in list(csv.reader(f))[1:]}
    assert float(coco["class_00"][0]) == pytest.approx(results["stages"][0]["per_class"]["class_00"]["AP"], abs=1e-4)


def test_voc_runs_get_voc_csvs_and_report_columns(tmp_path):
    results = synthetic_results("15+5", "ilmil", voc=True)
    out = _write_run(tmp_path, results)
    finalize_run(str(out))
    # Each file holds its own metric (the synthetic VOC07 AP50 is AP50 - 1, the area one AP50 + 0.5).
    for name, metric in (("per_class_voc07_ap50.csv", "VOC07_AP50"), ("per_class_voc_area_ap50.csv", "VOC_AREA_AP50")):
        with open(out / name, newline="") as f:
            by_class = {r[0]: r[1:] for r in list(csv.reader(f))[1:]}
        expected = results["stages"][1]["per_class"]["class_00"][metric]
        assert float(by_class["class_00"][1]) == pytest.approx(expected, abs=1e-4), name
    report = (out / "report.md").read_text()
    assert "VOC07_AP50_old" in report and "forgetting VOC_AREA_AP50" in report


def test_report_lists_schedule_times_and_summary():
    results = add_forgetting(synthetic_results("10+2x5", "finetune"))
    report = format_report(results, "/run", ["/run/forgetting_curve.png"], ["/run/per_class_ap.csv"])
    schedule = report.split("## Schedule")[1].split("##")[0]
    assert all(f"| {k} " in schedule for k in range(6))
    assert "class_10, class_11" in schedule
    times = report.split("## Time per stage")[1].split("##")[0]
    assert "| total " in times and "| 65.0 " in times and "| 375 " in times
    # An evaluation's results (no training times): the total is "-" as every stage's is.
    for entry in results["stages"]:
        del entry["train_time_s"]
    times = format_report(results, "/run").split("## Time per stage")[1].split("##")[0]
    assert [line.split("|")[2].strip() for line in times.strip().splitlines()[2:]] == ["-"] * 7
    assert "average incremental" in report
    assert "![forgetting curve](forgetting_curve.png)" in report and "`per_class_ap.csv`" in report


def test_several_runs_share_one_forgetting_chart(tmp_path):
    runs = [synthetic_results("10+2x5", m, seed=1) for m in ("finetune", "ilmil")]
    runs.append(synthetic_results("10+2x5", "joint", seed=1))
    paths = plot_runs(runs, str(tmp_path), ["ft", "il", "joint"])
    names = sorted(os.path.basename(p) for p in paths)
    assert names == sorted(["forgetting_curve.png"] + [f"{kind}_{m}.png" for kind in
                           ("per_class_heatmap", "per_class_first_vs_final") for m in ("finetune", "ilmil", "joint")])
    for path in paths:
        _assert_png(path)


def test_the_old_classes_curve_starts_at_the_teachers_ap_only_where_the_run_starts_at_stage_0(tmp_path,
                                                                                           monkeypatch):
    figures = []

    class Recorded(forgetting_plots.Figure):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            figures.append(self)

    monkeypatch.setattr(forgetting_plots, "Figure", Recorded)
    full = synthetic_results("10+2x5", "ilmil")
    # From stage 0: its first point is stage 0's AP50 over all (then all old) classes.
    # From stage 2 (a --start-stage 2 run, or its --stages 2,3 re-evaluation): stage 2's AP50_old.
    for results, first in ((full, full["stages"][0]["AP50"]), (dict(full, stages=full["stages"][2:]),
                                                              full["stages"][2]["AP50_old"])):
        plot_forgetting_curve([results], str(tmp_path / "curve.png"))
        (old_curve,) = figures[-1].axes[1].get_lines()
        assert old_curve.get_ydata()[0] == pytest.approx(first)
        assert list(old_curve.get_ydata()[1:]) == pytest.approx([e["AP50_old"] for e in results["stages"][1:]])


def test_runs_of_one_method_in_folders_of_one_name_keep_a_plot_each(tmp_path):
    # exp1/ilmil and exp2/ilmil: the same method and folder name.
    runs = [synthetic_results("10+2x5", "ilmil", seed=seed) for seed in (1, 2)]
    paths = plot_runs(runs, str(tmp_path), ["ilmil", "ilmil"])
    heatmaps = sorted(os.path.basename(p) for p in paths if "heatmap" in p)
    assert heatmaps == ["per_class_heatmap_ilmil_ilmil_1.png", "per_class_heatmap_ilmil_ilmil_2.png"]
    assert len(set(paths)) == len(paths) == 5


def test_eighty_class_figures_grow_with_the_class_count(tmp_path):
    small = plot_runs([synthetic_results("10+10", "finetune")], str(tmp_path / "small"))
    large = plot_runs([synthetic_results("40+40", "finetune", num_classes=80)], str(tmp_path / "large"))
    for s, l in zip(small[1:], large[1:]):
        with Image.open(s) as a, Image.open(l) as b:
            assert b.size[1] > 3 * a.size[1] / 2, (s, a.size, b.size)


def test_plot_forgetting_tool_compares_run_folders(tmp_path):
    a = _write_run(tmp_path, synthetic_results("10+10", "finetune"), "finetune_run")
    b = _write_run(tmp_path, synthetic_results("10+10", "finetune", seed=3), "finetune_seed3")
    proc = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "tools", "plot_forgetting.py"), str(a),
                           str(b / "results.json"), "--out", str(tmp_path / "plots")],
                          capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "plots" / "forgetting_curve.png").is_file()
    # two finetune runs: told apart by folder name
    assert (tmp_path / "plots" / "per_class_heatmap_finetune_finetune_seed3.png").is_file()
