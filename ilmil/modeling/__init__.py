"""Modeling: head expansion, distillation losses, pseudo-labels, the incremental
meta-architecture and yacs-built FCOS (imported here so that they register themselves)."""
from .build import build_detector, load_detector, with_checkpoint_layout
from .distillation import (
    DISTILL_LOSS_REGISTRY,
    FEATURE_DISTANCES,
    FeatureDistillation,
    RCNDistillation,
    RPNDistillation,
    build_distill_loss,
    check_distill_choices,
    old_class_logits,
)
from .expansion import CLASSIFIER_KEYS, expand_predictor_state_dict, load_expanded, state_dict_num_classes
from .fcos import FCOS
from .incremental_rcnn import (
    CheckpointClassesError,
    IncrementalRCNN,
    TEACHER_PRECISIONS,
    TeacherMismatchError,
    build_teacher,
    checkpoint_class_names,
    fold_batchnorm,
    load_checked_checkpoint,
)
from .pseudo_labels import add_pseudo_labels, drop_boxes_on_new_gt, teacher_detections

__all__ = [
    "build_detector",
    "load_detector",
    "with_checkpoint_layout",
    "CLASSIFIER_KEYS",
    "CheckpointClassesError",
    "DISTILL_LOSS_REGISTRY",
    "FCOS",
    "FEATURE_DISTANCES",
    "FeatureDistillation",
    "IncrementalRCNN",
    "RCNDistillation",
    "RPNDistillation",
    "TEACHER_PRECISIONS",
    "TeacherMismatchError",
    "add_pseudo_labels",
    "build_distill_loss",
    "build_teacher",
    "check_distill_choices",
    "checkpoint_class_names",
    "drop_boxes_on_new_gt",
    "expand_predictor_state_dict",
    "fold_batchnorm",
    "load_checked_checkpoint",
    "load_expanded",
    "old_class_logits",
    "state_dict_num_classes",
    "teacher_detections",
]
