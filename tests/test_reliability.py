"""Crash safety: atomic checkpoints, safe loading, corrupt-file fallback, resume after
SIGKILL, non-finite loss stop, pre-flight validation and the run folder's identity."""
import json
import logging
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.engine import TrainerBase
from PIL import Image
from torch import nn

from tool_runs import (SHAPES_OPTS, TRAIN_OPTS, checkpoint_iteration, kill_when_exists, killed_copy, read_json,
                       resumed_checkpoint, run_tool, start_tool, tail)
from ilmil.checkpoint import CheckpointError, IncrementalCheckpointer, RNGStates, safe_load
from ilmil.config import CONFIGS_DIR, get_ilmil_cfg
from ilmil.data import DatasetSource
from ilmil.data.shapes import shape_class_names
from ilmil.distill import Distiller, FeatureDistillation
from ilmil.engine import IncrementalRun, RunDirError, RunValidationError
from ilmil.engine.run_dir import claim_run_dir, dataset_content_fingerprint, dataset_fingerprint
from ilmil.engine.trainer import _TrainingClock, recorded_training_seconds
from ilmil.file_io import atomic_write

# --------------------------------------------------------------- checkpoint files


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("old")

    def fail_halfway(f):
        f.write(b"new, half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(str(path), fail_halfway)
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["results.json"]  # no temporary file left behind


def test_atomic_write_keeps_the_old_file_when_the_serializer_fails_midway(tmp_path):
    path = tmp_path / "detections.json"
    path.write_text('[{"score": 0.9}]')
    # json.dump writes the first entries to the file before it reaches the one it cannot encode.
    detections = [{"score": 0.5}] * 1000 + [{"score": object()}]
    with pytest.raises(TypeError, match="not JSON serializable"):
        atomic_write(str(path), lambda f: json.dump(detections, f), mode="w")
    assert json.loads(path.read_text()) == [{"score": 0.9}]
    assert os.listdir(tmp_path) == ["detections.json"]
    atomic_write(str(path), lambda f: json.dump(detections[:2], f), mode="w")
    assert json.loads(path.read_text()) == [{"score": 0.5}] * 2
    assert os.listdir(tmp_path) == ["detections.json"]


def test_a_killed_writers_temporary_is_removed_when_the_file_is_next_written(tmp_path):
    path = tmp_path / "model_0000009.pth"
    ended = subprocess.Popen(["true"])
    ended.wait()
    (tmp_path / f"model_0000009.pth.tmp.{ended.pid}").write_bytes(b"half a checkpoint")  # its writer was killed
    (tmp_path / "model_0000009.pth.tmp.1").write_bytes(b"being written")  # by a process that still runs
    (tmp_path / "model_0000004.pth.tmp.7").write_bytes(b"another file's")
    atomic_write(str(path), lambda f: f.write(b"whole"))
    assert path.read_bytes() == b"whole"
    assert sorted(os.listdir(tmp_path)) == ["model_0000004.pth.tmp.7", "model_0000009.pth", "model_0000009.pth.tmp.1"]


class _Counter:
    """A checkpointable with state, standing in for the trainer's."""

    def __init__(self):
        self.value = 0

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = state["value"]


def _save_periodic(folder, iterations):
    model, counter = nn.Linear(3, 2), _Counter()
    checkpointer = IncrementalCheckpointer(model, str(folder), counter=counter)
    for it in iterations:
        with torch.no_grad():
            model.weight.fill_(float(it))
        counter.value = it
        checkpointer.save(f"model_{it:07d}", iteration=it)
    return checkpointer


def test_checkpoints_are_written_whole_and_tagged(tmp_path):
    _save_periodic(tmp_path, [4, 9])
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000009.pth"
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000004.pth", "model_0000009.pth"]
    assert safe_load(str(tmp_path / "model_0000009.pth"))["iteration"] == 9


def test_resume_skips_a_truncated_checkpoint_and_names_both_files(tmp_path, caplog):
    _save_periodic(tmp_path, [4, 9])
    newest = tmp_path / "model_0000009.pth"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a crash mid-copy, a full disk
    model, counter = nn.Linear(3, 2), _Counter()
    checkpointer = IncrementalCheckpointer(model, str(tmp_path), counter=counter)
    with caplog.at_level(logging.WARNING, logger="ilmil.checkpoint"):
        extra = checkpointer.resume_or_load("", resume=True)
    assert extra["iteration"] == 4 and counter.value == 4
    assert torch.all(model.weight == 4.0)
    warning = "\n".join(r.getMessage() for r in caplog.records)
    assert str(newest) in warning and str(tmp_path / "model_0000004.pth") in warning


def test_resume_with_only_corrupt_checkpoints_starts_over(tmp_path, caplog):
    _save_periodic(tmp_path, [4])
    (tmp_path / "model_0000004.pth").write_bytes(b"not a checkpoint")
    checkpointer = IncrementalCheckpointer(nn.Linear(3, 2), str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="ilmil.checkpoint"):
        assert "iteration" not in checkpointer.resume_or_load("", resume=True)
    assert "starting the stage over" in caplog.text


class _Student(nn.Module):
    """A detector stand-in; with ``distill``, IncrementalRCNN's distiller with its
    adaptive feature term; with ``distill="feature_loss"``, that term where students
    kept it before the distiller (checkpoints of that layout must still load)."""

    def __init__(self, distill="distiller"):
        super().__init__()
        self.head = nn.Linear(3, 2)
        feature = FeatureDistillation(layers=["p2", "p3"], distance="l2", weighting="adaptive")
        if distill == "distiller":
            self.distiller = Distiller({"FEAT": feature}, {"FEAT": 1.0})
        elif distill == "feature_loss":
            self.feature_loss = feature

    def ema(self):
        return (self.distiller.term("FEAT") if hasattr(self, "distiller") else self.feature_loss).ema_distance


def test_the_distillation_state_is_resumed_and_skipped_by_models_without_it(tmp_path, caplog):
    student = _Student()
    student.ema().copy_(torch.tensor([0.25, 0.75]))
    IncrementalCheckpointer(student, str(tmp_path)).save("model_0000009", iteration=9)
    assert "distiller.terms.feat.ema_distance" in safe_load(str(tmp_path / "model_0000009.pth"))["model"]
    resumed = _Student()
    assert IncrementalCheckpointer(resumed, str(tmp_path)).resume_or_load("", resume=True)["iteration"] == 9
    assert resumed.ema().tolist() == [0.25, 0.75]
    # A teacher or an evaluated model has no distillation losses: it loads the weights, quietly.
    plain = _Student(distill=None)
    with caplog.at_level(logging.INFO):
        IncrementalCheckpointer(plain, str(tmp_path)).load(str(tmp_path / "model_0000009.pth"))
    assert torch.equal(plain.head.weight, student.head.weight)
    assert "distiller" not in caplog.text and "not used by the model" not in caplog.text


@pytest.mark.parametrize("layout", [None, "feature_loss"], ids=["no-state", "feature_loss-prefix"])
def test_a_checkpoint_without_the_distillation_state_still_resumes(tmp_path, caplog, layout):
    # As checkpoints were written before the state was saved (None), or before the
    # distiller held it (the feature term's state under ``feature_loss.``).
    older = _Student(distill=layout)
    if layout == "feature_loss":
        older.ema().copy_(torch.tensor([0.25, 0.75]))
    IncrementalCheckpointer(older, str(tmp_path)).save("model_0000004", iteration=4)
    resumed = _Student()
    with caplog.at_level(logging.INFO):
        assert IncrementalCheckpointer(resumed, str(tmp_path)).resume_or_load("", resume=True)["iteration"] == 4
    assert torch.equal(resumed.head.weight, older.head.weight)
    assert resumed.ema().tolist() == [0.0, 0.0]  # the running average starts afresh
    assert "feature_loss" not in caplog.text and "not used by the model" not in caplog.text
    plain = _Student(distill=None)  # and a model without distillation loads it quietly
    with caplog.at_level(logging.INFO):
        IncrementalCheckpointer(plain, str(tmp_path)).load(str(tmp_path / "model_0000004.pth"))
    assert torch.equal(plain.head.weight, older.head.weight)
    assert "feature_loss" not in caplog.text and "not used by the model" not in caplog.text


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


@pytest.mark.parametrize("suffix", [".pth", ".pkl"])
def test_loading_a_checkpoint_never_runs_code_from_it(tmp_path, monkeypatch, suffix):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / f"evil{suffix}"
    if suffix == ".pth":
        torch.save({"model": {}, "payload": _RunsCode()}, path)
    else:
        path.write_bytes(pickle.dumps({"model": {}, "payload": _RunsCode()}))
    with pytest.raises(CheckpointError, match=str(path)):
        safe_load(str(path))
    assert not (tmp_path / "PWNED").exists()


def test_a_file_that_is_no_checkpoint_is_refused_without_advice_to_load_it_unsafely(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("MODEL:\n  DEVICE: cpu\n")
    with pytest.raises(CheckpointError) as info:
        safe_load(str(path))
    message = str(info.value)
    assert message.startswith(f"cannot read checkpoint {path} (UnpicklingError: ") and "not a checkpoint" in message
    assert "weights_only" not in message and "arbitrary code" not in message
    torch.save({"model": {}, "step": np.float64(1.0)}, tmp_path / "numpy.pth")  # torch's advice: allow-list it
    with pytest.raises(CheckpointError, match=r"\(UnpicklingError: it holds a numpy\S*scalar, which is not weights "
                                              r"and is not loaded\)"):
        safe_load(str(tmp_path / "numpy.pth"))


def test_model_zoo_pkl_weights_still_load(tmp_path):
    weights = {"conv1.weight": np.arange(6, dtype=np.float32).reshape(2, 3)}
    path = tmp_path / "R-zoo.pkl"
    path.write_bytes(pickle.dumps({"model": weights, "__author__": "someone"}))
    loaded = safe_load(str(path))
    np.testing.assert_array_equal(loaded["model"]["conv1.weight"], weights["conv1.weight"])


def test_rng_states_survive_a_checkpoint_round_trip(tmp_path):
    states = RNGStates()
    torch.save({"rng": states.state_dict()}, tmp_path / "rng.pth")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.rand(5), np.random.rand(5), random.random()  # the streams move on
    states.load_state_dict(safe_load(str(tmp_path / "rng.pth"))["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    np.testing.assert_array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]


# -------------------------------------------------------------- killed and resumed


def test_a_run_killed_mid_stage_resumes_from_its_checkpoint(tiny_datasets_root, tmp_path):
    out = tmp_path / "run"
    args = ["--stages", "2+2", "--method", "finetune", "--output-dir", str(out), *SHAPES_OPTS, *TRAIN_OPTS,
            "SOLVER.MAX_ITER", "30", "SOLVER.STEPS", "(25,)", "SOLVER.CHECKPOINT_PERIOD", "5"]
    proc = start_tool("train_incremental.py", args, tiny_datasets_root, tmp_path / "first.log")
    stage1 = out / "stage_1"
    status = kill_when_exists(proc, stage1 / "last_checkpoint", timeout=240)
    first_log = (tmp_path / "first.log").read_text()
    assert status == -signal.SIGKILL, first_log[-3000:]
    assert not (stage1 / "model_final.pth").exists(), "the kill came too late: stage 1 had finished"
    stage0_weights = out / "stage_0" / "model_final.pth"
    stage0_mtime = stage0_weights.stat().st_mtime
    killed_at = checkpoint_iteration(stage1)
    trained_before_kill = recorded_training_seconds(resumed_checkpoint(stage1))

    resumed = run_tool("train_incremental.py", [*args[:6], "--resume", *args[6:]], tiny_datasets_root, timeout=240)
    assert resumed.returncode == 0, tail(resumed)
    assert "Stage 0: " in resumed.log and "exists, not retraining" in resumed.log
    assert stage0_weights.stat().st_mtime == stage0_mtime
    assert f"Stage 1: resuming at iteration {killed_at + 1} of 30" in resumed.log
    assert read_json(stage1 / "iteration_times.json")["start_iter"] == killed_at + 1
    final = safe_load(str(stage1 / "model_final.pth"))
    assert final["iteration"] == 29
    results = read_json(out / "results.json")["stages"]
    assert [s["stage"] for s in results] == [0, 1]
    # The stage's training time counts the killed process's iterations too (its checkpoint's):
    # more than those and the resumed process's steps together.
    resumed_steps = sum(read_json(stage1 / "iteration_times.json")["seconds"])
    assert 0 < trained_before_kill + resumed_steps < results[1]["train_time_s"] == recorded_training_seconds(final)


def test_a_resumed_trainer_adds_its_time_to_the_checkpoints():
    # As detectron2 saves and resumes a trainer: its hooks' states under "trainer".
    resumed = TrainerBase()
    resumed.register_hooks([_TrainingClock()])
    resumed.load_state_dict({"iteration": 9, "hooks": {"_TrainingClock": {"seconds": 100.0}}})
    resumed.before_train()
    assert 100.0 <= recorded_training_seconds({"trainer": resumed.state_dict()}) < 110.0
    assert recorded_training_seconds({"trainer": {"iteration": 9}}) is None  # a checkpoint of before


def _six_image_run(tmp_path, config_file=None):
    """A finished ilmil 1+1 run (8 iterations a stage, checkpoints after 4 and 8) on six
    images, the first of class 1, five of class 2 with boxes of five sizes, so the batches
    of stage 1 (2 images each) differ; its folder and arguments. ``config_file``: the
    detector's (default: the shapes Faster R-CNN)."""
    images = {f"{i}.jpg": (64, 48, _jpeg(64, 48)) for i in range(6)}  # one aspect-ratio group
    boxes = [(1, 1, [2.0, 2.0, 20.0, 20.0])] + [(i, 2, [2.0 * i, 4.0, 8.0 + 4 * i, 10.0 + 2 * i])
                                                  for i in range(2, 7)]
    json_path = _write_coco(tmp_path / "data", images, boxes)
    straight = tmp_path / "straight"
    data = ["ILMIL.DATA.TRAIN_JSON", str(json_path), "ILMIL.DATA.TRAIN_IMAGES", str(tmp_path / "data" / "images"),
            "ILMIL.DATA.TEST_JSON", str(json_path), "ILMIL.DATA.TEST_IMAGES", str(tmp_path / "data" / "images")]
    args = ["--dataset", "coco_json", "--stages", "1+1", "--method", "ilmil",
            *(["--config-file", config_file] if config_file else []), *TRAIN_OPTS, *data,
            "SOLVER.MAX_ITER", "8", "SOLVER.STEPS", "(6,)", "SOLVER.CHECKPOINT_PERIOD", "4"]
    proc = run_tool("train_incremental.py", ["--output-dir", str(straight), *args], tmp_path, timeout=300)
    assert proc.returncode == 0, tail(proc)
    return straight, args


@pytest.mark.parametrize("config_file", [None, os.path.join(CONFIGS_DIR, "shapes", "retinanet_R18_FPN_cpu.yaml")],
                         ids=["faster_rcnn", "retinanet"])
def test_a_resumed_stage_ends_exactly_where_the_uninterrupted_one_does(tmp_path, config_file):
    # Everything must come from the checkpoint or continue from it: the weights, the AdamW
    # moments, the LR schedule, the adaptive layer weights' running average (Faster R-CNN's
    # ilmil), RetinaNet's running loss normaliser, the random states, and the data stream
    # (stage 1's iterations 4-7 take the images of 4-7, not those of 0-3 again; no loader
    # workers, whose augmentations would start afresh).
    straight, args = _six_image_run(tmp_path, config_file)
    resumed = tmp_path / "resumed"

    # Killed after the checkpoint of iteration 3.
    stage1 = killed_copy(straight, resumed, 1, "model_0000003.pth")
    halfway = safe_load(str(stage1 / "model_0000003.pth"))
    assert halfway["trainer"]["_trainer"]["optimizer"]["state"], "the optimizer state is not checkpointed"
    if config_file is None:
        assert halfway["model"]["distiller.terms.feat.ema_distance"].sum() > 0
    else:
        assert halfway["loss_normalizer"][0]["loss_normalizer"] != 100  # moved from detectron2's initial value

    proc = run_tool("train_incremental.py", ["--output-dir", str(resumed), "--resume", *args], tmp_path, timeout=300)
    assert proc.returncode == 0, tail(proc)
    assert "Stage 1: resuming at iteration 4 of 8" in proc.log
    expected = safe_load(str(straight / "stage_1" / "model_final.pth"))["model"]
    got = safe_load(str(stage1 / "model_final.pth"))["model"]
    assert got.keys() == expected.keys()
    # RetinaNet within float noise: its resumed steps differ from the uninterrupted ones by ~1e-8,
    # which AdamW turns into up to 3e-5 where the gradients are near zero (p6, p7 on these tiny
    # images); the loss normaliser restarted at 100 (before it was checkpointed) moved 2.4e-3.
    tolerance = 0.0 if config_file is None else 2e-4
    differing = [key for key in expected if (got[key].double() - expected[key].double()).abs().max() > tolerance]
    assert not differing, f"differ after resuming: {differing[:5]}"


def test_a_one_by_one_map_of_one_image_stops_the_stage_or_its_evaluation_with_the_fix(tiny_datasets_root, tmp_path):
    # The RetinaNet kd student's GroupNorm (32 groups of its 32 channels) on p7 of a 128 px image.
    config = os.path.join(CONFIGS_DIR, "shapes", "kd", "retinanet_R18_FPN32_student_cpu.yaml")
    proc = run_tool("train_incremental.py", ["--config-file", config, "--stages", "4", "--output-dir",
                                             str(tmp_path / "run"), *SHAPES_OPTS, *TRAIN_OPTS,
                                             "SOLVER.IMS_PER_BATCH", "1"], tiny_datasets_root)
    assert proc.returncode == 1, tail(proc)
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("error: stage 0 stopped at iteration 0: a normalisation layer got one value per channel")
    assert "fix: larger inputs (INPUT.MIN_SIZE_TRAIN, now (128,)) or at least 2 images per process" in error
    # Nor in the training log (detectron2's train loop logs what stopped it): the message only.
    assert "Traceback" not in proc.log and "Training stopped: stage 0 stopped at iteration 0" in proc.log, tail(proc)

    # Two images per step train; the evaluation (one image at a time) meets the same 1 x 1 map,
    # which GroupNorm refuses outside training too.
    proc = run_tool("train_incremental.py", ["--config-file", config, "--stages", "4", "--output-dir",
                                             str(tmp_path / "run2"), *SHAPES_OPTS, *TRAIN_OPTS,
                                             "SOLVER.IMS_PER_BATCH", "2"], tiny_datasets_root)
    assert proc.returncode == 1, tail(proc)
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("error: evaluating ") and "a normalisation layer got one value per group" in error
    assert "fix: larger test inputs (INPUT.MIN_SIZE_TEST, now 128, and INPUT.MAX_SIZE_TEST, now 128)" in error
    assert "the trained models are kept: evaluate them with tools/eval_incremental.py --run-dir OUT" in error
    assert "Traceback" not in proc.stderr
    # As it says: the run's model at a test size whose coarsest map is 2 x 2 (the run folder
    # itself would refuse the new size: a test size is part of a run's identity).
    proc = run_tool("eval_incremental.py", ["--run-dir", str(tmp_path / "run2"), "INPUT.MIN_SIZE_TEST", "160",
                                            "INPUT.MAX_SIZE_TEST", "160"], tiny_datasets_root)
    assert proc.returncode == 0, tail(proc)
    assert "AP50" in proc.stdout, proc.stdout


# ---------------------------------------------------------------- non-finite loss


# An infinite loss weight makes the RPN losses infinite from the first iteration on.
INFINITE_LOSS = ["MODEL.RPN.LOSS_WEIGHT", "1e400"]


def test_a_non_finite_loss_stops_the_stage_naming_the_term_and_the_fix(tiny_datasets_root, tmp_path):
    out = tmp_path / "run"
    proc = run_tool("train_incremental.py", [
        "--stages", "2+2", "--output-dir", str(out), *SHAPES_OPTS, *TRAIN_OPTS, *INFINITE_LOSS], tiny_datasets_root)
    assert proc.returncode == 1, tail(proc)
    error = proc.stderr[proc.stderr.rindex("error: "):]
    assert "stage 0 stopped at iteration 0: loss not finite: loss_rpn_cls = inf, loss_rpn_loc = inf" in error
    assert "no checkpoint of this stage was saved yet" in error
    assert "SOLVER.BASE_LR (now 0.001)" in error and "SOLVER.CLIP_GRADIENTS.ENABLED True" in error
    assert "ILMIL.SKIP_NONFINITE_ITERS" in error
    assert not (out / "stage_0" / "model_final.pth").exists()


def test_bad_iterations_can_be_skipped_up_to_a_limit(tiny_datasets_root, tmp_path):
    proc = run_tool("train_incremental.py", [
        "--stages", "2+2", "--output-dir", str(tmp_path / "run"), *SHAPES_OPTS, *TRAIN_OPTS, *INFINITE_LOSS,
        "ILMIL.SKIP_NONFINITE_ITERS", "2"], tiny_datasets_root)
    assert proc.returncode == 1, tail(proc)
    assert "iteration 0: loss not finite" in proc.log and "iteration 1: loss not finite" in proc.log
    assert "iteration skipped (2 of ILMIL.SKIP_NONFINITE_ITERS 2)" in proc.log
    assert "stage 0 stopped at iteration 2: loss not finite" in proc.stderr
    assert "(after skipping 2 such iteration(s))" in proc.stderr


def test_diverged_weights_stop_the_stage_naming_the_last_losses(tiny_datasets_root, tmp_path):
    # A huge learning rate: the losses stay finite for an iteration or two, then the
    # weights overflow and detectron2's RPN finds non-finite proposals.
    proc = run_tool("train_incremental.py", [
        "--stages", "2+2", "--output-dir", str(tmp_path / "run"), *SHAPES_OPTS, *TRAIN_OPTS,
        "SOLVER.BASE_LR", "1e6", "SOLVER.WARMUP_ITERS", "0"], tiny_datasets_root)
    assert proc.returncode == 1, tail(proc)
    error = proc.stderr[proc.stderr.rindex("error: "):]
    assert "stage 0 stopped at iteration" in error and "SOLVER.BASE_LR (now 1e+06)" in error
    assert "loss_cls = " in error or "loss not finite" in error


# ------------------------------------------------------------- pre-flight checks


def _write_coco(folder, images, annotations, classes=("cat", "dog")):
    """A coco_json dataset: ``images`` maps file name -> (width, height, image bytes or None)."""
    os.makedirs(folder / "images", exist_ok=True)
    entries = []
    for image_id, (name, (width, height, data)) in enumerate(images.items(), start=1):
        entries.append({"id": image_id, "file_name": name, "width": width, "height": height})
        if data is not None:
            (folder / "images" / name).write_bytes(data)
    anns = [{"id": i, "image_id": image_id, "category_id": cat, "bbox": bbox, "iscrowd": 0}
            for i, (image_id, cat, bbox) in enumerate(annotations, start=1)]
    data = {"images": entries, "annotations": anns,
            "categories": [{"id": i, "name": n} for i, n in enumerate(classes, start=1)]}
    path = folder / "instances.json"
    path.write_text(json.dumps(data))
    return path


def _jpeg(width, height):
    import io

    from PIL import Image
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)).save(
        buffer, format="JPEG")
    return buffer.getvalue()


def _coco_cfg(json_path, output_dir, *opts, test_json=None):
    test_json = test_json or json_path
    return get_ilmil_cfg(opts=[
        "ILMIL.DATASET", "coco_json", "ILMIL.STAGES", "1+1",
        "ILMIL.DATA.TRAIN_JSON", str(json_path),
        "ILMIL.DATA.TRAIN_IMAGES", os.path.join(os.path.dirname(json_path), "images"),
        "ILMIL.DATA.TEST_JSON", str(test_json),
        "ILMIL.DATA.TEST_IMAGES", os.path.join(os.path.dirname(test_json), "images"),
        "OUTPUT_DIR", str(output_dir), *opts])


GOOD = [(1, 1, [2.0, 2.0, 20.0, 20.0]), (2, 2, [4.0, 4.0, 30.0, 20.0])]


def _good_images():
    return {"a.jpg": (64, 48, _jpeg(64, 48)), "b.jpg": (64, 48, _jpeg(64, 48))}


@pytest.mark.parametrize("problem, detail", [
    ("truncated", "does not decode"),
    ("wrong_size", "fields 'width', 'height' say 64x48, but image file"),
    ("missing", "image file missing"),
    ("not_finite", "is not finite"),
    ("outside", "lies outside the 64x48 image (ILMIL.DATA.CLIP_BOXES True clips such boxes)"),
    ("zero_area", "zero or negative area"),
    ("unknown_category", "unknown class"),
])
def test_each_bad_input_is_reported_with_its_file_and_the_fix(tmp_path, problem, detail):
    images, annotations = _good_images(), list(GOOD)
    if problem == "truncated":
        data = images["b.jpg"][2]
        images["b.jpg"] = (64, 48, data[: len(data) // 2])
    elif problem == "wrong_size":
        images["b.jpg"] = (64, 48, _jpeg(32, 32))
    elif problem == "missing":
        images["b.jpg"] = (64, 48, None)
    elif problem == "not_finite":
        annotations[1] = (2, 2, [4.0, float("nan"), 30.0, 20.0])
    elif problem == "outside":
        annotations[1] = (2, 2, [40.0, 4.0, 30.0, 20.0])  # x1 = 70 > 64
    elif problem == "zero_area":
        annotations[1] = (2, 2, [4.0, 4.0, 0.0, 20.0])
    elif problem == "unknown_category":
        annotations[1] = (2, 7, [4.0, 4.0, 30.0, 20.0])
    json_path = _write_coco(tmp_path, images, annotations)
    with pytest.raises(RunValidationError) as info:
        IncrementalRun(_coco_cfg(json_path, tmp_path / "out"))
    message = str(info.value)
    assert str(json_path) in message and detail in message
    if problem in ("truncated", "wrong_size", "missing"):
        assert str(tmp_path / "images" / "b.jpg") in message
    assert "fix: correct the files, or set ILMIL.DATA.SKIP_BAD_ANNOTATIONS True to skip them" in message


def test_clip_boxes_keeps_a_box_that_sticks_out(tmp_path):
    annotations = [GOOD[0], (2, 2, [40.0, 4.0, 30.0, 20.0])]
    json_path = _write_coco(tmp_path, _good_images(), annotations)
    run = IncrementalRun(_coco_cfg(json_path, tmp_path / "out", "ILMIL.DATA.CLIP_BOXES", True))
    assert [a["bbox"] for a in run.source.train[1]["annotations"]] == [[40.0, 4.0, 64.0, 24.0]]


def test_all_problems_come_in_one_report(tmp_path):
    images, annotations = _good_images(), [GOOD[0], (2, 2, [4.0, 4.0, 0.0, 20.0])]
    images["a.jpg"] = (64, 48, None)
    json_path = _write_coco(tmp_path / "train", images, annotations)
    test_json = _write_coco(tmp_path / "test", _good_images(), GOOD)
    not_a_folder = tmp_path / "file.txt"
    not_a_folder.write_text("x")
    teacher = tmp_path / "teacher.pth"
    teacher.write_bytes(b"truncated")
    cfg = _coco_cfg(json_path, not_a_folder / "out", test_json=test_json)
    with pytest.raises(RunValidationError) as info:
        IncrementalRun(cfg, start_stage=1, teacher_weights=str(teacher))
    message = str(info.value)
    assert message.startswith("5 problem(s) found before training; nothing was trained")
    assert "image file missing" in message and "zero or negative area" in message
    assert "stage 1 (dog): no image of the coco_json train data" in message  # its only box was the bad one
    assert "or correct their boxes if they are among the malformed annotations" in message
    assert f"--output-dir {not_a_folder / 'out'} is not writable" in message
    assert f"--teacher-weights: cannot read checkpoint {teacher}" in message


def test_a_long_problem_list_is_shortened_and_written_out_in_full(tmp_path):
    # 30 zero-area boxes: the message shows 20, the report file holds all 31 problems
    # (the 30 boxes and stage 1, whose boxes are all bad).
    bad = [(1 + i % 2, 2, [4.0, 4.0, 0.0, 20.0]) for i in range(30)]
    json_path = _write_coco(tmp_path / "train", _good_images(), [GOOD[0], *bad])
    test_json = _write_coco(tmp_path / "test", _good_images(), GOOD)
    out = tmp_path / "out"
    with pytest.raises(RunValidationError) as info:
        IncrementalRun(_coco_cfg(json_path, out, test_json=test_json))
    message = str(info.value)
    report = out / "preflight_problems.txt"
    assert message.startswith("31 problem(s) found before training")
    assert message.count("zero or negative area") == 20
    assert f"... and 11 more: all of them are in {report}" in message
    lines = report.read_text().splitlines()
    assert len(lines) == 31 and sum("zero or negative area" in line for line in lines) == 30

    # Fixed data: the stale report goes, training may start.
    fixed = _write_coco(tmp_path / "train", _good_images(), GOOD)
    IncrementalRun(_coco_cfg(fixed, out, test_json=test_json))
    assert not report.exists()


def test_a_stage_without_training_images_is_refused(tmp_path):
    # Only "cat" has boxes: stage 1 ("dog") has nothing to learn from.
    json_path = _write_coco(tmp_path, _good_images(), [GOOD[0]])
    with pytest.raises(RunValidationError, match=r"stage 1 \(dog\): no image of the coco_json train data"):
        IncrementalRun(_coco_cfg(json_path, tmp_path / "out"))


# ------------------------------------------------------------------ run folder


IDENTITY = {"dataset": "shapes", "dataset_fingerprint": "0123", "stages": "2+2", "class_order": ["a", "b"],
            "method": "finetune", "seed": 0}


def test_a_folder_of_another_run_is_refused_unless_forced(tmp_path):
    claim_run_dir(str(tmp_path), IDENTITY, seed=0)
    (tmp_path / "stage_0").mkdir()
    (tmp_path / "stage_0" / "model_final.pth").write_bytes(b"weights")
    (tmp_path / "teacher").mkdir()  # a compression run's evaluation of its teacher
    (tmp_path / "teacher" / "metrics_eval.json").write_text('{"AP50": 50.0}')
    (tmp_path / "notes.txt").write_text("mine")
    claim_run_dir(str(tmp_path), IDENTITY, seed=0)  # the same run: accepted, outputs kept
    assert (tmp_path / "stage_0" / "model_final.pth").exists()
    other = dict(IDENTITY, stages="3+1", method="ilmil")
    with pytest.raises(RunDirError) as info:
        claim_run_dir(str(tmp_path), other, seed=0)
    message = str(info.value)
    assert str(tmp_path / "run.json") in message
    assert "stages: '2+2' there, '3+1' now" in message and "method: 'finetune' there, 'ilmil' now" in message
    assert "--force" in message
    record = claim_run_dir(str(tmp_path), other, seed=0, force=True)
    assert not (tmp_path / "stage_0").exists() and (tmp_path / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "teacher").exists()  # another teacher's figures would be reported as this one's
    assert read_json(tmp_path / "run.json")["identity"] == other == record["identity"]


@pytest.mark.parametrize("record", ["[]", '{"identity": "x"}', '{"seed": 0}'])
def test_a_hand_edited_record_is_one_error_and_one_without_its_date_is_still_read(tmp_path, record):
    (tmp_path / "run.json").write_text(record)
    with pytest.raises(RunDirError, match=r"run.json is not a run record \(no \"identity\" object: edited by hand\?\); "
                                          "fix: choose another --output-dir, or add --force"):
        claim_run_dir(str(tmp_path), IDENTITY, seed=0)
    (tmp_path / "run.json").write_text(json.dumps({"identity": IDENTITY}))  # "created" deleted
    assert claim_run_dir(str(tmp_path), IDENTITY, seed=0)["created"]


def test_a_changed_config_is_named_key_by_key_and_an_older_record_is_not_held_to_it(tmp_path):
    config = {"SOLVER.BASE_LR": 0.02, "ILMIL.DISTILL.RCN.WEIGHT": 1.0, "INPUT.MIN_SIZE_TEST": 256}
    claim_run_dir(str(tmp_path), IDENTITY, seed=0)  # a record from before the config was part of it
    claim_run_dir(str(tmp_path), dict(IDENTITY, config=config), seed=0)
    changed = dict(config, **{"ILMIL.DISTILL.RCN.WEIGHT": 0.25, "INPUT.MIN_SIZE_TEST": 128})
    with pytest.raises(RunDirError) as info:
        claim_run_dir(str(tmp_path), dict(IDENTITY, config=changed), seed=0)
    message = str(info.value)
    assert "ILMIL.DISTILL.RCN.WEIGHT: 1.0 there, 0.25 now; INPUT.MIN_SIZE_TEST: 256 there, 128 now" in message
    assert "SOLVER.BASE_LR" not in message


def test_the_settings_of_a_term_left_off_are_not_compared(tmp_path):
    """A config whose term the run never switches on (YOLO's attention layers, named since)
    is the same run; switched on, or read by a pruned model's fine-tuning, they count."""
    off = {"ILMIL.DISTILL.AT.ENABLED": False, "ILMIL.DISTILL.AT.LAYERS": ["res3", "res4"],
           "ILMIL.DISTILL.FEAT.ENABLED": False, "ILMIL.DISTILL.FEAT.LAYERS": ["res4"],
           "ILMIL.PRUNING.FINETUNE_TEACHER": False}
    claim_run_dir(str(tmp_path), dict(IDENTITY, config=off), seed=0)
    renamed = dict(off, **{"ILMIL.DISTILL.AT.LAYERS": ["dark3", "dark4"], "ILMIL.DISTILL.FEAT.LAYERS": ["dark4"]})
    claim_run_dir(str(tmp_path), dict(IDENTITY, config=renamed), seed=0)
    for changed, named in ((dict(off, **{"ILMIL.DISTILL.AT.ENABLED": True}), "ILMIL.DISTILL.AT.ENABLED: False there"),
                           (dict(renamed, **{"ILMIL.PRUNING.FINETUNE_TEACHER": True}),
                            "ILMIL.DISTILL.FEAT.LAYERS: ['res4'] there, ['dark4'] now")):
        (tmp_path / "run.json").write_text(json.dumps({"identity": dict(IDENTITY, config=dict(
            off, **{"ILMIL.PRUNING.FINETUNE_TEACHER": changed["ILMIL.PRUNING.FINETUNE_TEACHER"]}))}))
        with pytest.raises(RunDirError, match=re.escape(named)):
            claim_run_dir(str(tmp_path), dict(IDENTITY, config=changed), seed=0)


def test_a_key_added_since_the_record_counts_only_when_it_leaves_its_default(tmp_path):
    """A toolkit upgrade that adds a config key must not lock a user out of resuming a
    run; setting that key to something else is still another run."""
    record = json.dumps({"identity": dict(IDENTITY, config={"SOLVER.BASE_LR": 0.02}), "created": "2026-11-30"})
    (tmp_path / "run.json").write_text(record)
    added_at_default = {"SOLVER.BASE_LR": 0.02, "ILMIL.DISTILL.RCN.TEMPERATURE": 2.0}
    claim_run_dir(str(tmp_path), dict(IDENTITY, config=added_at_default), seed=0)
    (tmp_path / "run.json").write_text(record)
    added_elsewhere = {"SOLVER.BASE_LR": 0.02, "ILMIL.DISTILL.RCN.TEMPERATURE": 4.0}
    with pytest.raises(RunDirError, match="ILMIL.DISTILL.RCN.TEMPERATURE: None there, 4.0 now"):
        claim_run_dir(str(tmp_path), dict(IDENTITY, config=added_elsewhere), seed=0)


def _two_image_source(root, crowd=0, swapped=False):
    """Two images in sub-folders x/ and y/, one box on the first."""
    first, second = ("y", "x") if swapped else ("x", "y")
    records = [{"file_name": str(root / first / "a.jpg"), "width": 16, "height": 16,
                "annotations": [{"category_name": "cat", "bbox": [1.0, 1.0, 9.0, 9.0], "iscrowd": crowd}]},
               {"file_name": str(root / second / "a.jpg"), "width": 16, "height": 16, "annotations": []}]
    return DatasetSource("coco_json", ("cat",), records, [], False)


def test_the_content_fingerprint_tells_changed_data_from_a_moved_folder(tmp_path, monkeypatch):
    for seed, folder in enumerate("xy"):
        (tmp_path / "data" / folder).mkdir(parents=True)
        noise = np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(noise).save(tmp_path / "data" / folder / "a.jpg")
    before = dataset_content_fingerprint(_two_image_source(tmp_path / "data"))
    shutil.copytree(tmp_path / "data", tmp_path / "moved")
    assert dataset_content_fingerprint(_two_image_source(tmp_path / "moved")) == before
    monkeypatch.chdir(tmp_path)  # relative file names (a relative image folder) are the same files
    relative = _two_image_source(Path("data"))
    assert dataset_content_fingerprint(DatasetSource("coco_json", ("cat",), relative.train,
                                                     _two_image_source(tmp_path / "data").train, False)) \
        == dataset_content_fingerprint(DatasetSource("coco_json", ("cat",), *[_two_image_source(tmp_path / "data")
                                                                              .train] * 2, False))
    # What the first fingerprint (image names and boxes) does not see:
    changed = [_two_image_source(tmp_path / "data", crowd=1), _two_image_source(tmp_path / "data", swapped=True)]
    assert all(dataset_fingerprint(s) == dataset_fingerprint(_two_image_source(tmp_path / "data")) for s in changed)
    assert all(dataset_content_fingerprint(s) != before for s in changed)
    Image.new("RGB", (16, 16), (9, 9, 9)).save(tmp_path / "data" / "x" / "a.jpg")  # another picture, same name
    assert dataset_content_fingerprint(_two_image_source(tmp_path / "data")) != before


def test_the_cli_refuses_another_run_and_records_its_own(tiny_datasets_root, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    claim_run_dir(str(out), IDENTITY, seed=0)
    args = ["--stages", "2+2", "--output-dir", str(out), *SHAPES_OPTS, *TRAIN_OPTS]
    proc = run_tool("train_incremental.py", args, tiny_datasets_root)
    assert proc.returncode == 1, tail(proc)
    assert "error: " in proc.stderr and "Traceback" not in proc.stderr
    assert "dataset_fingerprint" in proc.stderr and not (out / "stage_0").exists()
    proc = run_tool("train_incremental.py", ["--force", *args], tiny_datasets_root)
    assert proc.returncode == 0, tail(proc)
    record = read_json(out / "run.json")
    assert record["identity"]["stages"] == "2+2" and record["identity"]["class_order"] == shape_class_names(20)
    assert record["seed"] == 0 and "--force" in record["command"] and record["ilmil_version"]
    # Where it runs and how often it checkpoints may change; what the stages learn may not.
    proc = run_tool("train_incremental.py", [*args, "SOLVER.CHECKPOINT_PERIOD", "2", "MODEL.DEVICE", "cpu"],
                    tiny_datasets_root)
    assert proc.returncode == 0 and "exists, not retraining" in proc.log, tail(proc)
    base_lr = record["identity"]["config"]["SOLVER.BASE_LR"]
    proc = run_tool("train_incremental.py", [*args, "SOLVER.BASE_LR", "0.005"], tiny_datasets_root)
    assert proc.returncode == 1, tail(proc)
    assert f"SOLVER.BASE_LR: {base_lr!r} there, 0.005 now" in proc.stderr


def test_a_kill_between_the_last_checkpoint_and_model_final_is_resumed(tmp_path):
    # The last iteration's checkpoint and model_final are written one after the other; killed
    # in between, the resumed stage has no iteration left to train.
    straight, args = _six_image_run(tmp_path)
    resumed = tmp_path / "resumed"
    stage1 = killed_copy(straight, resumed, 1, "model_0000007.pth")
    (resumed / "results.json").unlink()

    proc = run_tool("train_incremental.py", ["--output-dir", str(resumed), "--resume", *args], tmp_path, timeout=300)
    assert proc.returncode == 0, tail(proc)
    assert "Stage 1: resuming at iteration 8 of 8" in proc.log
    final = safe_load(str(stage1 / "model_final.pth"))
    assert final["iteration"] == 7
    expected = safe_load(str(straight / "stage_1" / "model_final.pth"))["model"]
    assert all(torch.equal(final["model"][key], expected[key]) for key in expected)
    assert [s["stage"] for s in read_json(resumed / "results.json")["stages"]] == [0, 1]
