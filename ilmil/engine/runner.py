"""The stage runner: trains the stages of a schedule in order, each starting from
the previous stage's model (box predictor expanded), and evaluates after each.

Output layout (``OUT``)::

    stages.json            the schedule: per stage its classes and image counts
    config.yaml            the resolved config
    results.json           per stage: AP, AP50, AP_old, AP50_old, AP_new, AP50_new, per_class,
                           forgetting; written after every stage
    stage_K/model_final.pth, metrics.json (event log), metrics_eval.json, detections.json
    per_class_ap*.csv, *.png, report.md    at the end (ilmil/evaluation/run_outputs.py)

A stage whose ``model_final.pth`` exists is not retrained on a re-run into the
same folder, and one whose evaluation is saved is not re-evaluated.
"""
import json
import logging
import math
import os
import time

import yaml

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng

from ..config import METHOD_PRESETS, uses_teacher
from ..data import build_schedule, load_dataset_source, parse_stage_spec, register_stage_datasets
from ..data.stages import Stage, StageSpecError
from ..evaluation import evaluate_model, finalize_run
from ..evaluation.run_outputs import write_json
from ..modeling import IncrementalRCNN, load_checked_checkpoint, load_expanded
from .trainer import IncrementalTrainer

__all__ = ["IncrementalRun", "run_incremental", "resolve_class_order"]

logger = logging.getLogger("ilmil")


def resolve_class_order(custom_order, dataset_classes):
    """The class order of the schedule: the custom one if given, else the dataset's."""
    if not custom_order:
        return tuple(dataset_classes)
    unknown = [c for c in custom_order if c not in dataset_classes]
    if unknown:
        raise StageSpecError(
            f"ILMIL.CLASS_ORDER names classes not in the dataset: {', '.join(unknown)}; "
            f"the dataset has: {', '.join(dataset_classes)}"
        )
    if len(set(custom_order)) != len(custom_order):
        raise StageSpecError("ILMIL.CLASS_ORDER lists a class twice")
    return tuple(custom_order)


class IncrementalRun:
    """One class-incremental run: a config, its schedule and its output folder."""

    def __init__(self, cfg, start_stage=0, teacher_weights=None):
        """
        Args:
            cfg: a config from ``get_ilmil_cfg``; ``OUTPUT_DIR`` is the run folder.
            start_stage, teacher_weights: begin at stage ``start_stage`` > 0 from a
                user-given model of the earlier stages' classes instead of training them.
        """
        self.cfg = cfg
        self.output_dir = cfg.OUTPUT_DIR
        self.method = cfg.ILMIL.METHOD
        if self.method not in METHOD_PRESETS:
            raise ValueError(f"unknown method {self.method!r}; choose one of: {', '.join(METHOD_PRESETS)}")
        meta_arch = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)
        if uses_teacher(cfg) and not issubclass(meta_arch, IncrementalRCNN):
            raise ValueError(
                f"method {self.method} needs MODEL.META_ARCHITECTURE IncrementalRCNN (or a subclass), "
                f"got {cfg.MODEL.META_ARCHITECTURE}"
            )
        self.source = load_dataset_source(cfg)
        class_order = resolve_class_order(list(cfg.ILMIL.CLASS_ORDER), self.source.class_names)
        counts = parse_stage_spec(cfg.ILMIL.STAGES, len(class_order))
        if self.method == "joint":
            # The upper bound: every class of the spec at once, the same total budget.
            self.schedule = [Stage(0, (), tuple(class_order[: sum(counts)]))]
            self.iter_scale = len(counts)
        else:
            self.schedule = build_schedule(class_order, counts)
            self.iter_scale = 1
        if not 0 <= start_stage < len(self.schedule):
            raise StageSpecError(f"--start-stage {start_stage}: the schedule has stages 0..{len(self.schedule) - 1}")
        if start_stage > 0 and not teacher_weights:
            raise ValueError(f"--start-stage {start_stage} needs --teacher-weights: the model of stages 0..{start_stage - 1}")
        if teacher_weights:  # refuse a wrong start model before any work
            load_checked_checkpoint(teacher_weights, self.schedule[start_stage].old_classes)
        self.start_stage = start_stage
        self.teacher_weights = teacher_weights
        self.dataset_prefix = f"ilmil_{self.source.name}_{cfg.ILMIL.STAGES}_{self.method}"
        self.registered = [register_stage_datasets(self.dataset_prefix, self.source, s) for s in self.schedule]

    def stage_dir(self, stage):
        return os.path.join(self.output_dir, f"stage_{stage.index}")

    def stage_cfg(self, stage, teacher_weights=""):
        """The config of one stage; ``teacher_weights`` is given for training only."""
        train_name, test_name = self.registered[stage.index]
        cfg = self.cfg.clone()
        cfg.defrost()
        cfg.MODEL.ROI_HEADS.NUM_CLASSES = len(stage.seen_classes)
        cfg.DATASETS.TRAIN = (train_name,)
        cfg.DATASETS.TEST = (test_name,)
        cfg.OUTPUT_DIR = self.stage_dir(stage)
        cfg.SOLVER.MAX_ITER = self.cfg.SOLVER.MAX_ITER * self.iter_scale
        cfg.SOLVER.STEPS = tuple(s * self.iter_scale for s in self.cfg.SOLVER.STEPS)
        if stage.index > 0:
            cfg.MODEL.WEIGHTS = ""  # the previous stage's model is loaded (expanded) instead
        cfg.ILMIL.TEACHER.WEIGHTS = teacher_weights if uses_teacher(cfg) else ""
        cfg.freeze()
        return cfg

    def write_schedule(self):
        stages = []
        for stage, (train_name, test_name) in zip(self.schedule, self.registered):
            stages.append(
                {
                    "index": stage.index,
                    "old_classes": list(stage.old_classes),
                    "new_classes": list(stage.new_classes),
                    "num_train_images": len(DatasetCatalog.get(train_name)),
                    "num_test_images": len(DatasetCatalog.get(test_name)),
                }
            )
        write_json(os.path.join(self.output_dir, "stages.json"), {"method": self.method, "stages": stages})
        with open(os.path.join(self.output_dir, "config.yaml"), "w") as f:
            f.write(self.cfg.dump())
        return stages

    def train_stage(self, stage, previous_weights):
        cfg = self.stage_cfg(stage, teacher_weights=previous_weights or "")
        seed_all_rng(None if cfg.SEED < 0 else cfg.SEED + stage.index)
        trainer = IncrementalTrainer(cfg)
        if previous_weights is None:
            trainer.resume_or_load(resume=False)
        else:
            old_state, _ = load_checked_checkpoint(previous_weights, stage.old_classes)
            model = getattr(trainer.model, "module", trainer.model)  # unwrap DistributedDataParallel
            load_expanded(model, old_state, len(stage.old_classes))
            if cfg.ILMIL.FREEZE_BN_STATS and isinstance(model, IncrementalRCNN):
                model.freeze_bn_stats()
        trainer.train()
        return trainer.model

    def evaluate_stage(self, stage, model):
        return evaluate_model(self.stage_cfg(stage), model, output_dir=self.stage_dir(stage))

    def run(self):
        os.makedirs(self.output_dir, exist_ok=True)
        stages_info = self.write_schedule()
        results_path = os.path.join(self.output_dir, "results.json")
        results = {
            "dataset": self.source.name,
            "stages_spec": self.cfg.ILMIL.STAGES,
            "method": self.method,
            "seed": self.cfg.SEED,
            "config": yaml.safe_load(self.cfg.dump()),
            "stages": [],
        }
        previous_weights = self.teacher_weights
        run_start = time.perf_counter()
        for stage, info in zip(self.schedule, stages_info):
            if stage.index < self.start_stage:
                continue
            stage_dir = self.stage_dir(stage)
            final_weights = os.path.join(stage_dir, "model_final.pth")
            metrics_path = os.path.join(stage_dir, "metrics_eval.json")
            logger.info(
                "Stage %d (of 0..%d): %d old + %d new classes, %d train images (elapsed %.0f s)",
                stage.index, len(self.schedule) - 1, len(stage.old_classes), len(stage.new_classes),
                info["num_train_images"], time.perf_counter() - run_start,
            )
            stage_start = time.perf_counter()
            model = None
            if os.path.isfile(final_weights):
                logger.info("Stage %d: %s exists, not retraining", stage.index, final_weights)
            else:
                model = self.train_stage(stage, previous_weights)
            train_time = time.perf_counter() - stage_start
            if os.path.isfile(metrics_path):
                with open(metrics_path) as f:
                    metrics = json.load(f)
            else:
                if model is None:
                    model = self._load_stage_model(stage, final_weights)
                eval_start = time.perf_counter()
                metrics = self.evaluate_stage(stage, model)
                metrics["eval_time_s"] = time.perf_counter() - eval_start
                metrics["train_time_s"] = train_time
                if comm.is_main_process():
                    write_json(metrics_path, metrics)
            previous_weights = final_weights
            if not comm.is_main_process():
                continue
            entry = {"stage": stage.index, **info, **metrics}
            results["stages"].append(entry)
            write_json(results_path, results)
            logger.info(
                "Stage %d done: AP50_old %s, AP50_new %s, AP50 %s (stage %.0f s, elapsed %.0f s)",
                stage.index, _fmt(entry["AP50_old"]), _fmt(entry["AP50_new"]), _fmt(entry["AP50"]),
                time.perf_counter() - stage_start, time.perf_counter() - run_start,
            )
        if comm.is_main_process():
            results = finalize_run(self.output_dir)
        return results

    def _load_stage_model(self, stage, weights):
        cfg = self.stage_cfg(stage)
        model = IncrementalTrainer.build_model(cfg)
        DetectionCheckpointer(model).load(weights)
        return model


def _fmt(value):
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.1f}"


def run_incremental(cfg, start_stage=0, teacher_weights=None):
    """Run every stage of ``cfg``'s schedule; returns the results dict (results.json)."""
    return IncrementalRun(cfg, start_stage, teacher_weights).run()
