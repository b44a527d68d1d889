"""Modeling: building detectors (in a pruned checkpoint's layout), head expansion,
pseudo-labels and the unbiased classification loss."""
from .build import build_detector, load_detector, with_checkpoint_layout
from .expansion import expand_predictor_state_dict, load_expanded
from .incremental_rcnn import (
    CheckpointClassesError,
    TeacherMismatchError,
    checkpoint_class_names,
    load_checked_checkpoint,
)
from .pseudo_labels import add_pseudo_labels, drop_boxes_on_new_gt, teacher_detections

__all__ = [
    "build_detector",
    "load_detector",
    "with_checkpoint_layout",
    "CheckpointClassesError",
    "TeacherMismatchError",
    "add_pseudo_labels",
    "checkpoint_class_names",
    "drop_boxes_on_new_gt",
    "expand_predictor_state_dict",
    "load_checked_checkpoint",
    "load_expanded",
    "teacher_detections",
]
