"""Modeling: building detectors (in a pruned checkpoint's layout), head expansion,
pseudo-labels and the unbiased classification loss."""
from .build import build_detector, load_detector, with_checkpoint_layout
from .expansion import expand_predictor_state_dict, load_expanded
from .pseudo_labels import add_pseudo_labels, drop_boxes_on_new_gt, teacher_detections

__all__ = [
    "build_detector",
    "load_detector",
    "with_checkpoint_layout",
    "add_pseudo_labels",
    "drop_boxes_on_new_gt",
    "expand_predictor_state_dict",
    "load_expanded",
    "teacher_detections",
]
