"""Modeling: building detectors (in a pruned checkpoint's layout), head expansion,
pseudo-labels, the unbiased classification loss and yacs-built FCOS (imported here
so that it registers itself)."""
from .build import build_detector, load_detector, with_checkpoint_layout
from .expansion import expand_predictor_state_dict, load_expanded
from .fcos import FCOS
from .pseudo_labels import add_pseudo_labels, drop_boxes_on_new_gt, teacher_detections

__all__ = [
    "FCOS",
    "build_detector",
    "load_detector",
    "with_checkpoint_layout",
    "add_pseudo_labels",
    "drop_boxes_on_new_gt",
    "expand_predictor_state_dict",
    "load_expanded",
    "teacher_detections",
]
