"""Modeling: head expansion, distillation losses, pseudo-labels and the incremental
meta-architecture (imported here so that it registers itself)."""
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
from .expansion import expand_predictor_state_dict, load_expanded
from .incremental_rcnn import (
    IncrementalRCNN,
    TEACHER_PRECISIONS,
    build_teacher,
    fold_batchnorm,
)
from .pseudo_labels import add_pseudo_labels, drop_boxes_on_new_gt, teacher_detections

__all__ = [
    "build_detector",
    "load_detector",
    "with_checkpoint_layout",
    "DISTILL_LOSS_REGISTRY",
    "FEATURE_DISTANCES",
    "FeatureDistillation",
    "IncrementalRCNN",
    "RCNDistillation",
    "RPNDistillation",
    "TEACHER_PRECISIONS",
    "add_pseudo_labels",
    "build_distill_loss",
    "build_teacher",
    "check_distill_choices",
    "drop_boxes_on_new_gt",
    "expand_predictor_state_dict",
    "fold_batchnorm",
    "load_expanded",
    "old_class_logits",
    "teacher_detections",
]
