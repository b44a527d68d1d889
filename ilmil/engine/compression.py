"""Compression runs: a teacher distilled into a student of the same classes.

A compression run is a run of one stage of all its classes (``--stages N``):
the student trains from its config's ``MODEL.WEIGHTS`` (from scratch on shapes)
with the given teacher (``ILMIL.TEACHER.CONFIG_FILE`` and ``--teacher-weights``:
any detector of the toolkit, of any depth or width) and the terms its config
enables (``ILMIL.DISTILL``); with no term enabled it is the undistilled student.
It writes what an incremental run writes (results.json, report.md, per-class AP,
plots), resumes like one, and evaluates the teacher on the same test data
(``results.json["teacher"]``), so one folder compares the two.
"""
import json
import logging
import os

from detectron2.utils import comm

from ..checkpoint import CheckpointClassesError, CheckpointError, load_checked_checkpoint
from ..config import ConfigError, derived_cfg
from ..data import with_every_class_old
from ..data.stages import StageSpecError
from ..distill import build_teacher
from ..evaluation import evaluate_model, finalize_run
from ..evaluation.run_outputs import write_json
from .run_dir import RunValidationError
from .runner import IncrementalRun

__all__ = ["CompressionRun", "run_compression"]

logger = logging.getLogger("ilmil")

TEACHER_DIR = "teacher"


class CompressionRun(IncrementalRun):
    """One stage of all classes, distilled from ``teacher_weights`` (see the module docstring)."""

    def __init__(self, cfg, teacher_weights, resume=False, force=False):
        if not teacher_weights:
            raise ConfigError("a compression run needs --teacher-weights: the trained teacher's checkpoint; "
                              "fix: train one (tools/train_incremental.py --stages N) and give its model_final.pth")
        super().__init__(cfg, resume=resume, force=force)
        if len(self.schedule) != 1:
            raise StageSpecError(f"ILMIL.STAGES {cfg.ILMIL.STAGES}: a compression run trains one stage of all its "
                                 "classes; fix: --stages N, e.g. --stages 20")
        stage = self.schedule[0]
        try:  # the same classes, and weights that fit the teacher's own config
            load_checked_checkpoint(teacher_weights, stage.seen_classes, error=CheckpointClassesError,
                                    use="the student learns the {n} classes",
                                    fix="give a teacher of the student's classes, or --stages / --class-order "
                                        "that name the teacher's")
            build_teacher(self.stage_cfg(stage), teacher_weights, stage.seen_classes)
        except (CheckpointClassesError, CheckpointError, ConfigError) as e:
            raise RunValidationError([f"--teacher-weights: {e}"]) from None
        train_name, test_name = self.registered[0]
        # The student checks its teacher against the old classes of its data: here, all of them.
        self.registered[0] = (with_every_class_old(train_name), test_name)
        self.compression_teacher = teacher_weights

    def identity(self):
        return {**super().identity(), "teacher_weights": os.path.abspath(self.compression_teacher)}

    def stage_models(self, stage, previous_weights, pruned_weights=None):
        """The given teacher teaches; the student starts from its config's ``MODEL.WEIGHTS``."""
        return self.compression_teacher, None

    def evaluate_teacher(self):
        """The teacher's metrics on the stage's test data (saved under ``teacher/``, reused)."""
        folder = os.path.join(self.output_dir, TEACHER_DIR)
        path = os.path.join(folder, "metrics_eval.json")
        if os.path.isfile(path):
            with open(path) as f:
                return json.load(f)
        stage = self.schedule[0]
        os.makedirs(folder, exist_ok=True)
        cfg = derived_cfg(self.stage_cfg(stage), {"OUTPUT_DIR": folder})
        teacher = build_teacher(cfg, self.compression_teacher, stage.seen_classes)
        logger.info("Evaluating the teacher %s on the student's test data", self.compression_teacher)
        metrics = evaluate_model(cfg, teacher, output_dir=folder)  # every process takes part
        if comm.is_main_process():
            write_json(path, metrics)
        return metrics

    def run(self):
        results = super().run()
        teacher = self.evaluate_teacher()
        if not comm.is_main_process():
            return results
        results["teacher"] = {"weights": self.compression_teacher,
                              "config_file": self.cfg.ILMIL.TEACHER.CONFIG_FILE or "(the student's)",
                              **{k: v for k, v in teacher.items() if k in ("AP", "AP50", "per_class")}}
        write_json(os.path.join(self.output_dir, "results.json"), results)
        return finalize_run(self.output_dir)


def run_compression(cfg, teacher_weights, resume=False, force=False):
    """Train and evaluate the student of ``cfg`` distilled from ``teacher_weights``; the results dict."""
    return CompressionRun(cfg, teacher_weights, resume, force).run()
