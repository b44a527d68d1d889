"""The pruning stage: a trained stage model L1-pruned (``ilmil.pruning``), optionally
fine-tuned with the stage trainer, and measured before and after.

Used by the stage runner at the boundary after ``ILMIL.PRUNING.AFTER_STAGE`` (the
next stage's student starts from the pruned model, its teacher is the unpruned
one) and by ``tools/prune.py``. Writes, in its output folder::

    model_pruned.pth   the pruned (and fine-tuned) model; its channel layout is recorded
    pruning.json       ratios, fine-tuning (iterations, teacher or not), and before /
                       after: params, GFLOPs, latency, AP50
    finetune/          the fine-tuning stage's log and checkpoints (if any)

With ``ILMIL.PRUNING.FINETUNE_TEACHER`` the fine-tuning is a training run of the
same classes whose teacher is the unpruned checkpoint (``IncrementalRCNN``'s
frozen teacher): the pruned model is distilled from its unpruned self.
"""
import logging
import os
import re

from detectron2.data import build_detection_test_loader
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.modeling.meta_arch import DenseDetector
from detectron2.utils import comm

from ..checkpoint import IncrementalCheckpointer, StageRecord, load_checked_checkpoint
from ..config import check_value, derived_cfg
from ..data import with_every_class_old
from ..evaluation import evaluate_model
from ..evaluation.run_outputs import write_json
from ..distill import DISTILLER_PREFIX, is_student_architecture
from ..modeling import load_detector
from ..pruning import PruningError, format_pruning_table, measure_model, prune_l1
from .launch import seed_this_process
from .trainer import IncrementalTrainer

__all__ = ["PRUNED_NAME", "check_pruning_config", "check_pruning_stage", "pruning_enabled", "pruning_ratios",
           "prune_checkpoint"]

logger = logging.getLogger("ilmil")

PRUNED_NAME = "model_pruned"
_RESNET_STAGE = re.compile(r"\.res([2-5])\.")


def pruning_enabled(cfg):
    """Whether the ratios prune anything (STAGE_RATIOS, when given, replace RATIO)."""
    p = cfg.ILMIL.PRUNING
    return any(r > 0 for r in (p.STAGE_RATIOS or [p.RATIO])) or p.BOX_HEAD_RATIO > 0


# detectron2's norm names whose layers prune_l1 can narrow (BatchNorm kinds, or no norm);
# GroupNorm's group count would have to divide every new width.
PRUNABLE_NORMS = ("", "BN", "SyncBN", "nnSyncBN", "naiveSyncBN", "naiveSyncBN_N", "FrozenBN")


def check_pruning_config(cfg):
    """Refuse ``ILMIL.PRUNING`` keys that cannot be applied, naming the key (before any work)."""
    p = cfg.ILMIL.PRUNING
    stage_ratios = _stage_ratios(cfg)
    if p.RATIO > 0 or any(r > 0 for r in stage_ratios):
        key = "ILMIL.PRUNING.RATIO (--ratio, --prune)" if p.RATIO > 0 else "ILMIL.PRUNING.STAGE_RATIOS"
        # Backbone pruning narrows ResNet residual blocks (prunable_layers): a Darknet has none.
        if "resnet" not in cfg.MODEL.BACKBONE.NAME:
            raise PruningError(f"{key}: MODEL.BACKBONE.NAME {cfg.MODEL.BACKBONE.NAME} has no ResNet residual "
                               "blocks to prune; fix: a ResNet backbone (Faster R-CNN, RetinaNet, FCOS), or no "
                               "pruning")
        # Grouped (ResNeXt) and deformable blocks: their convolutions' inputs are not one per channel.
        r = cfg.MODEL.RESNETS
        if r.NUM_GROUPS != 1 or any(r.DEFORM_ON_PER_STAGE):
            bad = (f"MODEL.RESNETS.NUM_GROUPS {r.NUM_GROUPS}" if r.NUM_GROUPS != 1
                   else f"MODEL.RESNETS.DEFORM_ON_PER_STAGE {list(r.DEFORM_ON_PER_STAGE)}")
            raise PruningError(f"{key}: {bad}: grouped and deformable residual blocks cannot be pruned; fix: "
                               "MODEL.RESNETS.NUM_GROUPS 1 and no deformable stage, or no pruning")
        if cfg.MODEL.RESNETS.NORM not in PRUNABLE_NORMS:
            raise PruningError(f"{key}: MODEL.RESNETS.NORM {cfg.MODEL.RESNETS.NORM} cannot be narrowed (its group "
                               "count would have to divide every new width); fix: set MODEL.RESNETS.NORM to BN, "
                               "SyncBN or FrozenBN")
    arch = cfg.MODEL.META_ARCHITECTURE
    dense = arch in META_ARCH_REGISTRY and issubclass(META_ARCH_REGISTRY.get(arch), DenseDetector)  # RetinaNet, FCOS
    if p.BOX_HEAD_RATIO > 0 and dense:
        raise PruningError(f"ILMIL.PRUNING.BOX_HEAD_RATIO (--box-head-ratio) {p.BOX_HEAD_RATIO}: "
                           f"MODEL.META_ARCHITECTURE {arch} has no fully connected box head; fix: 0 (its backbone "
                           "prunes with ILMIL.PRUNING.RATIO or STAGE_RATIOS)")
    if p.RATIO > 0 and stage_ratios and not any(r > 0 for r in stage_ratios):
        raise PruningError(f"ILMIL.PRUNING.STAGE_RATIOS (--stage-ratios) {stage_ratios} replace ILMIL.PRUNING.RATIO "
                           f"(--ratio, --prune) {p.RATIO}: nothing would be pruned; fix: give one of them")
    check_value("ILMIL.PRUNING.FINETUNE_ITERS", p.FINETUNE_ITERS, p.FINETUNE_ITERS >= 0,
                "0 (no fine-tuning) or more", 200)
    if not p.FINETUNE_TEACHER:
        return
    key = "ILMIL.PRUNING.FINETUNE_TEACHER (--finetune-teacher) True"
    if p.FINETUNE_ITERS <= 0:
        raise PruningError(f"{key} with ILMIL.PRUNING.FINETUNE_ITERS (--finetune-iters) {p.FINETUNE_ITERS}: the "
                           "teacher guides the pruned model's fine-tuning, and there is none; fix: give fine-tuning "
                           "iterations, e.g. 400, or drop the teacher")
    if arch in META_ARCH_REGISTRY and not is_student_architecture(META_ARCH_REGISTRY.get(arch)):
        raise PruningError(f"{key} needs a student MODEL.META_ARCHITECTURE (IncrementalRCNN, IncrementalRetinaNet, "
                           f"IncrementalFCOS, IncrementalYOLOV3) to hold the teacher, got {arch}; fix: set one of those")


def check_pruning_stage(cfg, start_stage, num_stages):
    """Refuse an ``ILMIL.PRUNING.AFTER_STAGE`` of a run of ``num_stages`` stages from
    ``start_stage`` whose model no later stage of the run starts from (it would not be pruned)."""
    if not pruning_enabled(cfg):
        return
    after = cfg.ILMIL.PRUNING.AFTER_STAGE
    if num_stages < 2:
        raise PruningError(f"ILMIL.PRUNING (--prune): this run has one stage (--method joint, or --stages N), "
                           "and pruning prunes a stage's model for the next stage to start from; fix: prune its "
                           "model afterwards with tools/prune.py, or give --stages of 2 or more stages")
    first = max(0, start_stage - 1)  # the stage before --start-stage is the given model
    if not first <= after <= num_stages - 2:
        raise PruningError(f"ILMIL.PRUNING.AFTER_STAGE {after}: this run's stages a later stage starts from are "
                           f"{first}..{num_stages - 2}; fix: one of those")


def _stage_ratios(cfg):
    """``ILMIL.PRUNING.STAGE_RATIOS``, every ratio key checked."""
    p = cfg.ILMIL.PRUNING
    stage_ratios = [float(r) for r in p.STAGE_RATIOS]
    if stage_ratios and len(stage_ratios) != 4:
        raise PruningError(f"ILMIL.PRUNING.STAGE_RATIOS (--stage-ratios) {stage_ratios}: needs 4 values, "
                           "one per ResNet stage res2..res5; fix: give 4 ratios, e.g. 0.2,0.3,0.4,0.5")
    ratios = {"ILMIL.PRUNING.RATIO (--ratio, --prune)": [p.RATIO],
              "ILMIL.PRUNING.STAGE_RATIOS (--stage-ratios)": stage_ratios,
              "ILMIL.PRUNING.BOX_HEAD_RATIO (--box-head-ratio)": [p.BOX_HEAD_RATIO]}
    for key, values in ratios.items():
        bad = [r for r in values if not 0.0 <= r < 1.0]
        if bad:
            raise PruningError(f"{key} {bad[0]}: a pruning ratio is a fraction in [0, 1); fix: e.g. 0.3")
    return stage_ratios


def pruning_ratios(cfg):
    """``layer name -> fraction removed`` from the ``ILMIL.PRUNING`` keys."""
    p = cfg.ILMIL.PRUNING
    stage_ratios = _stage_ratios(cfg)

    def ratio_of(name):
        if ".box_head." in name:
            return p.BOX_HEAD_RATIO
        match = _RESNET_STAGE.search(name)
        if match and stage_ratios:
            return stage_ratios[int(match.group(1)) - 2]
        return p.RATIO

    return ratio_of


def prune_checkpoint(cfg, weights, output_dir, class_names, train_dataset, test_dataset, resume=False):
    """Prune ``weights`` per ``cfg.ILMIL.PRUNING``, fine-tune, measure; returns the summary.

    Args:
        cfg: the config ``weights`` was trained with (its ``NUM_CLASSES``).
        class_names: the checkpoint's classes (checked against its record).
        train_dataset, test_dataset: registered names of its training data (for
            fine-tuning) and test data (AP50 and a real image for GFLOPs / latency).
        resume: continue the fine-tuning from its last checkpoint (after a kill).
    """
    check_pruning_config(cfg)
    os.makedirs(output_dir, exist_ok=True)
    checkpoint, _ = load_checked_checkpoint(weights, class_names, use="it is pruned as a model of the {n} classes",
                                            fix="give the model of those classes")
    cfg = derived_cfg(cfg, {
        "DATASETS.TRAIN": (train_dataset,),
        "DATASETS.TEST": (test_dataset,),
        "ILMIL.TEACHER.WEIGHTS": "",  # pruning needs no teacher; the fine-tuning sets its own
    })
    model = load_detector(cfg, weights, checkpoint)
    image = next(iter(build_detection_test_loader(cfg, test_dataset)))[0]["image"]

    logger.info("Pruning %s: measuring the model before", weights)
    before = {**measure_model(model, image), "AP50": evaluate_model(cfg, model).get("AP50")}
    layout = prune_l1(model, pruning_ratios(cfg))
    pruned_cfg = derived_cfg(cfg, {"ILMIL.PRUNING.CHANNELS": [[name, width] for name, width in layout.items()]})
    p = cfg.ILMIL.PRUNING
    iters = p.FINETUNE_ITERS
    if iters > 0:
        teacher = weights if p.FINETUNE_TEACHER else None
        model = _finetune(pruned_cfg, model, iters, os.path.join(output_dir, "finetune"), teacher, resume)
    IncrementalCheckpointer(model, output_dir, ilmil=StageRecord(model, class_names, {"pruned_from": weights})).save(
        PRUNED_NAME)
    # A student fine-tuned with its teacher holds its distillation modules: not counted.
    after = {**measure_model(model, image, skip_prefixes=(DISTILLER_PREFIX,)),
             "AP50": evaluate_model(pruned_cfg, model).get("AP50")}
    summary = {
        "weights": weights,
        "pruned_weights": os.path.join(output_dir, f"{PRUNED_NAME}.pth"),
        "ratio": p.RATIO, "stage_ratios": list(p.STAGE_RATIOS), "box_head_ratio": p.BOX_HEAD_RATIO,
        "finetune_iters": iters,
        "finetune_teacher": bool(iters > 0 and p.FINETUNE_TEACHER),
        "image_size": list(image.shape[1:]),
        "before": before,
        "after": after,
    }
    if comm.is_main_process():
        write_json(os.path.join(output_dir, "pruning.json"), summary)
    logger.info("Pruning result:\n%s", format_pruning_table(summary))
    return summary


def _finetune(cfg, model, iters, output_dir, teacher_weights=None, resume=False):
    """``model`` (pruned) trained ``iters`` iterations on ``cfg``'s training data; with
    ``teacher_weights`` (the unpruned checkpoint) as its frozen teacher, distilled from it.
    ``resume``: from the fine-tuning's last checkpoint when there is one."""
    changes = {
        "OUTPUT_DIR": output_dir,
        "SOLVER.MAX_ITER": iters,
        "SOLVER.STEPS": (),
        "SOLVER.WARMUP_ITERS": min(cfg.SOLVER.WARMUP_ITERS, iters // 5),
    }
    if teacher_weights:
        changes.update({
            "ILMIL.TEACHER.WEIGHTS": teacher_weights,
            # The pruning keeps every block's output width (it removes residual blocks' inner
            # channels only), so res2..res5 and p2..p6 of the pruned student match its unpruned
            # teacher's: the feature term compares them as they are.
            "ILMIL.DISTILL.FEAT.ENABLED": True,
            # The teacher knows every class of this data: its detections would only repeat the ground
            # truth as pseudo-labels.
            "ILMIL.PSEUDO_LABELS.ENABLED": False,
            "DATASETS.TRAIN": (with_every_class_old(cfg.DATASETS.TRAIN[0]),),
        })
    cfg = derived_cfg(cfg, changes)
    # Seeded as a stage is: the same fine-tuning whether or not the stage before trained in this process.
    seed_this_process(cfg.SEED)
    # BatchNorm statistics are re-estimated with or without the teacher: pruning changed
    # the activations they describe.
    trainer = IncrementalTrainer(cfg, {"pruned_finetune": True})
    student = getattr(trainer.model, "module", trainer.model)  # unwrap DistributedDataParallel
    start_iter = trainer.resume_stage() if resume else None
    if start_iter is None:
        # Strict, but the student's own distillation state (new with its loss terms) keeps its initial value.
        student.load_state_dict({**student.state_dict(), **model.state_dict()})
    logger.info("Fine-tuning the pruned model for %d iterations%s%s", iters,
                f", its teacher the unpruned {teacher_weights}" if teacher_weights else "",
                f", resuming at iteration {start_iter}" if start_iter is not None else "")
    trainer.train()
    return student
