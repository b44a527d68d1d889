"""Compression runs: a teacher distilled into a student of the same classes.

A compression run is a run of one stage of all its classes (``--stages N``):
the student trains from its config's ``MODEL.WEIGHTS`` (from scratch on shapes)
with the given teacher (``ILMIL.TEACHER.CONFIG_FILE`` and ``--teacher-weights``:
any detector of the toolkit, of any depth or width) and the terms its config
enables (``ILMIL.DISTILL``); with no term enabled it is the undistilled student.
It writes what an incremental run writes (results.json, report.md, per-class AP,
plots), resumes like one, and evaluates the teacher on the same test data
(``results.json["teacher"]``), so one folder compares the two.

With ``ILMIL.TEACHER.ASSISTANT_CONFIG_FILE`` the run is a chain (a teacher
assistant): a model of that config is distilled from the teacher first, as a
compression run of its own in ``OUTPUT_DIR/assistant/``, and then teaches the
student. Each step keeps its model and evaluation and is reused or resumed like a
stage; the student's results name both (``"teacher"``, ``"assistant"``).
"""
import hashlib
import json
import logging
import os

from detectron2.utils import comm

from ..checkpoint import CheckpointClassesError, CheckpointError, load_checked_checkpoint, require_checkpoint_file
from ..config import ConfigError, derived_cfg, get_ilmil_cfg
from ..data import with_every_class_old
from ..data.stages import StageSpecError
from ..distill import build_teacher
from ..evaluation import evaluate_model
from ..evaluation.run_outputs import write_json
from .run_dir import RunDirError, RunValidationError, check_run_dir, claim_run_dir, file_digest
from .runner import IncrementalRun

__all__ = ["CompressionChain", "CompressionRun", "assistant_cfg", "check_given_teacher", "compression_run",
           "run_compression"]

logger = logging.getLogger("ilmil")

TEACHER_DIR = "teacher"
ASSISTANT_DIR = "assistant"


class CompressionRun(IncrementalRun):
    """One stage of all classes, distilled from ``teacher_weights`` (see the module docstring)."""

    takes_assistant = True  # compression_run makes a config naming one a CompressionChain

    def __init__(self, cfg, teacher_weights, resume=False, force=False, teacher_run_identity=None):
        """``teacher_run_identity``: the identity of the run that trains the teacher first (a
        chain's assistant), by which the teacher is known until then; everything else is
        checked now, the teacher's checkpoint by ``check_teacher`` once trained."""
        if not teacher_weights:
            raise ConfigError("a compression run needs --teacher-weights: the trained teacher's checkpoint; "
                              "fix: train one (tools/train_incremental.py --stages N) and give its model_final.pth")
        if teacher_run_identity is None:
            check_given_teacher(teacher_weights, cfg.OUTPUT_DIR, force)
        self.compression_teacher = teacher_weights  # part of the run's identity, which the checks compare
        self.chain_teacher = None  # a chain's student: the results entry of the chain's first teacher
        # A teacher still to be trained, by what it is trained on: the same before and after its
        # training, so that a chain stopped in its first step resumes as this run.
        self.teacher_run_sha256 = None if teacher_run_identity is None else hashlib.sha256(
            json.dumps(teacher_run_identity, sort_keys=True).encode()).hexdigest()[:16]
        super().__init__(cfg, resume=resume, force=force)
        if len(self.schedule) != 1:
            raise StageSpecError(f"ILMIL.STAGES {cfg.ILMIL.STAGES}: a compression run trains one stage of all its "
                                 "classes; fix: --stages N, e.g. --stages 20")
        train_name, test_name = self.registered[0]
        # The student checks its teacher against the old classes of its data: here, all of them.
        self.registered[0] = (with_every_class_old(train_name), test_name)
        # The teacher's metrics saved elsewhere (a chain's assistant, by its own step), else None.
        self.teacher_metrics_file = None
        if teacher_run_identity is None:
            self.check_teacher()

    def check_teacher(self):
        """The teacher's checkpoint holds the student's classes and fits the teacher's own config."""
        stage = self.schedule[0]
        try:
            load_checked_checkpoint(self.compression_teacher, stage.seen_classes, error=CheckpointClassesError,
                                    use="the student learns the {n} classes",
                                    fix="give a teacher of the student's classes, or --stages / --class-order "
                                        "that name the teacher's")
            build_teacher(self.stage_cfg(stage), self.compression_teacher, stage.seen_classes)
        except (CheckpointClassesError, CheckpointError, ConfigError) as e:
            raise RunValidationError([f"--teacher-weights: {e}"]) from None

    def identity(self):
        if self.teacher_run_sha256 is not None:
            return {**super().identity(), "teacher_run_sha256": self.teacher_run_sha256}
        # The teacher by its bytes, as a given model (its path may change with the machine).
        return {**super().identity(), "teacher_weights_sha256": file_digest(self.compression_teacher)}

    def stage_models(self, stage, previous_weights, pruned_weights=None):
        """The given teacher teaches; the student starts from its config's ``MODEL.WEIGHTS``."""
        return self.compression_teacher, None

    def evaluate_teacher(self):
        """The teacher's metrics on the stage's test data (saved under ``teacher/``, reused)."""
        folder = os.path.join(self.output_dir, TEACHER_DIR)
        path = self.teacher_metrics_file or os.path.join(folder, "metrics_eval.json")
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

    def summary_results(self):
        metrics = self.evaluate_teacher()
        teacher = {"weights": os.path.abspath(self.compression_teacher),  # found from any folder
                   "config_file": self.cfg.ILMIL.TEACHER.CONFIG_FILE or "(the student's)",
                   **{k: v for k, v in metrics.items() if k in ("AP", "AP50", "per_class")}}
        if self.chain_teacher is None:
            return {"teacher": teacher}
        # A chain's student learns from the assistant; the chain's teacher is the first one.
        return {"teacher": self.chain_teacher, "assistant": teacher}


def check_given_teacher(teacher_weights, output_dir, force):
    """Refuse a teacher checkpoint that does not exist (before a folder's run is compared
    with this one's, which would call a missing teacher another run), or that ``--force``
    would delete with the folder's outputs."""
    try:
        require_checkpoint_file(teacher_weights)
    except CheckpointError as e:  # as check_teacher words the teacher's checkpoint problems
        raise RunValidationError([f"--teacher-weights: {e}"]) from None
    folder = os.path.realpath(output_dir)
    if force and os.path.commonpath([folder, os.path.realpath(teacher_weights)]) == folder:
        raise RunValidationError([f"--teacher-weights {teacher_weights} lies inside --output-dir {output_dir}, "
                                  "whose outputs --force removes"],
                                 fixes=["copy the teacher out of that folder, or give another --output-dir"])


def assistant_cfg(cfg):
    """The assistant step's config: the student's (data, schedule, terms, teacher) with the
    detector of ``ILMIL.TEACHER.ASSISTANT_CONFIG_FILE`` (its MODEL and channel layout),
    run in ``OUTPUT_DIR/assistant``."""
    assistant = cfg.ILMIL.TEACHER.ASSISTANT_CONFIG_FILE
    if not os.path.isfile(assistant):
        raise ConfigError(f"ILMIL.TEACHER.ASSISTANT_CONFIG_FILE (--assistant-config) {assistant}: no such file; "
                          "fix: give the assistant's yaml config, e.g. configs/shapes/kd/*_assistant_cpu.yaml")
    if not cfg.ILMIL.TEACHER.CONFIG_FILE:
        # The assistant's run takes the assistant's MODEL: "the student's" would build the teacher in it.
        raise ConfigError("ILMIL.TEACHER.ASSISTANT_CONFIG_FILE (--assistant-config) needs the teacher's own config, "
                          "ILMIL.TEACHER.CONFIG_FILE (--teacher-config), for the assistant to learn from; fix: give it")
    own = get_ilmil_cfg(assistant, method="finetune",
                        given_as="ILMIL.TEACHER.ASSISTANT_CONFIG_FILE (--assistant-config)")
    return derived_cfg(cfg, {
        "MODEL": own.MODEL.clone(), "MODEL.DEVICE": cfg.MODEL.DEVICE,
        "ILMIL.PRUNING.CHANNELS": list(own.ILMIL.PRUNING.CHANNELS), "ILMIL.TEACHER.ASSISTANT_CONFIG_FILE": "",
        "OUTPUT_DIR": os.path.join(cfg.OUTPUT_DIR, ASSISTANT_DIR),
    })  # fmt: skip


class CompressionChain:
    """teacher -> assistant -> student (see the module docstring). Both runs are validated
    before any training (the student's folder, config and terms against the assistant's);
    the student's teacher checkpoint once the assistant has trained it."""

    def __init__(self, cfg, teacher_weights, resume=False, force=False):
        self.cfg = cfg
        check_given_teacher(teacher_weights, cfg.OUTPUT_DIR, force)  # the chain's folder holds the assistant's
        self.assistant = CompressionRun(assistant_cfg(cfg), teacher_weights, resume, force)
        assistant_identity = self.assistant.identity()
        if force:
            # --force starts over the folders of another run only: an assistant of today's chain
            # (a student-only change) is kept.
            try:
                check_run_dir(self.assistant.output_dir, assistant_identity)
                self.assistant.force = False
            except RunDirError:
                pass
        student_cfg = derived_cfg(cfg, {"ILMIL.TEACHER.CONFIG_FILE": cfg.ILMIL.TEACHER.ASSISTANT_CONFIG_FILE})
        assistant_stage = self.assistant.stage_dir(self.assistant.schedule[0])
        self.student = CompressionRun(student_cfg, os.path.join(assistant_stage, "model_final.pth"), resume, force,
                                      teacher_run_identity=assistant_identity)
        # The assistant's step evaluates it on these test data: the student's teacher metrics.
        self.student.teacher_metrics_file = os.path.join(assistant_stage, "metrics_eval.json")

    def run(self):
        # The chain's folder claimed before its first step (--force clears it now): a chain
        # stopped while its assistant trains is this run to a --resume.
        if comm.is_main_process():
            claim_run_dir(self.student.output_dir, self.student.identity(), self.cfg.SEED, self.student.force, logger)
        comm.synchronize()
        self.student.force = False  # cleared once: the student's step keeps the folder it was given
        logger.info("Teacher assistant: distilling %s first", self.cfg.ILMIL.TEACHER.ASSISTANT_CONFIG_FILE)
        first = self.assistant.run()
        logger.info("Teacher assistant done: the student learns from %s", self.student.compression_teacher)
        self.student.check_teacher()
        self.student.chain_teacher = first.get("teacher")  # the main process's results hold it
        return self.student.run()


def compression_run(cfg, teacher_weights, resume=False, force=False):
    """The run of ``cfg``: a ``CompressionChain`` with an assistant config, else a ``CompressionRun``."""
    cls = CompressionChain if cfg.ILMIL.TEACHER.ASSISTANT_CONFIG_FILE else CompressionRun
    return cls(cfg, teacher_weights, resume, force)


def run_compression(cfg, teacher_weights, resume=False, force=False):
    """Train and evaluate the student of ``cfg`` distilled from ``teacher_weights`` (through
    its assistant, if it names one); the results dict."""
    return compression_run(cfg, teacher_weights, resume, force).run()
