"""Pseudo-labels: the teacher's confident old-class detections become ground truth.

New-stage images hold old-class objects that nobody labelled; trained as
background they are forgotten fastest. The teacher's detections with score >=
0.5 after per-class NMS (0.3 for Faster R-CNN's box head, a one-stage teacher's own
test-time NMS), one class per box (detections overlapping at IoU
> 0.7 under other classes give way to the most confident), are added as ground
truth of their old classes, except where they overlap a new-class GT box at IoU >=
0.7 (the box is then already labelled, with a new class).
"""
import math

import torch

from detectron2.modeling.roi_heads.fast_rcnn import fast_rcnn_inference
from detectron2.structures import Instances, pairwise_iou
from torchvision.ops import nms

__all__ = ["teacher_detections", "away_from_gt", "one_class_per_box", "drop_boxes_on_new_gt", "add_pseudo_labels"]


def teacher_detections(box_predictor, predictions, proposals, score_thresh, nms_thresh, max_per_image=100):
    """Final detections of the teacher's box predictor, at pseudo-label thresholds."""
    boxes = box_predictor.predict_boxes(predictions, proposals)
    scores = box_predictor.predict_probs(predictions, proposals)
    image_shapes = [p.image_size for p in proposals]
    # fast_rcnn_inference keeps scores strictly above its threshold; the rule is ">=".
    inclusive = torch.nextafter(torch.tensor(float(score_thresh)), torch.tensor(-math.inf)).item()
    detections, _ = fast_rcnn_inference(boxes, scores, image_shapes, inclusive, nms_thresh, max_per_image)
    return detections


def away_from_gt(boxes, gt_instances, iou_thresh):
    """Mask of the ``boxes`` whose IoU with every GT box is below ``iou_thresh``."""
    if len(boxes) == 0 or len(gt_instances) == 0:
        return torch.ones(len(boxes), dtype=torch.bool, device=boxes.device)
    return pairwise_iou(boxes, gt_instances.gt_boxes).max(dim=1).values < iou_thresh


def drop_boxes_on_new_gt(detections, gt_instances, iou_thresh):
    """Keep the detections whose IoU with every GT box is below ``iou_thresh``."""
    return detections[away_from_gt(detections.pred_boxes, gt_instances, iou_thresh)]


def one_class_per_box(detections, iou_thresh):
    """Of ``detections`` overlapping at more than ``iou_thresh``, the most confident: a head
    with a sigmoid per class can score one box above the threshold under two classes, which
    as labels of one object would contradict each other."""
    if iou_thresh >= 1.0 or len(detections) < 2:
        return detections
    return detections[nms(detections.pred_boxes.tensor.float(), detections.scores.float(), iou_thresh)]


def add_pseudo_labels(gt_instances, detections):
    """GT instances extended with ``detections`` as boxes of their (old) classes."""
    pseudo = Instances(gt_instances.image_size)
    pseudo.gt_boxes = detections.pred_boxes
    pseudo.gt_classes = detections.pred_classes.to(torch.int64)
    return Instances.cat([gt_instances, pseudo])
