"""End to end through ``tools/train_incremental.py`` (a real subprocess) for the
distillation methods: a three-stage ``2+1+1`` schedule (``mma``: ``2+1``) on a tiny shapes set
(24 train / 8 test images of 128 px, batch 2, 3 iterations per stage), starting
from a user-given teacher, and refusing a teacher of other classes."""
import json
import math
import os
import shutil
from types import SimpleNamespace

import pytest
import torch

from conftest import TINY_SHAPES
from tool_runs import kill_when_exists, metrics_lines, read_json, run_tool, start_tool, tail
from ilmil.checkpoint import safe_load
from ilmil.data import shape_class_names
from ilmil.data.shapes import generate_shapes_dataset

CLASSES = shape_class_names(TINY_SHAPES["num_classes"])[:4]
DISTILL_KEYS = ("loss_distill_feat", "loss_distill_rpn", "loss_distill_rcn")
# GroupNorm instead of the config's BatchNorm: after 3 iterations from scratch the
# BN running statistics are mostly their initial values, so the eval-mode network
# (every teacher, and the student with frozen BN statistics) has activations of
# ~1e14; the teacher's RPN then yields no proposals and the l2 RCN term diverges.
# GroupNorm behaves the same in train and eval mode. These runs test the plumbing.
TRAIN_OPTS = [
    "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "128",
    "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "128",
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "3", "SOLVER.STEPS", "(2,)", "SOLVER.WARMUP_ITERS", "1",
    "MODEL.RESNETS.NORM", "GN", "DATALOADER.NUM_WORKERS", "0",
]


def _has_objects_of_the_first_classes(folder):
    for split in ("train", "test"):
        with open(os.path.join(folder, "annotations", f"instances_{split}.json")) as f:
            data = json.load(f)
        names = {c["id"]: c["name"] for c in data["categories"]}
        if not set(CLASSES) <= {names[a["category_id"]] for a in data["annotations"]}:
            return False
    return True


@pytest.fixture(scope="module")
def shapes_opts(tiny_datasets_root):
    """The tiny set's options, with a seed whose train and test images both hold
    objects of each of the 4 classes of the schedules (every AP is then a number);
    the conftest seed first, so the session's cached set is reused when it fits."""
    for seed in (TINY_SHAPES["seed"], *range(50)):
        params = {**TINY_SHAPES, "seed": seed}
        folder = generate_shapes_dataset(str(tiny_datasets_root / "shapes"), progress=False, **params)
        if _has_objects_of_the_first_classes(folder):
            return [
                "ILMIL.SHAPES.NUM_CLASSES", str(params["num_classes"]),
                "ILMIL.SHAPES.NUM_TRAIN", str(params["num_train"]),
                "ILMIL.SHAPES.NUM_TEST", str(params["num_test"]),
                "ILMIL.SHAPES.IMAGE_SIZE", str(params["image_size"]),
                "ILMIL.SHAPES.SEED", str(seed),
            ]
    pytest.fail(f"no tiny shapes seed < 50 has objects of {CLASSES} in both splits")


def _run(args, datasets_root, timeout=120):
    return run_tool("train_incremental.py", args, datasets_root, timeout)


def _keys(lines):
    return set().union(*(line.keys() for line in lines))


def _is_percent(value):
    return isinstance(value, float) and math.isfinite(value) and 0.0 <= value <= 100.0


def _method_run(method, tiny_datasets_root, shapes_opts, tmp_path_factory):
    out = tmp_path_factory.mktemp(method) / "run"
    proc = _run(["--stages", "2+1+1", "--method", method, "--output-dir", str(out), *shapes_opts, *TRAIN_OPTS],
                tiny_datasets_root)
    assert proc.returncode == 0, tail(proc)
    return SimpleNamespace(out=out, proc=proc, results=read_json(out / "results.json"),
                           metrics=[metrics_lines(out / f"stage_{k}" / "metrics.json") for k in range(3)])


@pytest.fixture(scope="module")
def ilmil_run(tiny_datasets_root, shapes_opts, tmp_path_factory):
    return _method_run("ilmil", tiny_datasets_root, shapes_opts, tmp_path_factory)


@pytest.fixture(scope="module")
def faster_ilod_run(tiny_datasets_root, shapes_opts, tmp_path_factory):
    return _method_run("faster-ilod", tiny_datasets_root, shapes_opts, tmp_path_factory)


@pytest.fixture(params=["ilmil", "faster-ilod"])
def method_run(request):
    return request.param, request.getfixturevalue(request.param.replace("-", "_") + "_run")


def test_three_stage_results_hold_finite_old_and_new_ap(method_run):
    method, run = method_run
    results = run.results
    assert results["method"] == method and results["stages_spec"] == "2+1+1"
    assert [s["stage"] for s in results["stages"]] == [0, 1, 2]
    expected = [([], CLASSES[:2]), (CLASSES[:2], CLASSES[2:3]), (CLASSES[:3], CLASSES[3:])]
    for entry, (old, new) in zip(results["stages"], expected):
        assert (entry["old_classes"], entry["new_classes"]) == (old, new)
        assert list(entry["per_class"]) == old + new
        for key in ("AP", "AP50", "AP_new", "AP50_new"):
            assert _is_percent(entry[key]), (entry["stage"], key, entry[key])
    assert results["stages"][0]["AP_old"] is None and results["stages"][0]["AP50_old"] is None
    for entry in results["stages"][1:]:
        assert _is_percent(entry["AP_old"]) and _is_percent(entry["AP50_old"]), entry
    for k in range(3):
        assert (run.out / f"stage_{k}" / "model_final.pth").is_file()


def test_each_later_stage_starts_from_the_expanded_previous_model(method_run):
    _, run = method_run
    assert "initialised from a 2-class model" in run.proc.log
    assert "initialised from a 3-class model" in run.proc.log


def test_distill_losses_are_logged_from_the_second_stage_on(method_run):
    _, run = method_run
    assert not any(key in _keys(run.metrics[0]) for key in DISTILL_KEYS)  # stage 0 has no teacher
    for stage in (1, 2):
        last = run.metrics[stage][-1]
        assert last["iteration"] == 2
        for key in DISTILL_KEYS:
            assert key in last, (stage, sorted(last))
            assert math.isfinite(last[key]) and last[key] >= 0


def test_ilmil_logs_the_pseudo_boxes_per_image(ilmil_run):
    last = ilmil_run.metrics[2][-1]
    assert "pseudo_boxes_per_image" in last, sorted(last)
    assert math.isfinite(last["pseudo_boxes_per_image"]) and last["pseudo_boxes_per_image"] >= 0
    assert "pseudo_boxes_per_image" not in _keys(ilmil_run.metrics[0])


def test_faster_ilod_adds_no_pseudo_labels(faster_ilod_run):
    for stage in range(3):
        assert "pseudo_boxes_per_image" not in _keys(faster_ilod_run.metrics[stage])


def test_mma_trains_a_two_stage_run_with_its_unbiased_losses(tiny_datasets_root, shapes_opts, tmp_path):
    out = tmp_path / "mma"
    proc = _run(["--stages", "2+1", "--method", "mma", "--output-dir", str(out), *shapes_opts, *TRAIN_OPTS],
                tiny_datasets_root)
    assert proc.returncode == 0, tail(proc)
    results = read_json(out / "results.json")
    assert results["method"] == "mma" and [s["stage"] for s in results["stages"]] == [0, 1]
    ilmil_keys = results["config"]["ILMIL"]
    assert ilmil_keys["UNBIASED_CLS"]["ENABLED"] and ilmil_keys["DISTILL"]["RCN"]["LOGITS"] == "unbiased_kl"
    last = results["stages"][1]
    assert (last["old_classes"], last["new_classes"]) == (CLASSES[:2], CLASSES[2:3])
    assert all(_is_percent(last[key]) for key in ("AP50", "AP50_old", "AP50_new")), last
    metrics = [metrics_lines(out / f"stage_{k}" / "metrics.json") for k in range(2)]
    assert not any(key in _keys(metrics[0]) for key in DISTILL_KEYS)
    final = metrics[1][-1]
    assert final["iteration"] == 2
    for key in (*DISTILL_KEYS, "loss_cls"):
        assert math.isfinite(final[key]) and final[key] >= 0, (key, final.get(key))
    assert "pseudo_boxes_per_image" not in _keys(metrics[1])
    assert (out / "stage_1" / "model_final.pth").is_file()


def test_start_stage_trains_only_the_later_stages_from_the_given_teacher(ilmil_run, tiny_datasets_root, shapes_opts,
                                                                         tmp_path):
    out = tmp_path / "from_stage_1"
    teacher = ilmil_run.out / "stage_0" / "model_final.pth"
    proc = _run(["--stages", "2+1+1", "--method", "ilmil", "--start-stage", "1", "--teacher-weights", str(teacher),
                 "--output-dir", str(out), *shapes_opts, *TRAIN_OPTS], tiny_datasets_root)
    assert proc.returncode == 0, tail(proc)
    results = read_json(out / "results.json")
    # Stage 0 is the given teacher, evaluated (as its own run did), not trained.
    assert [s["stage"] for s in results["stages"]] == [0, 1, 2]
    given = results["stages"][0]
    assert given["weights"] == str(teacher)
    assert not (out / "stage_0" / "model_final.pth").exists()
    # Its training time is not this run's ("-" in the report), the trained stages' are.
    assert given["train_time_s"] is None and all(s["train_time_s"] > 0 for s in results["stages"][1:])
    assert given["per_class"] == read_json(ilmil_run.out / "stage_0" / "metrics_eval.json")["per_class"]
    detections = read_json(out / "stage_0" / "detections.json")
    assert detections and len(detections) == len(read_json(ilmil_run.out / "stage_0" / "detections.json"))
    for k in (1, 2):
        assert (out / f"stage_{k}" / "model_final.pth").is_file()
        assert set(DISTILL_KEYS) <= set(metrics_lines(out / f"stage_{k}" / "metrics.json")[-1])
    assert proc.log.count("Starting training") == 2
    assert "initialised from a 2-class model" in proc.log and "initialised from a 3-class model" in proc.log
    assert all(_is_percent(s["AP_old"]) and _is_percent(s["AP_new"]) for s in results["stages"][1:])


def _retrained_in_place(path):
    """Other weights under the same path, as a model retrained there would be."""
    checkpoint = safe_load(str(path))
    name = next(k for k, v in checkpoint["model"].items() if v.is_floating_point())
    checkpoint["model"][name] = checkpoint["model"][name] + 1
    torch.save(checkpoint, path)


def test_a_given_model_retrained_in_place_makes_another_run(ilmil_run, tiny_datasets_root, shapes_opts, tmp_path):
    # The folder's finished stages learnt from the given model's weights, not from its path.
    given = tmp_path / "stage_0.pth"
    shutil.copy(ilmil_run.out / "stage_0" / "model_final.pth", given)
    out = tmp_path / "from_stage_1"
    args = ["--stages", "2+1", "--method", "finetune", "--start-stage", "1", "--teacher-weights", str(given),
            "--output-dir", str(out), *shapes_opts, *TRAIN_OPTS]
    kill_when_exists(start_tool("train_incremental.py", args, tiny_datasets_root, tmp_path / "first.log"),
                     out / "run.json")  # the folder is claimed: enough of the first run
    assert (out / "run.json").is_file(), (tmp_path / "first.log").read_text()[-3000:]
    _retrained_in_place(given)
    proc = _run(args, tiny_datasets_root, timeout=120)
    assert proc.returncode == 1, tail(proc)
    assert "this folder holds another run (given_weights_sha256: " in proc.stderr, tail(proc)
    assert "Starting training" not in proc.log


def _refused(proc, out, expected_old, teacher_classes):
    assert proc.returncode != 0, tail(proc)
    assert "Starting training" not in proc.log, tail(proc)
    assert not (out / "stage_1" / "model_final.pth").exists()
    assert str(teacher_classes) in proc.log and str(expected_old) in proc.log, tail(proc)


def test_teacher_of_other_classes_is_refused_naming_both_class_lists(ilmil_run, tiny_datasets_root, shapes_opts,
                                                                      tmp_path):
    out = tmp_path / "wrong_teacher"
    teacher = ilmil_run.out / "stage_0" / "model_final.pth"  # classes 0, 1; the schedule wants 0, 1, 2
    proc = _run(["--stages", "3+1", "--method", "ilmil", "--start-stage", "1", "--teacher-weights", str(teacher),
                 "--output-dir", str(out), *shapes_opts, *TRAIN_OPTS], tiny_datasets_root, timeout=60)
    _refused(proc, out, CLASSES[:3], CLASSES[:2])
    assert f"--teacher-weights: checkpoint {teacher} holds" in proc.stderr and "Traceback" not in proc.stderr


def test_finetune_start_model_of_other_classes_is_refused_too(ilmil_run, tiny_datasets_root, shapes_opts, tmp_path):
    """finetune builds no teacher, but --teacher-weights is still the model the
    student starts from: one of the same count but other classes (here the first
    two in the other order) must not be silently taken as the old classes."""
    out = tmp_path / "wrong_start"
    teacher = ilmil_run.out / "stage_0" / "model_final.pth"
    order = [CLASSES[1], CLASSES[0], CLASSES[2]]
    proc = _run(["--stages", "2+1", "--class-order", ",".join(order), "--method", "finetune", "--start-stage", "1",
                 "--teacher-weights", str(teacher), "--output-dir", str(out), *shapes_opts, *TRAIN_OPTS],
                tiny_datasets_root, timeout=60)
    _refused(proc, out, order[:2], CLASSES[:2])
