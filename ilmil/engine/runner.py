"""The stage runner: trains the stages of a schedule in order, each starting from
the previous stage's model (classifier expanded), and evaluates after each.
Faster R-CNN trains with every method, the one-stage detectors (RetinaNet, FCOS, YOLO) with
those of their presets (configs/methods/dense/); a method with a teacher needs a student
meta-architecture (``IncrementalRCNN``, ``IncrementalRetinaNet``, ``IncrementalFCOS``, ``IncrementalYOLOV3``).

Output layout (``OUT``)::

    stages.json            the schedule: per stage its classes and image counts
    config.yaml            the resolved config
    results.json           per stage: AP, AP50, AP_old, AP50_old, AP_new, AP50_new, per_class,
                           AP(50)_class_agnostic, forgetting; written after every stage
    stage_K/model_final.pth, metrics.json (event log), metrics_eval.json, detections.json
    per_class_ap*.csv, *.png, report.md    at the end (ilmil/evaluation/run_outputs.py)

A stage whose ``model_final.pth`` exists is not retrained on a re-run into the
same folder, and one whose evaluation is saved is not re-evaluated; with
``resume`` the stage in progress continues from its newest readable checkpoint.
``run.json`` (run_dir.py) keeps another run's re-run out of the folder.
"""
import hashlib
import json
import logging
import math
import os
import time

import torch
import yaml

from detectron2.data import DatasetCatalog
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.utils import comm

from ..checkpoint import CheckpointClassesError, CheckpointError, load_checked_checkpoint, safe_load
from ..compat import report_without_traceback
from ..config import (METHOD_PRESETS, ConfigError, check_choice, check_device, check_lr_steps, check_mixed_precision,
                      check_training_values, derived_cfg, num_classes_changes, uses_teacher)
from ..data import (
    DATA_PROBLEMS_FIX,
    DEFAULT_CLASS_ORDER,
    MAX_LISTED_PROBLEMS,
    STAGE_IMAGE_RULES,
    DatasetError,
    ExclusiveStageImages,
    build_schedule,
    load_dataset_source,
    parse_stage_spec,
    register_stage_datasets,
    shared_image_count,
    stage_train_dicts,
)
from ..data.stages import Stage, StageSpecError
from ..deploy import DeployError
from ..evaluation import NotARunError, evaluate_model, finalize_run
from ..evaluation.run_outputs import write_json
from ..distill import DistillationStudent, check_distill_config, is_student_architecture
from ..file_io import atomic_write
from ..modeling import (TooSmallMapError, build_detector, load_detector, load_expanded, with_checkpoint_layout,
                        with_yolo_anchors)
from ..pruning import PruningError
from .launch import main_process_first, seed_this_process
from .pruning_stage import check_pruning_config, check_pruning_stage, prune_checkpoint, pruning_enabled
from .run_dir import (
    RUN_FILE,
    RunDirError,
    RunValidationError,
    check_run_dir,
    claim_run_dir,
    dataset_content_fingerprint,
    dataset_fingerprint,
    file_digest,
    output_dir_problem,
    training_config,
    write_problem_report,
)
from .trainer import IncrementalTrainer, NonFiniteLossError, recorded_training_seconds

__all__ = ["RUN_ERRORS", "IncrementalRun", "run_incremental", "resolve_class_order"]

logger = logging.getLogger("ilmil")

# Errors whose message is the whole story (what is wrong, where, the fix): the CLI
# prints them without a traceback, and the training log too.
RUN_ERRORS = (ConfigError, DatasetError, StageSpecError, CheckpointClassesError, CheckpointError, RunDirError,
              RunValidationError, NonFiniteLossError, TooSmallMapError, PruningError, NotARunError, DeployError)
report_without_traceback(RUN_ERRORS)


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
    twice = sorted({c for c in custom_order if custom_order.count(c) > 1})
    if twice:
        raise StageSpecError(f"ILMIL.CLASS_ORDER lists {', '.join(twice)} twice; fix: name each class once")
    return tuple(custom_order)


class IncrementalRun:
    """One class-incremental run: a config, its schedule and its output folder."""

    # A teacher assistant is a compression chain's step (``CompressionChain``), not a stage's.
    takes_assistant = False

    def __init__(self, cfg, start_stage=0, teacher_weights=None, resume=False, force=False):
        """
        Args:
            cfg: a config from ``get_ilmil_cfg``; ``OUTPUT_DIR`` is the run folder.
            start_stage, teacher_weights: begin at stage ``start_stage`` > 0 from a
                user-given model of the earlier stages' classes instead of training them.
            resume: continue the stage in progress from its last checkpoint
                (finished stages are always reused).
            force: start over in a folder that holds another run (its outputs are removed).

        Everything that can be checked before training is checked here, and all
        problems found are raised together in one :class:`RunValidationError`.
        """
        self.cfg = cfg
        self.output_dir = cfg.OUTPUT_DIR
        if cfg.ILMIL.TEACHER.ASSISTANT_CONFIG_FILE and not self.takes_assistant:
            raise ConfigError(
                f"ILMIL.TEACHER.ASSISTANT_CONFIG_FILE {cfg.ILMIL.TEACHER.ASSISTANT_CONFIG_FILE}: a teacher assistant "
                "belongs to a compression run, an incremental run would ignore it; fix: tools/train_compression.py "
                "--assistant-config, or leave the key empty")
        self.method = check_choice("ILMIL.METHOD", cfg.ILMIL.METHOD, METHOD_PRESETS)
        check_training_values(cfg)
        processes, batch = comm.get_world_size(), cfg.SOLVER.IMS_PER_BATCH
        if batch % processes:  # detectron2 splits the batch evenly (and asserts so at the loader)
            raise ConfigError(f"SOLVER.IMS_PER_BATCH {batch}: the batch is split over the {processes} processes, so "
                              f"a multiple of {processes}; fix: e.g. SOLVER.IMS_PER_BATCH "
                              f"{processes * max(1, batch // processes)}")
        check_lr_steps(cfg)
        check_device(cfg)
        check_mixed_precision(cfg)
        self.stage_images = check_choice("ILMIL.STAGE_IMAGES", cfg.ILMIL.STAGE_IMAGES, STAGE_IMAGE_RULES)
        check_pruning_config(cfg)
        meta_arch = META_ARCH_REGISTRY.get(check_choice(
            "MODEL.META_ARCHITECTURE", cfg.MODEL.META_ARCHITECTURE, [name for name, _ in META_ARCH_REGISTRY]))
        if uses_teacher(cfg) and not is_student_architecture(meta_arch):
            raise ConfigError(
                f"method {self.method} needs a student MODEL.META_ARCHITECTURE to hold its teacher, got "
                f"{cfg.MODEL.META_ARCHITECTURE}; fix: IncrementalRCNN, IncrementalRetinaNet, IncrementalFCOS or IncrementalYOLOV3 "
                "(configs/shapes/*_cpu.yaml name them), or --method finetune / joint"
            )
        self.resume, self.force = resume, force
        problems = []
        self.source = main_process_first(lambda: load_dataset_source(cfg, problems))
        # The data problems share one fix (the other checks word their own).
        fixes = [DATA_PROBLEMS_FIX] if problems else []
        class_order = resolve_class_order(list(cfg.ILMIL.CLASS_ORDER), self.source.class_names)
        rule = "ILMIL.CLASS_ORDER" if cfg.ILMIL.CLASS_ORDER else DEFAULT_CLASS_ORDER[self.source.name]
        logger.info("class order (%s, %s): %s", self.source.name, rule, ", ".join(class_order))
        counts = parse_stage_spec(cfg.ILMIL.STAGES, len(class_order),
                                  "ILMIL.CLASS_ORDER (--class-order)" if cfg.ILMIL.CLASS_ORDER else "the dataset")
        if self.method == "joint":
            # The upper bound: every class of the spec at once, the same total budget.
            self.schedule = [Stage(0, (), tuple(class_order[: sum(counts)]))]
            self.iter_scale = len(counts)
        else:
            self.schedule = build_schedule(class_order, counts)
            self.iter_scale = 1
        if not 0 <= start_stage < len(self.schedule):
            raise StageSpecError(f"--start-stage {start_stage}: the schedule has stages 0..{len(self.schedule) - 1}; "
                                 f"fix: one of those (0: from the start)")
        if start_stage == 0 and teacher_weights:
            raise ConfigError(f"--teacher-weights {teacher_weights} without --start-stage: stage 0 learns from no "
                              "teacher; fix: add --start-stage K, K the first stage that model has not learned")
        if start_stage > 0 and not teacher_weights:
            raise ConfigError(f"--start-stage {start_stage} needs --teacher-weights: the model of stages "
                              f"0..{start_stage - 1}; fix: give that checkpoint, or start at stage 0")
        check_pruning_stage(cfg, start_stage, len(self.schedule))
        self.start_stage = start_stage
        self.teacher_weights = teacher_weights
        self.class_order = class_order
        self.dataset_prefix = f"ilmil_{self.source.name}_{cfg.ILMIL.STAGES}_{self.method}"
        exclusive = None
        if self.stage_images == "exclusive":
            exclusive = ExclusiveStageImages(self.schedule, cfg.ILMIL.STAGE_IMAGES_SEED)
        self.registered = [register_stage_datasets(self.dataset_prefix, self.source, s, exclusive)
                           for s in self.schedule]
        # A YOLO config without anchors gets them from the first stage's training boxes.
        self.cfg = cfg = with_yolo_anchors(cfg, DatasetCatalog.get(self.registered[0][0]))
        # MODEL keys detectron2 checks only as it builds: the first stage's model, built once now.
        try:
            build_detector(derived_cfg(cfg, num_classes_changes(len(self.schedule[0].seen_classes))))
        except ConfigError as e:
            problems.append(str(e))
        # A wrong start model (classes, architecture) is refused before any work (YOLO's anchors are set by now).
        if teacher_weights:
            try:
                _check_start_model(cfg, teacher_weights, self.schedule[start_stage].old_classes)
            except (CheckpointClassesError, CheckpointError) as e:
                problems.append(f"--teacher-weights: {e}")
        check_distill_config(cfg)
        self._log_stage_images()
        problems += self._schedule_problems(data_problems=bool(fixes))
        folder_problem = output_dir_problem(self.output_dir)
        if folder_problem is None and os.path.isfile(os.path.join(self.output_dir, RUN_FILE)):
            try:  # another run's folder: refused now, before detectron2's setup writes its config.yaml there
                check_run_dir(self.output_dir, self.identity(), force)
            except RunDirError as e:
                folder_problem = str(e)
        problems = [p for p in problems + [folder_problem] if p]
        report = None
        if folder_problem is None and comm.is_main_process():
            long_list = problems if len(problems) > MAX_LISTED_PROBLEMS else []
            report = write_problem_report(self.output_dir, long_list)
        if problems:
            raise RunValidationError(problems, fixes, report)

    def _log_stage_images(self):
        """How many training images each stage gets, and how many the standard rule shares."""
        if len(self.schedule) < 2:
            return  # one stage (joint): nothing to share
        counts = ", ".join(f"{stage.index}: {len(DatasetCatalog.get(train_name))}"
                           for stage, (train_name, _) in zip(self.schedule, self.registered))
        shared = shared_image_count(self.source.train, self.schedule)
        if self.stage_images == "exclusive":
            logger.info("stage images (exclusive, seed %d): %s; %d images would otherwise be in 2+ stages",
                        self.cfg.ILMIL.STAGE_IMAGES_SEED, counts, shared)
        else:
            logger.info("stage images (standard): %s; %d images are in 2+ stages "
                        "(ILMIL.STAGE_IMAGES exclusive gives each to one)", counts, shared)

    def _schedule_problems(self, data_problems=False):
        """Stages that no training image can teach; classes without a training box are logged.
        ``data_problems``: malformed annotations were found (and left out), perhaps a stage's only boxes."""
        problems = []
        for stage, (train_name, _) in zip(self.schedule, self.registered):
            if stage.index < self.start_stage:
                continue
            dicts = DatasetCatalog.get(train_name)
            counts = dict.fromkeys(stage.new_classes, 0)
            for record in dicts:
                for ann in record["annotations"]:
                    name = stage.seen_classes[ann["category_id"]]
                    if name in counts:
                        counts[name] += 1
            missing = [c for c, n in counts.items() if n == 0]
            given_away = self._given_away(stage, missing) if not dicts or missing else []
            if given_away and not dicts:
                problems.append(
                    f"stage {stage.index} ({', '.join(stage.new_classes)}): ILMIL.STAGE_IMAGES exclusive gave "
                    f"every training image of these classes to other stages: fix: another "
                    f"ILMIL.STAGE_IMAGES_SEED, or ILMIL.STAGE_IMAGES standard"
                )
            elif not dicts:
                problems.append(
                    f"stage {stage.index} ({', '.join(stage.new_classes)}): no image of the {self.source.name} "
                    "train data holds these classes: fix: check --stages / ILMIL.CLASS_ORDER against the dataset"
                    + (", or correct their boxes if they are among the malformed annotations" if data_problems
                       else "")
                )
            elif missing:
                why = (f" (ILMIL.STAGE_IMAGES exclusive gave the images of {', '.join(given_away)} to other "
                       "stages: another ILMIL.STAGE_IMAGES_SEED may keep some)") if given_away else ""
                logger.warning("Stage %d: no training box of class(es) %s; the model cannot learn them%s",
                               stage.index, ", ".join(missing), why)
        return problems

    def _given_away(self, stage, classes):
        """Those of ``classes`` (of ``stage``) that have training boxes under the standard
        rule but none under the exclusive one, whose draw gave their images to other stages."""
        if self.stage_images != "exclusive":
            return []
        taught = {a["category_name"] for r in stage_train_dicts(self.source.train, stage) for a in r["annotations"]}
        return [c for c in classes if c in taught]

    def identity(self):
        """What a folder's finished stages were trained on; see ``claim_run_dir``."""
        return {
            "dataset": self.source.name,
            "dataset_fingerprint": dataset_fingerprint(self.source),
            "dataset_content_fingerprint": dataset_content_fingerprint(self.source),
            "stages": self.cfg.ILMIL.STAGES,
            "class_order": list(self.class_order),
            "method": self.method,
            "seed": self.cfg.SEED,
            "config": training_config(self.cfg),
            # --start-stage's given model by its bytes: retrained in place it is another model,
            # moved (another machine, another path) the same one.
            "start_stage": self.start_stage,
            "given_weights_sha256": file_digest(self.teacher_weights) if self.teacher_weights else None,
        }

    def stage_dir(self, stage):
        return os.path.join(self.output_dir, f"stage_{stage.index}")

    def stage_cfg(self, stage, teacher_weights="", layout_checkpoint=None):
        """The config of one stage; ``teacher_weights`` is given for training only,
        ``layout_checkpoint`` for a student in that checkpoint's (pruned) channel layout."""
        train_name, test_name = self.registered[stage.index]
        changes = {
            **num_classes_changes(len(stage.seen_classes)),
            "DATASETS.TRAIN": (train_name,),
            "DATASETS.TEST": (test_name,),
            "OUTPUT_DIR": self.stage_dir(stage),
            "SOLVER.MAX_ITER": self.cfg.SOLVER.MAX_ITER * self.iter_scale,
            "SOLVER.STEPS": tuple(s * self.iter_scale for s in self.cfg.SOLVER.STEPS),
            "ILMIL.TEACHER.WEIGHTS": teacher_weights if uses_teacher(self.cfg) else "",
        }
        if stage.index > 0:
            changes["MODEL.WEIGHTS"] = ""  # the previous stage's model is loaded (expanded) instead
        cfg = derived_cfg(self.cfg, changes)
        return with_checkpoint_layout(cfg, layout_checkpoint) if layout_checkpoint is not None else cfg

    def write_schedule(self):
        """stages.json and config.yaml (by the main process); returns the stages' info."""
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
        if comm.is_main_process():
            write_json(os.path.join(self.output_dir, "stages.json"), {"method": self.method, "stages": stages})
            config = self.cfg.dump()
            atomic_write(os.path.join(self.output_dir, "config.yaml"), lambda f: f.write(config), mode="w")
        return stages

    def stage_models(self, stage, previous_weights, pruned_weights=None):
        """``(teacher, start)`` of ``stage``: the model of the earlier stages teaches, and the
        student starts from it, or from its pruned version after a pruning boundary
        (None and None for stage 0)."""
        return previous_weights, pruned_weights or previous_weights

    def train_stage(self, stage, teacher_weights, start_weights=None):
        """Train ``stage`` with the teacher ``teacher_weights`` (None: none), its student
        started from ``start_weights`` (head expanded; None: from the config's
        ``MODEL.WEIGHTS``, BatchNorm statistics learned afresh)."""
        start = None
        if start_weights is not None:
            start, _ = load_checked_checkpoint(start_weights, stage.old_classes)
        cfg = self.stage_cfg(stage, teacher_weights=teacher_weights or "", layout_checkpoint=start)
        seed_this_process(cfg.SEED, offset=stage.index)
        schedule = {"stage": stage.index, "stages": self.cfg.ILMIL.STAGES, "method": self.method}
        trainer = IncrementalTrainer(cfg, schedule)
        model = getattr(trainer.model, "module", trainer.model)  # unwrap DistributedDataParallel
        start_iter = trainer.resume_stage() if self.resume else None
        if start_iter is not None:
            logger.info("Stage %d: resuming at iteration %d of %d", stage.index, start_iter, cfg.SOLVER.MAX_ITER)
        else:
            interrupted = trainer.checkpointer.resume_candidates()
            if interrupted:
                logger.info("Stage %d: training from its start (%s of an interrupted run is there; "
                            "--resume continues from it)", stage.index, os.path.basename(interrupted[0]))
            if start is None:
                trainer.resume_or_load(resume=False)
            else:
                load_expanded(model, start["model"], len(stage.old_classes))
        if start is not None and cfg.ILMIL.FREEZE_BN_STATS and isinstance(model, DistillationStudent):
            model.freeze_bn_stats()
        trainer.train()
        # Killed between the last iteration's checkpoint and model_final (written one after the
        # other): its resume had no iteration left to train, so nothing wrote the file. The main
        # process's view decides (its collective comes after its write), as every process saves.
        final_missing = comm.all_gather(not os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "model_final.pth")))[0]
        if final_missing:
            trainer.iter = trainer.max_iter - 1  # SOLVER.REFERENCE_WORLD_SIZE may have rescaled MAX_ITER
            trainer.checkpointer.save("model_final", iteration=trainer.iter)
        if comm.get_world_size() > 1:
            # Each process kept BatchNorm statistics of its own batches (detectron2's DDP does not
            # broadcast buffers); model_final holds the main process's, which every process then
            # evaluates on its share of the test images, so the stage's AP is the saved model's.
            for buffer in model.buffers():
                torch.distributed.broadcast(buffer, src=0)
        # Per process: in a distributed run every rank logs the same digest (DDP kept them in sync).
        logger.info("Stage %d: weights digest %s (rank %d)", stage.index, weights_digest(model), comm.get_rank())
        return trainer.model

    def evaluate_stage(self, stage, model):
        return evaluate_model(self.stage_cfg(stage), model, output_dir=self.stage_dir(stage))

    def run(self):
        if comm.is_main_process():
            claim_run_dir(self.output_dir, self.identity(), self.cfg.SEED, self.force, logger)
        comm.synchronize()
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
        previous_weights, pruned_weights = self.teacher_weights, None
        run_start = time.perf_counter()
        for stage, info in zip(self.schedule, stages_info):
            # The stage before --start-stage is the given teacher: evaluated, not trained,
            # so the results start where the run starts (forgetting is measured from it).
            given = stage.index == self.start_stage - 1
            if stage.index < self.start_stage - 1:
                continue
            stage_dir = self.stage_dir(stage)
            final_weights = self.teacher_weights if given else os.path.join(stage_dir, "model_final.pth")
            metrics_path = os.path.join(stage_dir, "metrics_eval.json")
            logger.info(
                "Stage %d (of 0..%d): %d old + %d new classes, %d train images (elapsed %.0f s)",
                stage.index, len(self.schedule) - 1, len(stage.old_classes), len(stage.new_classes),
                info["num_train_images"], time.perf_counter() - run_start,
            )
            stage_start = time.perf_counter()
            model = None
            if given:
                logger.info("Stage %d: the model of --teacher-weights %s, evaluated, not trained",
                            stage.index, final_weights)
            elif os.path.isfile(final_weights):
                logger.info("Stage %d: %s exists, not retraining", stage.index, final_weights)
            else:
                model = self.train_stage(stage, *self.stage_models(stage, previous_weights, pruned_weights))
            if os.path.isfile(metrics_path):
                with open(metrics_path) as f:
                    metrics = json.load(f)
            else:
                if model is None:
                    model = self._load_stage_model(stage, final_weights)
                eval_start = time.perf_counter()
                metrics = self.evaluate_stage(stage, model)
                metrics["eval_time_s"] = time.perf_counter() - eval_start
                # The training loop's seconds, resumes included, as the stage's final checkpoint
                # records them (read where the metrics are written); unknown (the report's "-")
                # for the given teacher.
                metrics["train_time_s"] = (None if given or not comm.is_main_process()
                                           else recorded_training_seconds(safe_load(final_weights)))
                if comm.is_main_process():
                    write_json(metrics_path, metrics)
            previous_weights, pruned_weights = final_weights, None
            pruning = self.prune_stage_model(stage, final_weights)
            if pruning:
                pruned_weights = pruning["pruned_weights"]
            if not comm.is_main_process():
                continue
            if pruning:
                results["pruning"] = {"after_stage": stage.index, **pruning}
            entry = {"stage": stage.index, **info, **metrics}
            if given:  # absolute: a re-evaluation from another folder finds it
                entry["weights"] = os.path.abspath(final_weights)
            results["stages"].append(entry)
            write_json(results_path, results)
            logger.info(
                "Stage %d done: AP50_old %s, AP50_new %s, AP50 %s (stage %.0f s, elapsed %.0f s)",
                stage.index, _fmt(entry["AP50_old"]), _fmt(entry["AP50_new"]), _fmt(entry["AP50"]),
                time.perf_counter() - stage_start, time.perf_counter() - run_start,
            )
        summary = self.summary_results()  # every process: a summary may evaluate
        if comm.is_main_process():
            if summary:
                results.update(summary)
                write_json(results_path, results)
            results = finalize_run(self.output_dir)
        return results

    def summary_results(self):
        """Entries results.json holds beside the stages' (a compression run's teacher), added
        before the report and plots are made from it; none here."""
        return {}

    def _load_stage_model(self, stage, weights):
        return load_detector(self.stage_cfg(stage), weights)

    def prune_stage_model(self, stage, weights):
        """The pruned model of ``stage`` (``stage_K/pruned/``), made once; None
        when this boundary does not prune."""
        if not pruning_enabled(self.cfg) or stage.index != self.cfg.ILMIL.PRUNING.AFTER_STAGE:
            return None
        folder = os.path.join(self.stage_dir(stage), "pruned")
        summary_path = os.path.join(folder, "pruning.json")
        if os.path.isfile(summary_path):
            with open(summary_path) as f:
                return json.load(f)
        # Every process takes part (evaluation and fine-tuning are distributed too) and
        # gets the summary; prune_checkpoint builds the model in the checkpoint's layout.
        train_name, test_name = self.registered[stage.index]
        return prune_checkpoint(self.stage_cfg(stage), weights, folder, stage.seen_classes, train_name, test_name,
                                self.resume)


def _check_start_model(cfg, weights, old_classes):
    """Refuse ``weights`` as the model of ``old_classes`` when its classes differ or it
    does not load into ``cfg``'s detector (another architecture or width)."""
    checkpoint, num_classes = load_checked_checkpoint(weights, old_classes)
    # The model itself, whatever its config's method: no teacher of its own.
    cfg = derived_cfg(cfg, {**num_classes_changes(num_classes), "MODEL.WEIGHTS": "", "ILMIL.TEACHER.WEIGHTS": ""})
    load_detector(cfg, weights, checkpoint)


def weights_digest(model):
    """A short hash of a model's parameters (not its BatchNorm statistics, which
    are per process in a distributed run), to compare processes or runs."""
    digest = hashlib.sha1()
    for name, param in sorted(model.named_parameters()):
        digest.update(name.encode())
        digest.update(param.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:12]


def _fmt(value):
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.1f}"


def run_incremental(cfg, start_stage=0, teacher_weights=None, resume=False, force=False):
    """Run every stage of ``cfg``'s schedule; returns the results dict (results.json)."""
    return IncrementalRun(cfg, start_stage, teacher_weights, resume, force).run()
