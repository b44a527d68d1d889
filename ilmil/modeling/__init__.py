"""Modeling: building detectors (in a pruned checkpoint's layout), head expansion,
pseudo-labels, the unbiased classification loss, yacs-built FCOS, RetinaNet with ATSS, the YOLOv3-style
detector with its k-means anchors and ResNet-18/34 FPN backbones of any width, positives per object of a one-stage assignment (imported
here so that they register themselves)."""
from .anchor_kmeans import is_yolo_config, kmeans_anchors, with_yolo_anchors, yolo_anchors
from .assignment_stats import PositivesPerObject, positives_per_object
from .build import build_detector, load_detector, with_checkpoint_layout
from .expansion import expand_predictor_state_dict, load_expanded
from .fcos import FCOS
from .head_boxes import decode_head_boxes, head_anchor_boxes
from .pseudo_labels import add_pseudo_labels, drop_boxes_on_new_gt, one_class_per_box, teacher_detections
from .resnet import build_any_width_resnet
from .retinanet import RetinaNet, atss_assignment
from .small_maps import TooSmallMapError, one_value_per_channel
from .yolo import YOLOV3

__all__ = [
    "FCOS",
    "RetinaNet",
    "atss_assignment",
    "decode_head_boxes",
    "head_anchor_boxes",
    "YOLOV3",
    "TooSmallMapError",
    "one_value_per_channel",
    "build_detector",
    "load_detector",
    "build_any_width_resnet",
    "with_checkpoint_layout",
    "add_pseudo_labels",
    "drop_boxes_on_new_gt",
    "one_class_per_box",
    "expand_predictor_state_dict",
    "load_expanded",
    "teacher_detections",
    "is_yolo_config",
    "kmeans_anchors",
    "PositivesPerObject",
    "positives_per_object",
    "with_yolo_anchors",
    "yolo_anchors",
]
