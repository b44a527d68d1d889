"""Config keys of ilmil, added to a detectron2 config by :func:`add_ilmil_config`."""
import ast
import contextlib
import functools
import importlib
import importlib.util
import math
import os
import sys
import tempfile

import torch
import yaml

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg
from detectron2.modeling import META_ARCH_REGISTRY

__all__ = ["ConfigError", "add_config_extension", "add_fcos_config", "add_ilmil_config", "add_retinanet_config",
           "add_yolo_config", "changed_from_defaults", "check_choice", "check_device", "check_mixed_precision",
           "check_lr_steps", "check_optimizer", "check_test_input", "check_training_values", "check_value",
           "config_file_method", "config_from_dump", "config_items", "config_value", "config_overrides", "default_cfg",
           "derived_cfg", "get_ilmil_cfg", "import_plugins", "method_preset", "method_presets", "num_classes_changes",
           "set_num_classes", "uses_teacher",
           "DEFAULT_CONFIG", "METHOD_PRESETS"]


OPTIMIZERS = ("SGD", "AdamW")


class ConfigError(ValueError):
    """A config value the toolkit cannot run with."""


def check_choice(key, value, choices):
    """``value`` of config key ``key``, refused with the choices when unknown."""
    if value not in choices:
        raise ConfigError(f"{key} {value!r}: choose one of {', '.join(choices)}")
    return value


def check_value(key, value, valid, must, example):
    """``value`` of config key ``key``, refused (saying what it ``must`` be, with an
    ``example``) unless ``valid``."""
    if not valid:
        raise ConfigError(f"{key} {value}: must be {must}; fix: e.g. {key} {example}")
    return value


def class_names_flag(flag, text):
    """The class names of a comma-separated flag (``--class-order``, ``--classes``), each
    stripped of the spaces around it; an empty one (``a,,b``, ``a,b,``) is refused."""
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise ConfigError(f"{flag} {text!r}: an empty class name between commas; fix: give the names as "
                          "name1,name2,... with none left out")
    return names


def check_optimizer(cfg):
    """``cfg.SOLVER.OPTIMIZER``, refused with the choices when unknown."""
    return check_choice("SOLVER.OPTIMIZER", cfg.SOLVER.OPTIMIZER, OPTIMIZERS)


def check_lr_steps(cfg):
    """``SOLVER.STEPS`` as detectron2's multi-step scheduler takes them: a step past
    ``SOLVER.MAX_ITER`` is dropped (with its warning), the others must increase and lie
    between 0 and it, both excluded (fvcore refuses the others at the trainer's start)."""
    if cfg.SOLVER.LR_SCHEDULER_NAME != "WarmupMultiStepLR":  # the cosine schedule reads no steps
        return
    kept = [step for step in cfg.SOLVER.STEPS if step <= cfg.SOLVER.MAX_ITER]
    if kept and (kept[0] < 1 or kept[-1] == cfg.SOLVER.MAX_ITER or any(a >= b for a, b in zip(kept, kept[1:]))):
        step = int(cfg.SOLVER.MAX_ITER * 0.8)
        raise ConfigError(f"SOLVER.STEPS {tuple(cfg.SOLVER.STEPS)} with SOLVER.MAX_ITER {cfg.SOLVER.MAX_ITER}: the "
                          "learning-rate steps must increase and lie between 0 and MAX_ITER, both excluded; fix: e.g. "
                          f"SOLVER.STEPS \"{f'({step},)' if step >= 1 else '()'}\"")


def check_test_input(cfg):
    """The input and output keys an evaluation or a prediction reads, of values detectron2
    takes (it refuses the others deep in its loader, after the run's set-up)."""
    check_choice("INPUT.FORMAT", cfg.INPUT.FORMAT, ("BGR", "RGB"))
    check_value("INPUT.MIN_SIZE_TEST", cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST >= 0,
                "0 (no resizing) or a size in pixels", 256)
    check_value("INPUT.MAX_SIZE_TEST", cfg.INPUT.MAX_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST >= 1, "a size in pixels", 1333)
    # Below 0 R-CNN's box head keeps every detection; a dense head would cut one off.
    n = cfg.TEST.DETECTIONS_PER_IMAGE
    check_value("TEST.DETECTIONS_PER_IMAGE", n, n >= 1 or (n < 0 and "RCNN" in cfg.MODEL.META_ARCHITECTURE),
                "at least 1 (R-CNN: or -1, every detection)", 100)


def check_training_values(cfg):
    """The solver, loader and input keys of a training, of values it can run with (torch,
    fvcore and detectron2 refuse the others with a traceback, some only at the first
    checkpoint or evaluation)."""
    s = cfg.SOLVER
    # 0 is a valid rate (a model trained in place, its weights kept).
    check_value("SOLVER.BASE_LR", s.BASE_LR, math.isfinite(s.BASE_LR) and s.BASE_LR >= 0, "0 or above", 0.001)
    check_value("SOLVER.MAX_ITER", s.MAX_ITER, s.MAX_ITER >= 1, "at least 1", 500)
    check_value("SOLVER.IMS_PER_BATCH", s.IMS_PER_BATCH, s.IMS_PER_BATCH >= 1, "at least 1", 4)
    check_value("SOLVER.WEIGHT_DECAY", s.WEIGHT_DECAY, s.WEIGHT_DECAY >= 0, "0 or above", 0.0001)
    if check_optimizer(cfg) == "SGD":
        check_value("SOLVER.MOMENTUM", s.MOMENTUM, 0 <= s.MOMENTUM < 1, "in [0, 1)", 0.9)
    check_value("SOLVER.CHECKPOINT_PERIOD", s.CHECKPOINT_PERIOD, s.CHECKPOINT_PERIOD >= 1, "at least 1", 250)
    # detectron2 0.6's schedules and warm-ups (it refuses another name only once the trainer is built).
    check_choice("SOLVER.LR_SCHEDULER_NAME", s.LR_SCHEDULER_NAME, ("WarmupMultiStepLR", "WarmupCosineLR"))
    check_choice("SOLVER.WARMUP_METHOD", s.WARMUP_METHOD, ("linear", "constant"))
    check_value("DATALOADER.NUM_WORKERS", cfg.DATALOADER.NUM_WORKERS, cfg.DATALOADER.NUM_WORKERS >= 0, "0 or above", 2)
    sizes = list(cfg.INPUT.MIN_SIZE_TRAIN)
    check_value("INPUT.MIN_SIZE_TRAIN", tuple(sizes), sizes and min(sizes) >= 0, "sizes in pixels (0: no resizing)",
                "\"(256,)\"")
    check_test_input(cfg)


def check_device(cfg):
    """``MODEL.DEVICE`` a device name torch knows (cpu, cuda, cuda:N), of this machine."""
    try:
        device = torch.device(str(cfg.MODEL.DEVICE))
    except RuntimeError:
        raise ConfigError(f"MODEL.DEVICE {cfg.MODEL.DEVICE!r} is not a device name; fix: cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"MODEL.DEVICE {cfg.MODEL.DEVICE}: this machine has no CUDA device; fix: MODEL.DEVICE cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"MODEL.DEVICE {cfg.MODEL.DEVICE}: this machine has {torch.cuda.device_count()} CUDA "
                          f"device(s); fix: cuda:0..cuda:{torch.cuda.device_count() - 1}")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"MODEL.DEVICE {cfg.MODEL.DEVICE}: ilmil trains on cpu or cuda; fix: MODEL.DEVICE cpu or cuda")


def check_mixed_precision(cfg):
    """``SOLVER.AMP.ENABLED`` on a device it can run on. detectron2's AMPTrainer autocasts
    on CUDA only and otherwise stops at its first step, after the run's set-up."""
    if cfg.SOLVER.AMP.ENABLED and not str(cfg.MODEL.DEVICE).startswith("cuda"):
        raise ConfigError(f"SOLVER.AMP.ENABLED True needs a CUDA device, got MODEL.DEVICE {cfg.MODEL.DEVICE!r} "
                          "(detectron2's mixed-precision trainer runs on CUDA only); fix: MODEL.DEVICE cuda, or "
                          "SOLVER.AMP.ENABLED False (on a CPU, ILMIL.TEACHER.PRECISION bfloat16 speeds up the "
                          "teacher's pass where the CPU has native bfloat16)")


def add_ilmil_config(cfg):
    """Add the ``ILMIL`` section (incremental schedule, datasets, method) to ``cfg``."""
    # Seeded by default (detectron2's -1 draws a new seed each run): the same seed gives the
    # same data order, augmentation and numbers; -1 still asks for a fresh one.
    cfg.SEED = 0
    cfg.ILMIL = CN()
    # Dataset: shapes | voc_2007 | voc_2012 | voc_07_12 | coco_2017 | voc_folder | coco_json
    cfg.ILMIL.DATASET = "shapes"
    # Incremental schedule: class counts per stage, e.g. "10+10", "15+1x5", "40+10x4".
    cfg.ILMIL.STAGES = "10+10"
    # Class order (names); empty = the dataset's canonical order (VOC order, COCO id order).
    cfg.ILMIL.CLASS_ORDER = []
    # finetune | joint | pseudo | faster-ilod | mma | ilmil; sets the defaults of the terms below
    # (configs/methods/<method>.yaml); keys in a config file or on the command line override them.
    cfg.ILMIL.METHOD = "finetune"
    # Python modules imported before a config is read, each adding its own keys and components
    # (a new distillation loss, README "Writing a distillation loss"): module names on the Python
    # path, or .py files (relative to the folder the tool runs in). A run's config.yaml keeps
    # them, so its evaluation, export and prediction import them too.
    cfg.ILMIL.PLUGINS = []
    # Training images of each stage (README, Leak-free stages): standard = every image
    # holding an object of the stage's classes, so an image can train several stages |
    # exclusive = each such image trains exactly one of its stages, drawn by the seed below.
    cfg.ILMIL.STAGE_IMAGES = "standard"
    # Seed of the exclusive assignment; independent of the training seed (SEED), so
    # runs of several training seeds, and the methods compared, share one assignment.
    cfg.ILMIL.STAGE_IMAGES_SEED = 0

    # Stages after the first keep the BatchNorm statistics of the model they start from:
    # batch statistics would make the student differ from its teacher before any update.
    # Student architectures only (Incremental*: the mode is kept by their train()).
    cfg.ILMIL.FREEZE_BN_STATS = True
    # Structured L1-norm pruning of the student at one stage boundary (README, Pruning).
    cfg.ILMIL.PRUNING = CN()
    # Fraction of the residual blocks' inner channels removed (0 = no pruning).
    cfg.ILMIL.PRUNING.RATIO = 0.0
    # Per ResNet stage (res2, res3, res4, res5); overrides RATIO when given.
    cfg.ILMIL.PRUNING.STAGE_RATIOS = []
    # Fraction of the fully connected box head's hidden units removed.
    cfg.ILMIL.PRUNING.BOX_HEAD_RATIO = 0.0
    # The model of this stage is pruned; the next stage's student starts from it
    # while its teacher is the unpruned model.
    cfg.ILMIL.PRUNING.AFTER_STAGE = 0
    # Fine-tuning iterations of the pruned model on its own stage's data (0 = none).
    cfg.ILMIL.PRUNING.FINETUNE_ITERS = 0
    # During that fine-tuning, the unpruned model is the teacher (ILMIL prunes, then
    # distils): the feature term always, the RPN / RCN terms as ILMIL.DISTILL has them.
    cfg.ILMIL.PRUNING.FINETUNE_TEACHER = False
    # The model's channel layout, [[layer name, width], ...]: set from the checkpoint a
    # model is built for (ilmil.pruning), empty = the unpruned widths of the config.
    cfg.ILMIL.PRUNING.CHANNELS = []

    # SGD (detectron2's, with SOLVER.MOMENTUM) | AdamW (decoupled SOLVER.WEIGHT_DECAY):
    # a from-scratch detector's classifier learns several times sooner with AdamW.
    cfg.SOLVER.OPTIMIZER = "SGD"

    # Iterations whose loss is NaN / infinite that may be skipped (no update) before the
    # stage stops; 0 stops at the first one, naming the loss term and the iteration.
    cfg.ILMIL.SKIP_NONFINITE_ITERS = 0

    # The old-class model of a stage; the stage runner sets it to the previous stage's model.
    cfg.ILMIL.TEACHER = CN()
    cfg.ILMIL.TEACHER.WEIGHTS = ""
    # The teacher's own config file (any detector the toolkit builds, of any depth or width);
    # empty = the student's config with the checkpoint's class count (incremental stages).
    cfg.ILMIL.TEACHER.CONFIG_FILE = ""
    # Compression through a teacher assistant (M-KD's intermediate guidance model): the
    # config of a detector between teacher and student, distilled from the teacher first
    # (OUTPUT_DIR/assistant/) with the student's data, schedule and terms, and then the
    # student's teacher. "" = the student learns from the teacher directly.
    cfg.ILMIL.TEACHER.ASSISTANT_CONFIG_FILE = ""
    # Teacher proposals per image (the top ones by objectness) run through its box head
    # for pseudo-labels and the RCN term; 0 = all of MODEL.RPN.POST_NMS_TOPK_TEST.
    cfg.ILMIL.TEACHER.NUM_PROPOSALS = 0
    # float32 | bfloat16 | float16: the teacher's forward under torch.autocast at this
    # precision (outputs back in float32). bfloat16 runs the teacher's convolutions ~1.6x
    # faster on CPUs with AVX512-BF16 / AMX and on GPUs; slower where the CPU lacks them.
    cfg.ILMIL.TEACHER.PRECISION = "float32"

    # Teacher detections added as ground truth of old classes.
    cfg.ILMIL.PSEUDO_LABELS = CN()
    cfg.ILMIL.PSEUDO_LABELS.ENABLED = False
    cfg.ILMIL.PSEUDO_LABELS.SCORE_THRESH = 0.5
    # Per-class NMS among the teacher's detections (Faster R-CNN; a one-stage teacher's
    # detections come from its own test-time NMS and score threshold).
    cfg.ILMIL.PSEUDO_LABELS.NMS_THRESH = 0.3
    # Dropped where IoU with a new-class GT box reaches this.
    cfg.ILMIL.PSEUDO_LABELS.NEW_GT_IOU_THRESH = 0.7
    # One class per box: of detections overlapping at more than this IoU, whatever their
    # classes, the most confident is kept (a one-stage head's sigmoid per class can put one
    # box above SCORE_THRESH under two classes). 1 keeps them all.
    cfg.ILMIL.PSEUDO_LABELS.CROSS_CLASS_IOU = 0.7

    # Distillation terms: each section below with ENABLED and WEIGHT is a registered loss
    # (ilmil.distill, README "Writing a distillation loss"), logged as loss_distill_<section>.
    cfg.ILMIL.DISTILL = CN()
    # Maps a student layer to the teacher's width where they differ (ilmil.distill.connectors):
    # Conv1x1BN | Conv1x1 | "" (none: differing widths are an error).
    cfg.ILMIL.DISTILL.CONNECTOR = "Conv1x1BN"
    # fixed (each term times its WEIGHT) | uncertainty (also a learned factor per term:
    # sum_k w_k L_k / (2 s_k^2) + log s_k).
    cfg.ILMIL.DISTILL.TERM_WEIGHTS = "fixed"
    # fixed | uncertainty (M-KD's exploration: a learned factor on the detection loss too,
    # L_det / (2 s_det^2) + log s_det, so the student weighs imitation against its task).
    cfg.ILMIL.DISTILL.DETECTION_WEIGHT = "fixed"
    # Multi-layer feature-map distillation.
    cfg.ILMIL.DISTILL.FEAT = CN()
    cfg.ILMIL.DISTILL.FEAT.ENABLED = False
    cfg.ILMIL.DISTILL.FEAT.WEIGHT = 1.0
    # Backbone stages (res2..res5) and/or FPN levels (p2..p6).
    cfg.ILMIL.DISTILL.FEAT.LAYERS = ["res2", "res3", "res4", "res5", "p2", "p3", "p4", "p5", "p6"]
    # l2 | normalized (PKD) | filtered_l1 (Faster ILOD)
    cfg.ILMIL.DISTILL.FEAT.DISTANCE = "normalized"
    # uniform | adaptive (EMA of each layer's distance, weights clipped to WEIGHT_RANGE)
    cfg.ILMIL.DISTILL.FEAT.LAYER_WEIGHTING = "adaptive"
    cfg.ILMIL.DISTILL.FEAT.EMA_MOMENTUM = 0.9
    cfg.ILMIL.DISTILL.FEAT.WEIGHT_RANGE = (0.5, 2.0)
    # M-KD's exploration: this fraction of each layer's (teacher-width) channels, drawn anew
    # every training step, is left out of the distance: the student need not imitate everywhere.
    cfg.ILMIL.DISTILL.FEAT.FREE_CHANNELS = 0.0
    # RPN objectness and box deltas.
    cfg.ILMIL.DISTILL.RPN = CN()
    cfg.ILMIL.DISTILL.RPN.ENABLED = False
    cfg.ILMIL.DISTILL.RPN.WEIGHT = 1.0
    # Deltas are distilled on anchors where teacher objectness exceeds the student's by this.
    cfg.ILMIL.DISTILL.RPN.DELTA_MARGIN = 0.1
    # Box-head (RCN) logits of old classes + background, and old-class deltas.
    cfg.ILMIL.DISTILL.RCN = CN()
    cfg.ILMIL.DISTILL.RCN.ENABLED = False
    cfg.ILMIL.DISTILL.RCN.WEIGHT = 1.0
    # l2 (mean-centred, Faster ILOD) | kl (softened with TEMPERATURE) | unbiased_kl (kl where the
    # student's new classes count as background: the teacher's background may be a new object; MMA)
    cfg.ILMIL.DISTILL.RCN.LOGITS = "l2"
    cfg.ILMIL.DISTILL.RCN.TEMPERATURE = 2.0
    # Teacher proposals kept by objectness per image, and how many of them are sampled.
    cfg.ILMIL.DISTILL.RCN.TOPK = 128
    cfg.ILMIL.DISTILL.RCN.NUM_SAMPLES = 64
    # Teacher proposals whose IoU with a new-class GT box reaches this are not sampled:
    # there the teacher's logits say "background" for a new object, which the student
    # must unlearn (BENCHMARKS.md, ablation). 0 = sample from all (docs/methods.md, 4.4).
    cfg.ILMIL.DISTILL.RCN.NEW_GT_IOU_THRESH = 0.0

    # FGFI fine-grained feature imitation (a compression baseline): feature maps imitated where
    # an anchor overlaps a GT box at more than PSI x that box's best anchor IoU.
    cfg.ILMIL.DISTILL.FGFI = CN()
    cfg.ILMIL.DISTILL.FGFI.ENABLED = False
    cfg.ILMIL.DISTILL.FGFI.WEIGHT = 1.0
    cfg.ILMIL.DISTILL.FGFI.LAYERS = ["p2", "p3", "p4", "p5", "p6"]
    cfg.ILMIL.DISTILL.FGFI.PSI = 0.5
    # Standardise both maps per channel first (as REVIEW.NORMALIZE, below).
    cfg.ILMIL.DISTILL.FGFI.NORMALIZE = True

    # Knowledge review with fg/bg decoupling: the student's LAYERS (fine to coarse) fused
    # coarse to fine by attention modules (at MID_CHANNELS, then the teacher's width), each
    # compared with the teacher's level at full size and pooled to POOL_SIZES, inside the
    # GT boxes and outside them apart (DECOUPLE) with FG_WEIGHT and BG_WEIGHT.
    cfg.ILMIL.DISTILL.REVIEW = CN()
    cfg.ILMIL.DISTILL.REVIEW.ENABLED = False
    cfg.ILMIL.DISTILL.REVIEW.WEIGHT = 1.0
    cfg.ILMIL.DISTILL.REVIEW.LAYERS = ["p2", "p3", "p4", "p5", "p6"]
    cfg.ILMIL.DISTILL.REVIEW.MID_CHANNELS = 64
    # Compare per-channel standardised maps (as PKD): features trained from scratch are
    # not of unit scale, and the raw squared error then outweighs the detection loss
    # by orders of magnitude (RetinaNet, 6400-iteration teacher: 2e4 against 1.6).
    cfg.ILMIL.DISTILL.REVIEW.NORMALIZE = True
    cfg.ILMIL.DISTILL.REVIEW.DECOUPLE = True
    # The background's mean error weighs 4x the foreground's: the review without the split
    # weighs it about 6x on shapes (objects cover 14 % of an image), 1 : 2 under-weighs it
    # (below PKD on RetinaNet and FCOS), 0.25 : 1 beat PKD on both, on two seeds.
    cfg.ILMIL.DISTILL.REVIEW.FG_WEIGHT = 0.25
    cfg.ILMIL.DISTILL.REVIEW.BG_WEIGHT = 1.0
    # Pooled sizes besides the full one, weighted 1/2, 1/4, ... ([] = the full size only).
    cfg.ILMIL.DISTILL.REVIEW.POOL_SIZES = [4, 2, 1]

    # Information-map distillation: imitation of LAYERS (backbone stages and neck levels)
    # weighted by max(soft GT mask, the teacher's objectness) | uniform (weight 1).
    cfg.ILMIL.DISTILL.INFOMAP = CN()
    cfg.ILMIL.DISTILL.INFOMAP.ENABLED = False
    cfg.ILMIL.DISTILL.INFOMAP.WEIGHT = 1.0
    cfg.ILMIL.DISTILL.INFOMAP.LAYERS = ["dark3", "dark4", "dark5", "p3", "p4", "p5"]
    cfg.ILMIL.DISTILL.INFOMAP.WEIGHTING = "information"
    # The least weight of any location of the information map: 0 is the published map (the
    # background carries almost none), 1 makes it uniform; in between the background keeps a share.
    cfg.ILMIL.DISTILL.INFOMAP.BACKGROUND_WEIGHT = 0.0
    # Standardise both maps per channel before the distance (as FGFI.NORMALIZE); off is the
    # published raw error, which on features trained from scratch needs a small WEIGHT.
    cfg.ILMIL.DISTILL.INFOMAP.NORMALIZE = False

    # M-KD's attention transfer: normalised spatial attention maps (channel mean of the
    # squared activations) of LAYERS, any widths.
    cfg.ILMIL.DISTILL.AT = CN()
    cfg.ILMIL.DISTILL.AT.ENABLED = False
    cfg.ILMIL.DISTILL.AT.WEIGHT = 1.0
    cfg.ILMIL.DISTILL.AT.LAYERS = ["res3", "res4", "res5"]
    # M-KD's relations between layers: the FSP matrix of each pair of PAIRS (student maps
    # through connectors where widths differ).
    cfg.ILMIL.DISTILL.FSP = CN()
    cfg.ILMIL.DISTILL.FSP.ENABLED = False
    cfg.ILMIL.DISTILL.FSP.WEIGHT = 1.0
    cfg.ILMIL.DISTILL.FSP.PAIRS = [["res3", "res4"], ["res4", "res5"]]

    # Dense-head distillation (RetinaNet, FCOS, YOLO): binary KL of the old classes' scores at
    # every anchor, softened by TEMPERATURE, and the boxes where the teacher's best old-class
    # score reaches BOX_SCORE_THRESH compared by BOX_LOSS.
    cfg.ILMIL.DISTILL.DENSE = CN()
    cfg.ILMIL.DISTILL.DENSE.ENABLED = False
    cfg.ILMIL.DISTILL.DENSE.WEIGHT = 1.0
    cfg.ILMIL.DISTILL.DENSE.TEMPERATURE = 1.0
    cfg.ILMIL.DISTILL.DENSE.BOX_SCORE_THRESH = 0.5
    # giou: 1 - GIoU of the decoded boxes, in [0, 2] on every detector | l1: L1 of the
    # head's box deltas, whose scale is the detector's (FCOS: distances in strides, where
    # it outweighed the detector's own losses and cost 9-12 AP50 in compression).
    cfg.ILMIL.DISTILL.DENSE.BOX_LOSS = "giou"
    # L_cls summed and divided by the teacher's soft object count, as the focal loss is by
    # its foreground (objects) | averaged over every anchor and class (mean). On YOLO the
    # objectness KL is divided the same way.
    cfg.ILMIL.DISTILL.DENSE.NORMALIZER = "objects"
    # Leave out the anchors on a GT box of a new class (incremental runs), where the
    # old-class teacher's scores would contradict the new class's GT.
    cfg.ILMIL.DISTILL.DENSE.EXCLUDE_NEW_GT = False

    # MMA's unbiased classification: the box head's loss on a proposal labelled background
    # targets "background or an old class" (old objects are unlabeled in a later stage's
    # data). Its old classes are the teacher's, so a stage with a teacher only.
    cfg.ILMIL.UNBIASED_CLS = CN()
    cfg.ILMIL.UNBIASED_CLS.ENABLED = False

    # The embedded dataset, generated on first use under $ILMIL_DATASETS/shapes/.
    cfg.ILMIL.SHAPES = CN()
    # Classes generated; 0 = as many as the stage spec needs (at least 20), up to 80.
    cfg.ILMIL.SHAPES.NUM_CLASSES = 0
    cfg.ILMIL.SHAPES.NUM_TRAIN = 2000
    cfg.ILMIL.SHAPES.NUM_TEST = 500
    # Side of the square images, pixels.
    cfg.ILMIL.SHAPES.IMAGE_SIZE = 256
    # Seed of the generator (independent of the training seed, cfg.SEED).
    cfg.ILMIL.SHAPES.SEED = 0
    # hard (the benchmark set: clutter, occlusion, textures) | easy (the demo's set: 1-3
    # larger objects on plain backgrounds, learned from scratch within minutes).
    cfg.ILMIL.SHAPES.DIFFICULTY = "hard"

    # Where custom data lives, for ILMIL.DATASET = voc_folder / coco_json.
    cfg.ILMIL.DATA = CN()
    # voc_folder: the folder holding Annotations/, JPEGImages/ and ImageSets/Main/.
    cfg.ILMIL.DATA.ROOT = ""
    # voc_folder: split files under ImageSets/Main/ used for training and testing.
    cfg.ILMIL.DATA.TRAIN_SPLIT = "trainval"
    cfg.ILMIL.DATA.TEST_SPLIT = "test"
    # coco_json: annotation files and the folders their file_name entries are relative to.
    cfg.ILMIL.DATA.TRAIN_JSON = ""
    cfg.ILMIL.DATA.TRAIN_IMAGES = ""
    cfg.ILMIL.DATA.TEST_JSON = ""
    cfg.ILMIL.DATA.TEST_IMAGES = ""
    # Drop malformed annotations (reported and counted) instead of stopping the run.
    cfg.ILMIL.DATA.SKIP_BAD_ANNOTATIONS = False
    # Clip boxes that stick out of their image to its border instead of reporting them.
    cfg.ILMIL.DATA.CLIP_BOXES = False
    # Before training, decode every image once (a progress bar for large datasets):
    # a truncated file then stops the run at the start, not hours into it. False reads
    # each file's header only (its size, checked against the annotation's either way).
    cfg.ILMIL.DATA.CHECK_IMAGES = True


def add_fcos_config(cfg):
    """Add ``MODEL.FCOS`` (ilmil/modeling/fcos.py) to ``cfg``, at the defaults of
    detectron2's ``FCOS`` and ``FCOSHead`` constructors (its LazyConfig model)."""
    cfg.MODEL.FCOS = CN()
    # Classes of the sigmoid classifier (no background logit); the stage runner sets it per stage.
    cfg.MODEL.FCOS.NUM_CLASSES = 80
    # Backbone maps the head reads, finest first (each its own scale range of objects).
    cfg.MODEL.FCOS.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]
    # 3x3 convolutions of each tower (classification, box + centerness) before the output layers.
    cfg.MODEL.FCOS.NUM_CONVS = 4
    # Normalisation of the tower convolutions: GN | BN (one BatchNorm per level) | "" (none).
    cfg.MODEL.FCOS.NORM = "GN"
    # Initial foreground probability of every class: the classifier's biases start at -log((1-p)/p).
    cfg.MODEL.FCOS.PRIOR_PROB = 0.01
    # Focal loss of the classifier.
    cfg.MODEL.FCOS.FOCAL_LOSS_ALPHA = 0.25
    cfg.MODEL.FCOS.FOCAL_LOSS_GAMMA = 2.0
    # A location is positive for a box only within this many strides of the box centre.
    cfg.MODEL.FCOS.CENTER_SAMPLING_RADIUS = 1.5
    # Test: locations below this score (sqrt(class x centerness)) are dropped before NMS.
    cfg.MODEL.FCOS.SCORE_THRESH_TEST = 0.2
    # Test: the best this many locations per level go to NMS.
    cfg.MODEL.FCOS.TOPK_CANDIDATES_TEST = 1000
    # Test: per-class NMS IoU; detections kept per image are TEST.DETECTIONS_PER_IMAGE (as RetinaNet's).
    cfg.MODEL.FCOS.NMS_THRESH_TEST = 0.6


def add_retinanet_config(cfg):
    """Add ilmil's ``MODEL.RETINANET`` keys (ilmil/modeling/retinanet.py) to detectron2's."""
    # How anchors become foreground: "iou" (detectron2's IOU_THRESHOLDS) or "atss" (adaptive
    # training sample selection: per box, an IoU threshold from its nearest anchors' statistics).
    cfg.MODEL.RETINANET.ASSIGNER = "iou"
    # ATSS: the anchors nearest each box's centre, per level, its threshold is computed from.
    cfg.MODEL.RETINANET.ATSS_TOPK = 9


def add_yolo_config(cfg):
    """Add ``MODEL.YOLO`` (ilmil/modeling/yolo.py, the YOLOv3-style detector) to ``cfg``."""
    cfg.MODEL.YOLO = CN()
    # Classes of the sigmoid classifier (no background logit); the stage runner sets it per stage.
    cfg.MODEL.YOLO.NUM_CLASSES = 80
    # Backbone maps the neck reads, finest first: dark3-dark5 (Darknet-53), dark4-dark5 (tiny).
    cfg.MODEL.YOLO.IN_FEATURES = ["dark3", "dark4", "dark5"]
    # Every width times this (rounded to multiples of 8), every stage's block count times
    # the depth one (at least 1): Darknet-53 at full size is ~4x an R18-FPN step.
    cfg.MODEL.YOLO.WIDTH_MULTIPLIER = 1.0
    cfg.MODEL.YOLO.DEPTH_MULTIPLIER = 1.0
    cfg.MODEL.YOLO.NORM = "BN"
    # Per level, finest first, [w, h] anchors in input pixels; empty: k-means over the
    # training boxes at the start of a run (recorded in its config.yaml), NUM_ANCHORS per level.
    cfg.MODEL.YOLO.ANCHORS = []
    cfg.MODEL.YOLO.NUM_ANCHORS = 3
    # Initial objectness and class probability: the output biases start at -log((1-p)/p).
    cfg.MODEL.YOLO.PRIOR_PROB = 0.01
    # The class logits read a 3x3 conv of their own (RetinaNet's and FCOS's heads keep class
    # and box towers apart) instead of the one they share with boxes and objectness.
    cfg.MODEL.YOLO.CLASS_CONV = False
    # A GT box trains its best anchor (width/height IoU) and every anchor above this IoU with it.
    cfg.MODEL.YOLO.MATCH_IOU_THRESH = 0.3
    # Train the same anchors in the two adjacent cells nearest the GT centre too (YOLOv5's
    # assignment, ~3x the positives), centres decoding over -0.5 .. 1.5 cells to reach it.
    cfg.MODEL.YOLO.NEIGHBOUR_CELLS = False
    # Predictions overlapping a GT box above this IoU are no objectness negatives.
    cfg.MODEL.YOLO.IGNORE_THRESH = 0.5
    # Loss weights (of per-batch means, times the batch size), and the objectness weight per level.
    cfg.MODEL.YOLO.BOX_WEIGHT = 0.05
    cfg.MODEL.YOLO.CLS_WEIGHT = 0.5
    # bce: YOLOv3's class BCE at the positives only | focal: the sigmoid focal loss at every
    # anchor (RetinaNet's and FCOS's), so the class scores learn "no object" too.
    cfg.MODEL.YOLO.CLASS_LOSS = "bce"
    cfg.MODEL.YOLO.FOCAL_LOSS_ALPHA = 0.25  # named as detectron2's RetinaNet and FCOS keys
    cfg.MODEL.YOLO.FOCAL_LOSS_GAMMA = 2.0
    cfg.MODEL.YOLO.OBJ_WEIGHT = 1.0
    cfg.MODEL.YOLO.OBJ_LEVEL_WEIGHTS = [4.0, 1.0, 0.4]
    # Test: score = objectness x class probability; below the threshold dropped, the best
    # TOPK per level to per-class NMS; kept per image: TEST.DETECTIONS_PER_IMAGE.
    cfg.MODEL.YOLO.SCORE_THRESH_TEST = 0.05
    cfg.MODEL.YOLO.TOPK_CANDIDATES_TEST = 1000
    cfg.MODEL.YOLO.NMS_THRESH_TEST = 0.5


# The class count of every detector head ilmil builds: Faster R-CNN, RetinaNet, FCOS, YOLO. Each
# meta-architecture reads its own key only, so setting all four fits whichever one a
# config names (and its subclasses).
NUM_CLASSES_KEYS = ("MODEL.ROI_HEADS.NUM_CLASSES", "MODEL.RETINANET.NUM_CLASSES", "MODEL.FCOS.NUM_CLASSES",
                    "MODEL.YOLO.NUM_CLASSES")


def num_classes_changes(num_classes):
    """``{key: num_classes}`` of ``NUM_CLASSES_KEYS``, for :func:`derived_cfg`."""
    return {key: int(num_classes) for key in NUM_CLASSES_KEYS}


def set_num_classes(cfg, num_classes):
    """Set the class count of every detector head ilmil builds (``NUM_CLASSES_KEYS``) in
    ``cfg``, which must be mutable; returns it."""
    for key, value in num_classes_changes(num_classes).items():
        *sections, leaf = key.split(".")
        node = cfg
        for part in sections:
            node = node[part]
        setattr(node, leaf, value)
    return cfg


CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
DEFAULT_CONFIG = os.path.join(CONFIGS_DIR, "shapes", "faster_rcnn_R18_FPN_cpu.yaml")
# What each --method switches on: configs/methods/<method>.yaml, merged before the config
# file and the command line, which override any of its keys.
METHODS_DIR = os.path.join(CONFIGS_DIR, "methods")
METHOD_PRESETS = {name[: -len(".yaml")]: os.path.join(METHODS_DIR, name)
                  for name in sorted(os.listdir(METHODS_DIR)) if name.endswith(".yaml")}


def uses_teacher(cfg):
    """Whether any term of the config needs the previous stage's model as teacher: the
    pseudo-labels, the unbiased classification or an enabled ``ILMIL.DISTILL`` section."""
    distill = any(isinstance(node, CN) and node.get("ENABLED", False) for node in cfg.ILMIL.DISTILL.values())
    return bool(cfg.ILMIL.PSEUDO_LABELS.ENABLED or cfg.ILMIL.UNBIASED_CLS.ENABLED or distill)


# Functions that add config keys of code outside ilmil (a new distillation loss's section).
_CONFIG_EXTENSIONS = []


def add_config_extension(add_config):
    """Have every config the toolkit makes call ``add_config(cfg)`` after adding its own
    keys, so a new loss's ``ILMIL.DISTILL`` section can be set in files and on command
    lines. Returns ``add_config`` (usable as a decorator)."""
    if add_config not in _CONFIG_EXTENSIONS:
        _CONFIG_EXTENSIONS.append(add_config)
    return add_config


def derived_cfg(cfg, changes):
    """A copy of ``cfg`` with ``changes`` (``{"SECTION.KEY": value}``) set, frozen if
    ``cfg`` is: how a stage, an evaluation or a pruned model gets its own config from
    the run's without touching it. A key the config lacks raises ``KeyError``."""
    derived = cfg.clone()
    derived.defrost()
    for key, value in changes.items():
        *sections, leaf = key.split(".")
        node = derived
        for part in sections + [leaf]:
            if not isinstance(node, CN) or part not in node:
                raise KeyError(f"config key {key}: no such key")
            parent, node = node, node[part]
        setattr(parent, leaf, value)
    if cfg.is_frozen():
        derived.freeze()
    return derived


def default_cfg():
    """detectron2's defaults with the FCOS and ILMIL keys (and extensions) at theirs (no
    method preset, no file)."""
    cfg = get_cfg()
    add_fcos_config(cfg)
    add_retinanet_config(cfg)
    add_yolo_config(cfg)
    add_ilmil_config(cfg)
    for add_config in _CONFIG_EXTENSIONS:
        add_config(cfg)
    return cfg


def config_value(cfg, key):
    """The value of the dotted ``key`` (``"TEST.DETECTIONS_PER_IMAGE"``) in ``cfg``."""
    return functools.reduce(getattr, key.split("."), cfg)


def config_items(cfg):
    """``{"SECTION.KEY": value}`` of every leaf of ``cfg``."""

    def flatten(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from flatten(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    return dict(flatten(cfg))


def changed_from_defaults(cfg):
    """The items of ``cfg`` whose value differs from detectron2's and ilmil's defaults.
    An identity built from them stays the same when a later version adds a key at
    its default value."""
    defaults = config_items(default_cfg())
    return {key: value for key, value in config_items(cfg).items()
            if key not in defaults or defaults[key] != value}


def method_presets(architecture):
    """``{method: preset file}`` for the meta-architecture named ``architecture``: those of
    its ``method_family`` (configs/methods/<family>/, the one-stage students' "dense"), else
    configs/methods/."""
    family = ""
    if architecture in META_ARCH_REGISTRY:
        family = getattr(META_ARCH_REGISTRY.get(architecture), "method_family", "")
    if not family:
        return METHOD_PRESETS
    folder = os.path.join(METHODS_DIR, family)
    return {name[: -len(".yaml")]: os.path.join(folder, name)
            for name in sorted(os.listdir(folder)) if name.endswith(".yaml")}


def method_preset(method, architecture):
    """The preset file of ``method`` for ``architecture``, refused with the choices when it has none."""
    presets = method_presets(architecture)
    if presets is METHOD_PRESETS or method in presets:
        return presets[check_choice("--method", method, presets)]
    raise ConfigError(f"--method {method!r}: choose one of {', '.join(presets)} (the methods of "
                      f"MODEL.META_ARCHITECTURE {architecture})")


def get_ilmil_cfg(config_file=None, opts=(), method=None, given_as="--config-file"):
    """detectron2's defaults + the FCOS and ILMIL keys, then the method's preset, then a
    config file (default: the shapes CPU config), then ``KEY VALUE`` overrides.

    ``method`` (``--method``) wins over an ``ILMIL.METHOD`` in the file or opts.
    A missing or unreadable file (named as ``given_as``), an unknown key or a value of
    the wrong type raises :class:`ConfigError` naming it.
    """
    config_file = config_file or DEFAULT_CONFIG
    _check_config_file(config_file, given_as)
    opts = config_overrides(opts)
    plugins = _plugins_named(config_file, opts)
    import_plugins(plugins)
    probe = default_cfg()
    _merge_file(probe, config_file)
    _merge_opts(probe, opts)
    method = method or probe.ILMIL.METHOD
    preset = method_preset(method, probe.MODEL.META_ARCHITECTURE)
    cfg = default_cfg()
    _merge_file(cfg, preset)
    _merge_file(cfg, config_file)
    _merge_opts(cfg, opts)
    cfg.ILMIL.METHOD = method
    # .py files by their absolute path: the run's config.yaml then finds them from any folder.
    cfg.ILMIL.PLUGINS = [os.path.abspath(p) if p.endswith(".py") else p for p in plugins]
    return cfg


def config_file_method(config_file):
    """The ``ILMIL.METHOD`` that ``config_file`` (with its bases) sets, else None."""
    return (_load_with_bases(config_file).get("ILMIL") or {}).get("METHOD")


def config_from_dump(text, opts=()):
    """The config ``cfg.dump()`` wrote as ``text`` on today's defaults (a key added since
    it was written keeps its default), then ``opts``. Its ``ILMIL.PLUGINS`` are not
    imported, their keys taken as written: what it describes runs without them (an
    exported model's graph)."""
    cfg = default_cfg()
    cfg.set_new_allowed(True)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        f.write(text)
        f.flush()
        _merge_file(cfg, f.name)  # as a config file is merged (its numbers taken as meant)
    cfg.set_new_allowed(False)
    _merge_opts(cfg, config_overrides(opts))
    return cfg


def config_overrides(opts):
    """A tool's ``KEY VALUE`` overrides as a list of pairs: argparse keeps the separator of
    ``... -- KEY VALUE`` in them."""
    opts = list(opts)
    return opts[1:] if opts[:1] == ["--"] else opts


_PLUGIN_FILES = {}  # real path of a plugin file -> its module, imported once per process


def import_plugins(plugins):
    """Import each of ``plugins`` (``ILMIL.PLUGINS``), a module name or a .py file's path,
    once; one that fails is a ConfigError naming it."""
    for plugin in plugins:
        try:
            if not plugin.endswith(".py"):
                importlib.import_module(plugin)
                continue
            path = os.path.realpath(plugin)
            if path in _PLUGIN_FILES or any(os.path.realpath(getattr(m, "__file__", None) or "") == path
                                            for m in list(sys.modules.values())):
                continue  # imported already, here or as a module (its losses registered once)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"no such file (from {os.getcwd()})")
            name = f"ilmil_plugin_{len(_PLUGIN_FILES)}_{os.path.basename(path)[:-3]}"
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
            _PLUGIN_FILES[path] = module
        except Exception as e:  # the plugin's own code: any error of it is the plugin's
            raise ConfigError(f"ILMIL.PLUGINS {plugin}: cannot import it ({type(e).__name__}: {e}); fix: give a "
                              "module on the Python path or the path of a .py file, and correct the error") from None


def _plugins_named(config_file, opts):
    """The ``ILMIL.PLUGINS`` of ``config_file`` (with its bases), or of ``opts`` where they
    set it, before either is merged."""
    loaded = _load_with_bases(config_file)
    named = (loaded.get("ILMIL") or {}).get("PLUGINS") or []
    for key, value in zip(opts[0::2], opts[1::2]):
        if key == "ILMIL.PLUGINS":
            named = _literal(value)
    if not isinstance(named, (list, tuple)):
        raise ConfigError(f"ILMIL.PLUGINS {named!r}: a list of modules or .py files; fix: e.g. ILMIL.PLUGINS "
                          "\"['my_losses.py']\"")
    return [str(plugin) for plugin in dict.fromkeys(named)]


_CONFIG_FIX = "fix: give a yaml config such as configs/shapes/faster_rcnn_R18_FPN_cpu.yaml or a run's config.yaml"


def _check_config_file(path, given_as):
    """Refuse a config file that is missing, not YAML, or not a mapping of keys."""
    if not os.path.isfile(path):
        what = "a folder, not a file" if os.path.isdir(path) else "no such file"
        raise ConfigError(f"{given_as} {path}: {what}; {_CONFIG_FIX}")
    try:
        with open(path) as f:
            content = yaml.safe_load(f)
    except yaml.constructor.ConstructorError:
        return  # python-specific tags: detectron2 loads these itself
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        reason = " ".join(str(e).split())
        raise ConfigError(f"{given_as} {path} is not valid YAML ({reason}); {_CONFIG_FIX}") from None
    if not isinstance(content, dict):
        found = "nothing" if content is None else f"a {type(content).__name__}"
        raise ConfigError(f"{given_as} {path} holds {found}, not a mapping of config keys; {_CONFIG_FIX}")


@contextlib.contextmanager
def _numbers_as_meant(cfg, incoming):
    """yacs refuses a value whose type differs from the key's. Two such values are taken as
    meant: a whole number for a decimal key (``ILMIL.DISTILL.DENSE.WEIGHT 1``), and a one-stage
    spec that reads as a number (``ILMIL.STAGES 20``; ``STAGES: '20'`` in a run's config.yaml).
    ``incoming``: {full key: value as read}. Each such key holds a number during the merge and is
    turned back into its type after it."""
    restore = {}
    for key, value in incoming.items():
        *path, leaf = key.split(".")
        node = cfg
        for part in path:
            node = node.get(part) if isinstance(node, CN) else None
        if not isinstance(node, CN) or leaf not in node:
            continue  # unknown: yacs names it
        if key == "ILMIL.STAGES":
            if isinstance(value, int) or (isinstance(value, str) and value.strip().strip("'\"").isdigit()):
                node[leaf], restore[key] = 0, str
        elif isinstance(node[leaf], float) and isinstance(value, int) and not isinstance(value, bool):
            node[leaf], restore[key] = 0, float
    try:
        yield
    finally:
        for key, convert in restore.items():
            *path, leaf = key.split(".")
            node = cfg
            for part in path:
                node = node[part]
            node[leaf] = convert(node[leaf])


def _flat_keys(tree, prefix=""):
    """{full key: value} of the leaves of a loaded yaml mapping."""
    flat = {}
    for name, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat_keys(value, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = value
    return flat


def _literal(text):
    """An override's VALUE as yacs reads it (a Python literal where it is one, else the text)."""
    try:
        return ast.literal_eval(text) if isinstance(text, str) else text
    except (ValueError, SyntaxError):
        return text


def _load_with_bases(path):
    """``path``'s keys merged over its ``_BASE_`` files'; a base that is missing or not YAML
    is a ConfigError naming it (detectron2 raises a bare OSError / YAMLError)."""
    try:
        return CN.load_yaml_with_base(path, allow_unsafe=True)
    except (OSError, yaml.YAMLError) as e:
        reason = " ".join(str(e).split())
        raise ConfigError(f"--config-file {path}: its _BASE_ cannot be read ({reason}); fix: give _BASE_ the path of "
                          "a yaml config, relative to this file") from None


def _merge_file(cfg, path):
    loaded = _load_with_bases(path)
    try:
        with _numbers_as_meant(cfg, _flat_keys(loaded)):
            cfg.merge_from_file(path)
    except (KeyError, ValueError) as e:  # yacs: an unknown key, a value of the wrong type
        raise ConfigError(f"--config-file {path}: {e.args[0]}; fix: correct or remove that key (a plugin's key "
                          "needs its module in ILMIL.PLUGINS)") from None


def _merge_opts(cfg, opts):
    """``KEY VALUE`` overrides, refused (naming the pair) where yacs would only assert."""
    # argparse gives the overrides everything after the first KEY, flags included (a VALUE may
    # start with "--": only the KEY places are looked at).
    first_flag = next((i for i in range(0, len(opts), 2) if str(opts[i]).startswith("--")), None)
    if first_flag is not None:
        flags = [str(o) for o in opts[first_flag:] if str(o).startswith("--")]
        raise ConfigError(f"{' '.join(flags)} after the KEY VALUE config overrides is read as one of them; "
                          "fix: put the flags before the overrides")
    if len(opts) % 2:
        raise ConfigError(f"config overrides {' '.join(map(str, opts))}: a KEY without its VALUE; "
                          "fix: give overrides as KEY VALUE pairs, e.g. SOLVER.MAX_ITER 100")
    for key in opts[0::2]:
        node = cfg
        for part in key.split("."):
            if not isinstance(node, CN) or part not in node:
                raise ConfigError(f"config override {key}: no such config key; fix: check its spelling (the keys "
                                  "are those of detectron2, ilmil/config.py and the modules of ILMIL.PLUGINS)")
            node = node[part]
    try:
        for key, value in zip(opts[0::2], opts[1::2]):  # one by one: a key given twice takes the last
            with _numbers_as_meant(cfg, {key: _literal(value)}):
                cfg.merge_from_list([key, value])
    except ValueError as e:  # yacs: a value of the wrong type
        raise ConfigError(f"config overrides: {e.args[0]}; fix: give a value of the key's type") from None
