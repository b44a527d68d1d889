"""``tools/eval_incremental.py`` on a real tiny 2-stage run (the conftest shapes set,
2 iterations per stage): its re-evaluation reproduces the run's results.json and
detections; and the files every training run now ends with (CSV, plots, report)."""
import collections
import csv
import importlib.util
import json
import os
import subprocess
import re
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import REPO_ROOT, TINY_SHAPES
from tool_runs import run_tool_here, tail
from ilmil.data import load_coco_json
from ilmil.engine import RunDirError
from ilmil.evaluation import NotARunError

TRAIN = os.path.join(REPO_ROOT, "tools", "train_incremental.py")
EVAL = os.path.join(REPO_ROOT, "tools", "eval_incremental.py")
OPTS = [
    "ILMIL.SHAPES.NUM_CLASSES", str(TINY_SHAPES["num_classes"]),
    "ILMIL.SHAPES.NUM_TRAIN", str(TINY_SHAPES["num_train"]),
    "ILMIL.SHAPES.NUM_TEST", str(TINY_SHAPES["num_test"]), "ILMIL.SHAPES.IMAGE_SIZE", str(TINY_SHAPES["image_size"]),
    "ILMIL.SHAPES.SEED", str(TINY_SHAPES["seed"]),
    "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "128", "INPUT.MIN_SIZE_TEST", "128",
    "INPUT.MAX_SIZE_TEST", "128", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "(1,)",
    "SOLVER.WARMUP_ITERS", "1", "DATALOADER.NUM_WORKERS", "0",
]


def _env(datasets_root):
    env = dict(os.environ, ILMIL_DATASETS=str(datasets_root), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p)
    return env


def _run(tool, args, datasets_root):
    proc = subprocess.run([sys.executable, tool, *args], cwd=REPO_ROOT, env=_env(datasets_root), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def _classes_with_test_objects(shapes_dir, count=4):
    """The classes with the most test objects (each also in the training split): every
    per-class AP of the run is then a number, whatever the generator version."""
    images = os.path.join(shapes_dir, "JPEGImages")
    test, names = load_coco_json(os.path.join(shapes_dir, "annotations", "instances_test.json"), images)
    train, _ = load_coco_json(os.path.join(shapes_dir, "annotations", "instances_train.json"), images)
    in_train = {a["category_name"] for r in train for a in r["annotations"]}
    counts = collections.Counter(
        a["category_name"] for r in test for a in r["annotations"] if a["category_name"] in in_train)
    return [name for name, _ in counts.most_common(count)]


@pytest.fixture(scope="module")
def tiny_run(tiny_datasets_root, tiny_shapes_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_tools") / "run"
    classes = _classes_with_test_objects(tiny_shapes_dir)
    # ", ": the names are read without the spaces around them.
    _run(TRAIN, ["--stages", "2+2", "--method", "finetune", "--class-order", ", ".join(classes),
                 "--output-dir", str(out), *OPTS], tiny_datasets_root)
    return SimpleNamespace(out=out, classes=classes, results=_read_json(out / "results.json"))


@pytest.fixture(scope="module")
def reevaluated(tiny_run, tiny_datasets_root):
    eval_dir = tiny_run.out.parent / "eval"
    proc = _run(EVAL, ["--run-dir", str(tiny_run.out), "--output-dir", str(eval_dir)], tiny_datasets_root)
    return SimpleNamespace(out=eval_dir, proc=proc, results=_read_json(eval_dir / "results.json"))


def test_training_run_ends_with_forgetting_csv_plots_and_report(tiny_run):
    results, out = tiny_run.results, tiny_run.out
    second = results["stages"][1]
    assert set(second["forgetting_per_class"]) == set(tiny_run.classes[:2])
    assert "forgetting_AP50" in second and "retention_AP50" in second
    assert results["summary"]["num_stages"] == 2
    with open(out / "per_class_ap.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["class", "stage_0", "stage_1"]
    assert [r[0] for r in rows[1:]] == tiny_run.classes
    assert rows[3][1] == ""  # learned at stage 1: empty at stage 0
    assert float(rows[1][2]) == pytest.approx(second["per_class"][tiny_run.classes[0]]["AP50"], abs=1e-4)
    for name in ("forgetting_curve.png", "per_class_heatmap.png", "per_class_first_vs_final.png"):
        assert (out / name).stat().st_size > 5000
    report = (out / "report.md").read_text()
    assert "| 0 " in report and "| 1 " in report and "![forgetting curve](forgetting_curve.png)" in report
    assert "stage_1/detections.json" in report


def test_stage_detections_are_saved_with_the_test_image_ids(tiny_run, tiny_shapes_dir):
    test, _ = load_coco_json(os.path.join(tiny_shapes_dir, "annotations", "instances_test.json"),
                             os.path.join(tiny_shapes_dir, "JPEGImages"))
    for k, seen in ((0, tiny_run.classes[:2]), (1, tiny_run.classes)):
        detections = _read_json(tiny_run.out / f"stage_{k}" / "detections.json")
        assert len(detections) == tiny_run.results["stages"][k]["num_detections"] > 0
        assert {d["image_id"] for d in detections} <= {r["image_id"] for r in test}
        assert all(seen[d["category_id"]] == d["category_name"] for d in detections)
    assert "VOC07_AP50" not in tiny_run.results["stages"][0]  # shapes is a COCO-format dataset


def test_reevaluating_the_run_reproduces_its_results(tiny_run, reevaluated):
    original, again = tiny_run.results["stages"], reevaluated.results["stages"]
    assert [e["stage"] for e in again] == [0, 1]
    for before, after in zip(original, again):
        assert after["old_classes"] == before["old_classes"] and after["new_classes"] == before["new_classes"]
        for key in ("AP", "AP50", "AP_old", "AP50_old", "AP_new", "AP50_new", "num_detections", "num_images"):
            assert after[key] == pytest.approx(before[key]), key
        assert after["per_class"].keys() == before["per_class"].keys()
        for name, scores in before["per_class"].items():
            assert after["per_class"][name] == pytest.approx(scores), name
    for k in (0, 1):
        trained = _read_json(tiny_run.out / f"stage_{k}" / "detections.json")
        evaluated = _read_json(reevaluated.out / f"stage_{k}" / "detections.json")
        ids = [(d["image_id"], d["category_id"]) for d in trained]
        assert [(d["image_id"], d["category_id"]) for d in evaluated] == ids
        np.testing.assert_allclose([d["bbox"] + [d["score"]] for d in evaluated],
                                   [d["bbox"] + [d["score"]] for d in trained], atol=1e-4)


def test_reevaluating_a_start_stage_run_evaluates_its_given_model_too(tiny_run, tiny_datasets_root, tmp_path):
    # Stage 1 trained from the run's stage-0 model: stage 0 is given, not trained, so its
    # folder holds no model_final.pth; results.json names the model.
    run = tmp_path / "from_stage_1"
    _run(TRAIN, ["--stages", "2+2", "--method", "finetune", "--class-order", ",".join(tiny_run.classes),
                 "--start-stage", "1", "--teacher-weights", str(tiny_run.out / "stage_0" / "model_final.pth"),
                 "--output-dir", str(run), *OPTS], tiny_datasets_root)
    original = _read_json(run / "results.json")["stages"]
    assert not (run / "stage_0" / "model_final.pth").exists()
    _run(EVAL, ["--run-dir", str(run), "--output-dir", str(tmp_path / "eval")], tiny_datasets_root)
    again = _read_json(tmp_path / "eval" / "results.json")["stages"]
    assert [e["stage"] for e in again] == [0, 1]
    for before, after in zip(original, again):
        assert after["AP50"] == pytest.approx(before["AP50"]) and after["AP"] == pytest.approx(before["AP"])
    assert again[1]["forgetting_AP50"] == pytest.approx(original[1]["forgetting_AP50"])


def test_eval_tool_prints_the_table_and_writes_a_report(reevaluated):
    assert "finetune on shapes 2+2" in reevaluated.proc.stdout
    assert "| 1       | 2+2 " in reevaluated.proc.stdout
    assert "%|" in reevaluated.proc.stderr  # the tqdm bar
    assert (reevaluated.out / "report.md").is_file() and (reevaluated.out / "per_class_ap.csv").is_file()


def _eval_main():
    spec = importlib.util.spec_from_file_location("eval_incremental", EVAL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_single_checkpoint_with_old_and_new_classes(tiny_run, tiny_datasets_root, monkeypatch, capsys):
    monkeypatch.setenv("ILMIL_DATASETS", str(tiny_datasets_root))
    main = _eval_main()
    weights = str(tiny_run.out / "stage_1" / "model_final.pth")
    config = str(tiny_run.out / "config.yaml")
    main(["--weights", weights, "--config-file", config, "--num-old", "2", "--quiet"])  # classes from the checkpoint
    table = capsys.readouterr().out
    assert "| 0       | 2+2 " in table
    stage_1 = tiny_run.results["stages"][1]
    assert f"| {stage_1['AP50']:.1f} " in table.splitlines()[-1]
    # The same classes given, with spaces after the commas.
    main(["--weights", weights, "--config-file", config, "--classes", ", ".join(tiny_run.classes), "--num-old", "2",
          "--quiet"])
    assert capsys.readouterr().out == table
    with pytest.raises(ValueError, match="holds .* but it is evaluated on the 4 classes"):
        reordered = ",".join(reversed(tiny_run.classes))
        main(["--weights", weights, "--config-file", config, "--classes", reordered, "--quiet"])
    with pytest.raises(SystemExit):
        main(["--weights", weights, "--stages", "0"])  # --stages is for --run-dir
    results = (tiny_run.out / "results.json").read_bytes()
    # Into a training run's folder, the evaluated run's or a checkpoint's own: its results.json
    # and report would be overwritten.
    for target in (["--run-dir", str(tiny_run.out)], ["--weights", weights]):
        with pytest.raises(RunDirError, match=r"^--output-dir .* holds a run \(run.json, stages.json\), whose results "
                                              r"and report this would overwrite; fix: give another --output-dir$"):
            main([*target, "--output-dir", str(tiny_run.out), "--quiet"])
    assert (tiny_run.out / "results.json").read_bytes() == results
    missing = str(tiny_run.out.parent / "no_such_run")  # beside an existing --output-dir: one error line
    with pytest.raises(NotARunError, match="no_such_run: no such folder; fix: give the --output-dir"):
        main(["--run-dir", missing, "--output-dir", str(tiny_run.out.parent), "--quiet"])


@pytest.mark.parametrize("tool", ["eval_incremental.py", "prune.py"])
def test_a_lone_checkpoint_of_other_classes_is_refused_before_any_data_is_made(tool, tiny_run, tmp_path, monkeypatch,
                                                                             capsys):
    # Outside a run folder the tools default to the shapes config: for a model of other
    # classes they would generate and check the shapes data first, then refuse it.
    checkpoint = torch.load(tiny_run.out / "stage_1" / "model_final.pth", weights_only=False)
    checkpoint["ilmil"]["class_names"] = ["cat", "dog", "person", "circle_filled"]
    (tmp_path / "lone").mkdir()
    weights = tmp_path / "lone" / "m.pth"
    torch.save(checkpoint, weights)
    datasets = tmp_path / "datasets"
    datasets.mkdir()
    args = ["--weights", str(weights), "--output-dir", str(tmp_path / "out")]
    args += ["--ratio", "0.5"] if tool == "prune.py" else []
    proc = run_tool_here(tool, args, datasets, monkeypatch, capsys)
    assert proc.returncode == 1, tail(proc)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.search(r"m.pth: no config.yaml in its folder or the 2 above, and its classes "
                                          r"\(cat, dog, person\) are not the shapes data's, the default; fix: give "
                                          r"--config-file .* or --dataset", errors[0]), proc.stderr[-2000:]
    assert not any(datasets.iterdir())
    # Its data named: the classes are checked against that data's, not refused as not the shapes'.
    proc = run_tool_here(tool, [*args, "--dataset", "voc_2007"], datasets, monkeypatch, capsys)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and len(errors) == 1 and "VOC" in errors[0] and "shapes" not in errors[0], errors
