"""Running models over stage test sets: the stage runner's evaluation after each
stage, and re-evaluation of a finished run or of one checkpoint (tools/eval_incremental.py).

Both go through :func:`evaluate_model` (detectron2's test loader and
``inference_on_dataset`` with :class:`IncrementalEvaluator`), so a re-evaluation of
a run's saved models reproduces the numbers of its results.json.

Re-evaluating a run rebuilds each stage from the run folder: the config from
``config.yaml``, the stage's classes from ``stages.json``, its weights from
``stage_K/model_final.pth`` (for the stage before ``--start-stage``, the given
model that results.json names), and its test set (all test images, ground truth
of the classes seen so far) from the dataset the config names.
"""
import json
import logging
import os
import time

import yaml
from tqdm import tqdm

from detectron2.data import build_detection_test_loader
from detectron2.evaluation import inference_on_dataset

from ..checkpoint import (CheckpointClassesError, checkpoint_class_names, is_onnx_file, load_checked_checkpoint,
                          safe_load)
from ..config import check_test_input, derived_cfg, get_ilmil_cfg, num_classes_changes
from ..data import DatasetError, load_dataset_source, register_stage_datasets
from ..data.stages import Stage, StageSpecError
from ..deploy import OnnxDetector
from ..modeling import TooSmallMapError, load_detector, one_value_per_channel
from .forgetting import add_forgetting
from .incremental_evaluator import IncrementalEvaluator
from .run_outputs import NotARunError, read_results, write_run_outputs

__all__ = ["NotARunError", "evaluate_checkpoint", "evaluate_model", "evaluate_run"]

logger = logging.getLogger(__name__)


def evaluate_model(cfg, model, output_dir=None, progress=False):
    """Old/new/per-class AP of ``model`` on ``cfg.DATASETS.TEST[0]`` (a registered stage test set).

    With ``output_dir`` the detections are saved there (``detections.json``); with
    ``progress`` a tqdm bar counts the images. Only the main process gets the
    numbers, the others an empty dict.
    """
    dataset_name = cfg.DATASETS.TEST[0]
    loader = build_detection_test_loader(cfg, dataset_name)
    if progress:
        loader = tqdm(loader, desc=f"evaluating {dataset_name}", unit="image", dynamic_ncols=True)
    try:
        return inference_on_dataset(model, loader, IncrementalEvaluator(dataset_name, output_dir)).get("bbox", {})
    except ValueError as e:
        input_size = one_value_per_channel(e)
        if input_size is None:
            raise
        raise TooSmallMapError(
            f"evaluating {dataset_name}: a normalisation layer got one value per group ({input_size}): a 1 x 1 "
            f"feature map at the test size; fix: larger test inputs (INPUT.MIN_SIZE_TEST, now "
            f"{cfg.INPUT.MIN_SIZE_TEST}, and INPUT.MAX_SIZE_TEST, now {cfg.INPUT.MAX_SIZE_TEST}); the trained models "
            f"are kept: evaluate them with tools/eval_incremental.py --run-dir OUT (or --weights W) "
            f"INPUT.MIN_SIZE_TEST N INPUT.MAX_SIZE_TEST N") from None


def _load_model(cfg, weights, class_names):
    """The detector of ``cfg`` with ``weights``, refusing a checkpoint of other classes
    (detectron2 would only warn and leave the mismatched head random). An exported
    ``.onnx`` file runs through ONNX Runtime."""
    if is_onnx_file(weights):
        detector = OnnxDetector(weights)
        if list(detector.class_names) != list(class_names):
            raise CheckpointClassesError(f"{weights} detects {', '.join(detector.class_names)}, not the "
                                         f"{len(class_names)} classes it is evaluated on; fix: fix --classes")
        return detector
    checkpoint, _ = load_checked_checkpoint(
        weights,
        class_names,
        error=CheckpointClassesError,
        use="it is evaluated on the {n} classes",
        fix="fix --classes (order matters) or give the matching checkpoint",
    )
    return load_detector(cfg, weights, checkpoint)


def _evaluate_stage(cfg, source, stage, weights, output_dir, progress):
    """Metrics of one stage's model on its test set (``register_stage_datasets``)."""
    _, test_name = register_stage_datasets(f"ilmil_eval_{source.name}", source, stage)
    cfg = derived_cfg(cfg, {
        **num_classes_changes(len(stage.seen_classes)),
        "DATASETS.TEST": (test_name,),
        "MODEL.WEIGHTS": "",  # loaded by _load_model, after its class check
        "ILMIL.TEACHER.WEIGHTS": "",  # evaluation needs no teacher
    })
    model = _load_model(cfg, weights, stage.seen_classes)
    start = time.perf_counter()
    metrics = evaluate_model(cfg, model, output_dir, progress)
    metrics["eval_time_s"] = time.perf_counter() - start
    return metrics


def _results(cfg, entries, **extra):
    """A results.json dict, with the keys the stage runner writes."""
    return {
        "dataset": cfg.ILMIL.DATASET,
        "stages_spec": cfg.ILMIL.STAGES,
        "method": cfg.ILMIL.METHOD,
        "seed": cfg.SEED,
        "config": yaml.safe_load(cfg.dump()),
        **extra,
        "stages": entries,
    }


def _finish(results, output_dir):
    """Forgetting keys added; with ``output_dir``, all run outputs written there."""
    if output_dir:
        return write_run_outputs(results, output_dir)
    return add_forgetting(results)


def _stage_output_dir(output_dir, index):
    return os.path.join(output_dir, f"stage_{index}") if output_dir else None


def evaluate_run(run_dir, output_dir=None, stages=None, opts=(), progress=True):
    """Re-evaluate the saved stage models of the run folder ``run_dir``.

    Args:
        output_dir: where to write results.json, per-stage detections, CSVs, plots
            and report.md (as a run folder has them); None writes nothing.
        stages: stage indices to evaluate; default every stage with a ``model_final.pth``.
        opts: ``KEY VALUE`` config overrides (e.g. ``MODEL.DEVICE cuda``).

    Returns the results dict (results.json format, with forgetting keys).
    """
    schedule = _run_schedule(run_dir)
    cfg = get_ilmil_cfg(os.path.join(run_dir, "config.yaml"), opts)
    check_test_input(cfg)
    weights = {info["index"]: os.path.join(run_dir, f"stage_{info['index']}", "model_final.pth") for info in schedule}
    weights.update(_given_models(run_dir))
    if stages is None:
        stages = [k for k in weights if os.path.isfile(weights[k])]
        if not stages:
            raise NotARunError(f"--run-dir {run_dir}: no stage has a model_final.pth yet; fix: let the run "
                              "finish its first stage (or --resume it)")
    unknown = [k for k in stages if k not in weights]
    if unknown:
        raise NotARunError(f"--stages {','.join(map(str, unknown))}: {run_dir} has stages {sorted(weights)}; "
                          "fix: choose among those")
    source = load_dataset_source(cfg, splits=("test",))
    entries = []
    for info in schedule:
        if info["index"] not in stages:
            continue
        stage = Stage(info["index"], tuple(info["old_classes"]), tuple(info["new_classes"]))
        metrics = _evaluate_stage(cfg, source, stage, weights[stage.index],
                                  _stage_output_dir(output_dir, stage.index), progress)
        entries.append({"stage": stage.index, **info, **metrics})
    return _finish(_results(cfg, entries, evaluated_run=os.path.abspath(run_dir)), output_dir)


def _given_models(run_dir):
    """``{stage: weights}`` of the stage a ``--start-stage`` run was given instead of
    training it (results.json records its weights), if any."""
    try:
        entries = read_results(run_dir).get("stages", [])
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return {}  # no stage finished yet, or not readable: the stage folders tell
    return {e["stage"]: e["weights"] for e in entries if isinstance(e, dict) and "stage" in e and "weights" in e}


def _run_schedule(run_dir):
    """The stages of ``stages.json`` in the run folder ``run_dir``, refused (naming the
    file) when the folder is not a run folder or the file is not a schedule."""
    fix = "fix: give the --output-dir of a tools/train_incremental.py run"
    if not os.path.isdir(run_dir):
        raise NotARunError(f"--run-dir {run_dir}: no such folder; {fix}")
    path = os.path.join(run_dir, "stages.json")
    for needed in (path, os.path.join(run_dir, "config.yaml")):
        if not os.path.isfile(needed):
            raise NotARunError(f"--run-dir {run_dir}: {os.path.basename(needed)} not found, not a run folder; {fix}")
    try:
        with open(path) as f:
            schedule = json.load(f).get("stages")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise NotARunError(f"{path} is not a run's schedule ({e}); {fix}") from None
    if not isinstance(schedule, list) or not all(
            isinstance(s, dict) and {"index", "old_classes", "new_classes"} <= s.keys() for s in schedule):
        raise NotARunError(f"{path}: field 'stages' is not a list of stages with index, old_classes and "
                          f"new_classes; {fix}")
    return schedule


def evaluate_checkpoint(cfg, weights, classes=None, num_old=0, output_dir=None, progress=True):
    """Evaluate one checkpoint on the test set of ``cfg``'s dataset, ground truth of ``classes``.

    Args:
        weights: an ilmil checkpoint, or an ONNX file of ``tools/export.py`` (run by
            ONNX Runtime: its AP is measured, not assumed).
        classes: class names in the model's logit order; default the names the
            checkpoint (or the ONNX file) records.
        num_old: the first ``num_old`` classes count as old (AP_old), the rest as new.
        output_dir: as for :func:`evaluate_run` (its ``stage_0/`` gets the detections).
    """
    if classes is None:
        classes = OnnxDetector(weights).class_names if is_onnx_file(weights) else \
            checkpoint_class_names(safe_load(weights))
        if classes is None:
            raise CheckpointClassesError(f"{weights} does not record its classes: give them (--classes a,b,c)")
    if not 0 <= num_old <= len(classes):
        raise StageSpecError(f"--num-old {num_old}: there are {len(classes)} classes; fix: give 0..{len(classes)}")
    check_test_input(cfg)
    source = load_dataset_source(cfg, splits=("test",))
    unknown = [c for c in classes if c not in source.class_names]
    if unknown:
        raise DatasetError(f"classes not in the {source.name} data: {', '.join(unknown)}; it has: "
                           f"{', '.join(source.class_names)}; fix: --classes, or the --dataset / --config-file "
                           "of the model's data")
    stage = Stage(0, tuple(classes[:num_old]), tuple(classes[num_old:]))
    metrics = _evaluate_stage(cfg, source, stage, weights, _stage_output_dir(output_dir, 0), progress)
    info = {"index": 0, "old_classes": list(stage.old_classes), "new_classes": list(stage.new_classes),
            "num_test_images": len(source.test)}
    results = _results(cfg, [{"stage": 0, **info, **metrics}], weights=os.path.abspath(weights))
    results["stages_spec"] = f"{num_old}+{len(classes) - num_old}" if num_old else str(len(classes))
    return _finish(results, output_dir)
