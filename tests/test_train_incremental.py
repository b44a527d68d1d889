"""End to end: ``tools/train_incremental.py`` as a real subprocess on a tiny shapes
set (24 train / 8 test images of 128 px, 6 iterations per stage)."""
import math
import os
import re
from types import SimpleNamespace

import pytest
import torch

from tool_runs import SHAPES_OPTS, TRAIN_OPTS, metrics_lines, read_json, run_tool, tail
from ilmil.checkpoint import safe_load
from ilmil.data import build_schedule, load_coco_json, shape_class_names, stage_train_dicts

CLASSES = shape_class_names(20)[:4]


def _run(args, datasets_root, timeout=120):
    return run_tool("train_incremental.py", args, datasets_root, timeout)


def _finetune_args(out):
    return ["--stages", "2+2", "--method", "finetune", "--output-dir", str(out), *SHAPES_OPTS, *TRAIN_OPTS]


@pytest.fixture(scope="module")
def finetune_run(tiny_datasets_root, tiny_shapes_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("finetune") / "run"
    meta_mtime = os.path.getmtime(os.path.join(tiny_shapes_dir, "meta.json"))
    proc = _run(_finetune_args(out), tiny_datasets_root)
    assert proc.returncode == 0, tail(proc)
    weights = [out / f"stage_{k}" / "model_final.pth" for k in (0, 1)]
    return SimpleNamespace(
        out=out, proc=proc, weights=weights,
        mtimes=[os.path.getmtime(w) if w.exists() else None for w in weights],
        results=read_json(out / "results.json"), stages=read_json(out / "stages.json"),
        dataset_reused=os.path.getmtime(os.path.join(tiny_shapes_dir, "meta.json")) == meta_mtime,
    )


def _is_percent(value):
    return isinstance(value, float) and math.isfinite(value) and 0.0 <= value <= 100.0


def test_finetune_reuses_the_cached_tiny_dataset(finetune_run):
    assert finetune_run.dataset_reused


def test_results_hold_old_new_and_per_class_ap_of_each_stage(finetune_run):
    results = finetune_run.results
    assert results["method"] == "finetune" and results["dataset"] == "shapes" and results["stages_spec"] == "2+2"
    assert results["config"]["SOLVER"]["MAX_ITER"] == 6
    assert [s["stage"] for s in results["stages"]] == [0, 1]
    for entry in results["stages"]:
        for key in ("AP", "AP50", "AP_new", "AP50_new"):
            assert _is_percent(entry[key]), (entry["stage"], key, entry[key])
        seen = entry["old_classes"] + entry["new_classes"]
        assert list(entry["per_class"]) == seen
        for name, ap in entry["per_class"].items():
            assert _is_percent(ap["AP"]) and _is_percent(ap["AP50"]), (name, ap)
        assert entry["num_images"] == 8
    first, second = results["stages"]
    assert first["AP_old"] is None and first["AP50_old"] is None
    assert _is_percent(second["AP_old"]) and _is_percent(second["AP50_old"])
    assert first["per_class"].keys() == set(CLASSES[:2])
    assert list(second["per_class"]) == CLASSES


def test_stage_averages_are_means_of_the_per_class_ap(finetune_run):
    second = finetune_run.results["stages"][1]
    per = second["per_class"]
    for suffix, names in (("_old", CLASSES[:2]), ("_new", CLASSES[2:]), ("", CLASSES)):
        for metric in ("AP", "AP50"):
            expected = sum(per[n][metric] for n in names) / len(names)
            assert second[metric + suffix] == pytest.approx(expected)


def test_stages_json_lists_the_classes_and_image_counts(finetune_run, tiny_shapes_dir):
    stages = finetune_run.stages
    assert stages["method"] == "finetune"
    assert [(s["index"], s["old_classes"], s["new_classes"]) for s in stages["stages"]] == [
        (0, [], CLASSES[:2]), (1, CLASSES[:2], CLASSES[2:])]
    # The counts follow the protocol: images with an object of the stage's classes.
    train, class_names = load_coco_json(os.path.join(tiny_shapes_dir, "annotations", "instances_train.json"),
                                        os.path.join(tiny_shapes_dir, "JPEGImages"))
    schedule = build_schedule(class_names, [2, 2])
    for info, stage in zip(stages["stages"], schedule):
        assert info["num_train_images"] == len(stage_train_dicts(train, stage)) > 0
        assert info["num_test_images"] == 8
    assert finetune_run.results["stages"][0]["num_train_images"] == stages["stages"][0]["num_train_images"]


def test_each_stage_saves_its_final_model(finetune_run):
    for weights in finetune_run.weights:
        assert weights.is_file()
    for k in (0, 1):
        assert metrics_lines(finetune_run.out / f"stage_{k}" / "metrics.json")[-1]["iteration"] == 5


def test_second_stage_starts_from_the_expanded_first_model(tiny_datasets_root, tmp_path):
    # With a learning rate of 0 the stages change no weight: stage 1's model is stage 0's
    # expanded (detectron2's classifier: a row per class, then the background's).
    out = tmp_path / "frozen"
    proc = _run([*_finetune_args(out), "SOLVER.BASE_LR", "0.0"], tiny_datasets_root)
    assert proc.returncode == 0, tail(proc)
    assert "initialised from a 2-class model" in proc.log
    first, second = (safe_load(str(out / f"stage_{k}" / "model_final.pth"))["model"] for k in (0, 1))
    grown = [k for k in first if first[k].shape != second[k].shape]
    assert sorted(grown) == ["roi_heads.box_predictor.bbox_pred.bias", "roi_heads.box_predictor.bbox_pred.weight",
                             "roi_heads.box_predictor.cls_score.bias", "roi_heads.box_predictor.cls_score.weight"]
    for key in first.keys() - set(grown) - {k for k in first if "running_" in k or "num_batches" in k}:
        assert torch.equal(first[key], second[key]), key
    old, new = first["roi_heads.box_predictor.cls_score.weight"], second["roi_heads.box_predictor.cls_score.weight"]
    assert torch.equal(new[:2], old[:2]) and torch.equal(new[-1], old[-1]) and new.shape[0] == 5
    old, new = first["roi_heads.box_predictor.bbox_pred.weight"], second["roi_heads.box_predictor.bbox_pred.weight"]
    assert torch.equal(new[:8], old) and new.shape[0] == 16


def test_stdout_prints_the_per_stage_table(finetune_run):
    stdout = finetune_run.proc.stdout
    assert "finetune on shapes 2+2" in stdout
    header = next((line for line in stdout.splitlines() if line.startswith("|") and "AP50_old" in line), None)
    assert header is not None, stdout[-2000:]
    for column in ("AP50_new", "AP50", "AP_old", "AP_new"):
        assert column in header
    assert re.search(r"^\|\s*0\s*\|\s*0\+2\s*\|", stdout, re.M)
    assert re.search(r"^\|\s*1\s*\|\s*2\+2\s*\|", stdout, re.M)


def test_rerun_skips_finished_stages(finetune_run, tiny_datasets_root):
    proc = _run(_finetune_args(finetune_run.out), tiny_datasets_root)
    assert proc.returncode == 0, tail(proc)
    for k in (0, 1):
        assert re.search(rf"Stage {k}: .*stage_{k}/model_final\.pth exists, not retraining", proc.log), tail(proc)
    assert "Starting training" not in proc.log
    assert [os.path.getmtime(w) for w in finetune_run.weights] == finetune_run.mtimes
    assert proc.wall < finetune_run.proc.wall, (proc.wall, finetune_run.proc.wall)
    rerun = read_json(finetune_run.out / "results.json")
    assert [s["AP50"] for s in rerun["stages"]] == [s["AP50"] for s in finetune_run.results["stages"]]


def test_joint_trains_all_classes_at_once_with_the_summed_budget(tiny_datasets_root, tmp_path):
    out = tmp_path / "joint"
    proc = _run(["--stages", "2+2", "--method", "joint", "--output-dir", str(out), *SHAPES_OPTS, *TRAIN_OPTS],
                tiny_datasets_root)
    assert proc.returncode == 0, tail(proc)
    results = read_json(out / "results.json")
    assert results["method"] == "joint"
    assert len(results["stages"]) == 1
    (entry,) = results["stages"]
    assert entry["old_classes"] == [] and entry["new_classes"] == CLASSES
    assert list(entry["per_class"]) == CLASSES
    assert entry["AP_old"] is None and _is_percent(entry["AP50"])
    stages = read_json(out / "stages.json")["stages"]
    assert len(stages) == 1 and stages[0]["num_train_images"] > 0
    assert (out / "stage_0" / "model_final.pth").is_file()
    assert not (out / "stage_1").exists()
    # MAX_ITER 6 per stage x 2 stages: iterations 0..11
    assert metrics_lines(out / "stage_0" / "metrics.json")[-1]["iteration"] == 11


def _bad_run(tmp_path, tiny_datasets_root, *args):
    out = tmp_path / "bad"
    proc = _run([*args, "--output-dir", str(out), *SHAPES_OPTS, *TRAIN_OPTS], tiny_datasets_root, timeout=60)
    assert proc.returncode != 0, tail(proc)
    assert "Starting training" not in proc.log
    assert not (out / "stage_0").exists()
    return proc


def test_stage_spec_larger_than_the_dataset_fails_before_training(tmp_path, tiny_datasets_root):
    proc = _bad_run(tmp_path, tiny_datasets_root, "--stages", "30+30")
    assert re.search(r"needs 60 classes but the dataset has 20", proc.log), tail(proc)


def test_single_number_stage_spec_is_read_as_a_spec(tmp_path, tiny_datasets_root):
    # "30" must reach the spec check (yacs would parse it as an int).
    proc = _bad_run(tmp_path, tiny_datasets_root, "--stages", "30")
    assert re.search(r"needs 30 classes but the dataset has 20", proc.log), tail(proc)


def test_unknown_dataset_lists_the_valid_names(tmp_path, tiny_datasets_root):
    proc = _bad_run(tmp_path, tiny_datasets_root, "--dataset", "nope", "--stages", "2+2")
    assert "unknown dataset 'nope'" in proc.log, tail(proc)
    message = proc.log[proc.log.index("unknown dataset 'nope'"):].splitlines()[0]
    for name in ("shapes", "voc_2007", "voc_2012", "voc_07_12", "coco_2017", "voc_folder", "coco_json"):
        assert name in message


def test_voc_folder_run_reads_the_voc_xml_files(tiny_datasets_root, tiny_shapes_dir, tmp_path):
    """The shapes folder is also a VOC folder: the VOC path (string image ids,
    classes in sorted-name order, printed at the start) trains and evaluates end to end."""
    out = tmp_path / "voc"
    proc = _run(["--dataset", "voc_folder", "--stages", "2+2", "--method", "finetune", "--output-dir", str(out),
                 "ILMIL.DATA.ROOT", tiny_shapes_dir, "ILMIL.DATA.TRAIN_SPLIT", "train",
                 "ILMIL.DATA.TEST_SPLIT", "test", *TRAIN_OPTS, "SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "(1,)",
                 "SOLVER.WARMUP_ITERS", "1"], tiny_datasets_root)
    assert proc.returncode == 0, tail(proc)
    results = read_json(out / "results.json")
    assert results["dataset"] == "voc_folder"
    assert [len(s["per_class"]) for s in results["stages"]] == [2, 4]
    assert all(set(s["per_class"]) <= set(shape_class_names(20)) for s in results["stages"])
    assert all(s["num_images"] == 8 for s in results["stages"])
    printed = proc.log.split("class order (voc_folder, sorted names): ", 1)[1].splitlines()[0].split(", ")
    assert printed == sorted(printed) and set(printed) <= set(shape_class_names(20))
    assert [s["new_classes"] for s in results["stages"]] == [printed[:2], printed[2:4]]
