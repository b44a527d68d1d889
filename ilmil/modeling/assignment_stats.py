"""How many positives a one-stage detector's assignment gives each training object.

A dense detector's classifier learns an object from the anchors its assignment
makes positive, and the feature locations they sit at are what its convolutions
see. Counted over shapes training images: RetinaNet's IoU assignment on 9 anchors
gives 1.7 locations per object, ATSS on one anchor per location 6.8, FCOS 8.1,
YOLOv3's 2.1 (6.4 with YOLOv5's neighbour cells). RetinaNet with 1.7 learned at
half FCOS's pace or less, with 6.8 at FCOS's; YOLO's classifier did not speed up
with 6.4 (BENCHMARKS.md), so the count is one cause, not the only one.
``tools/positives_per_object.py`` prints the count of a config.

Each image is taken at the size the detector sees it (the test-time resize, padded
to the backbone's size divisibility); the detector's own assignment labels it:
``label_anchors`` (detectron2's RetinaNet and FCOS, ilmil's ATSS) or YOLO's
``assign``.
"""
import math
from dataclasses import dataclass

import torch

from detectron2.structures import Boxes, Instances

from ..config import ConfigError
from .anchor_kmeans import record_boxes, resize_scale
from .yolo import YOLOV3

__all__ = ["PositivesPerObject", "positives_per_object"]


@dataclass
class PositivesPerObject:
    """Means over ``objects`` objects of ``images`` images."""

    images: int
    objects: int
    locations: float  # feature locations (level, cell) holding a positive of the object
    anchors: float  # positive anchors (several per location where a location has several)
    without: int  # objects with no positive at all

    def __str__(self):
        return (f"{self.locations:.2f} feature locations, {self.anchors:.2f} anchors per object "
                f"({self.objects} objects of {self.images} images; {self.without} with no positive)")


def positives_per_object(model, dataset_dicts, min_size, max_size):
    """The ``PositivesPerObject`` of ``model``'s assignment over ``dataset_dicts`` (records
    with XYXY_ABS or XYWH_ABS boxes), each image resized as ResizeShortestEdge(min_size,
    max_size) resizes it."""
    if not isinstance(model, YOLOV3) and not hasattr(model, "label_anchors"):
        raise ConfigError(f"{type(model).__name__} has no one-stage assignment to count; positives per object "
                          "are counted for RetinaNet, FCOS and YOLO")
    locations, anchors, without = [], [], 0
    for record in dataset_dicts:
        gt, image_size = _scaled_gt(record, min_size, max_size)
        if len(gt) == 0:
            continue
        location, gt_index = _assigned(model, gt, _level_grids(model, image_size))
        for g in range(len(gt)):
            mine = location[gt_index == g]
            anchors.append(len(mine))
            locations.append(len(torch.unique(mine)))
            without += len(mine) == 0
    count = max(len(locations), 1)
    return PositivesPerObject(len(dataset_dicts), len(locations), sum(locations) / count, sum(anchors) / count,
                              without)


def _scaled_gt(record, min_size, max_size):
    """(the record's boxes as ``Instances`` at the detector's input size, that size)."""
    scale = resize_scale(record["height"], record["width"], min_size, max_size)
    boxes = torch.as_tensor(record_boxes(record) * scale, dtype=torch.float32)
    size = (int(record["height"] * scale + 0.5), int(record["width"] * scale + 0.5))
    gt = Instances(size, gt_boxes=Boxes(boxes), gt_classes=torch.zeros(len(boxes), dtype=torch.int64))
    return gt, size


def _level_grids(model, image_size):
    """Per head level, an empty [1, 1, H, W] map of that level's size for the padded image
    (anchor generators and YOLO's anchors read only the maps' sizes)."""
    divisor = max(model.backbone.size_divisibility, 1)
    height, width = (math.ceil(x / divisor) * divisor for x in image_size)
    shapes = model.backbone.output_shape()
    strides = [shapes[f].stride for f in model.head_in_features]
    return [torch.zeros(1, 1, math.ceil(height / s), math.ceil(width / s), device=model.device) for s in strides]


def _assigned(model, gt, grids):
    """(feature location id, GT index) of each positive anchor of one image."""
    gt = gt.to(model.device)
    if isinstance(model, YOLOV3):
        level_anchors = model.level_anchors(grids)
        slot, gt_index = model.assign([gt], level_anchors, [tuple(g.shape[-2:]) for g in grids])[0]
        per_level = torch.tensor([len(a) for a in level_anchors], device=slot.device)
        cell_anchors = torch.tensor([len(a) for a in model.anchors], device=slot.device)
        level = torch.bucketize(slot, per_level.cumsum(0), right=True)
        first_slot = per_level.cumsum(0) - per_level
        first_location = (per_level // cell_anchors).cumsum(0) - per_level // cell_anchors
        return first_location[level] + (slot - first_slot[level]) // cell_anchors[level], gt_index
    labels, boxes = model.label_anchors(model.anchor_generator(grids), [gt])
    labels, boxes = labels[0], boxes[0].tensor if isinstance(boxes[0], Boxes) else boxes[0]
    positive = ((labels >= 0) & (labels < model.num_classes)).nonzero().squeeze(1)
    # The assignment names the matched box, not its index: find it among the image's boxes.
    gt_index = (boxes[positive, None] == gt.gt_boxes.tensor[None]).all(dim=2).float().argmax(dim=1)
    return positive // model.anchor_generator.num_anchors[0], gt_index
