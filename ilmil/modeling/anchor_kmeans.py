"""YOLO anchors from the training boxes: k-means on box widths and heights with the
distance d(box, centroid) = 1 - IoU(box, centroid), both boxes sharing one centre
(YOLOv2's choice: a Euclidean distance would let large boxes dominate).

The boxes are taken at the size the detector sees them (the test-time resize of
``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST``). The k = levels x anchors-per-level
centroids, sorted by area, go to the levels finest first, ``NUM_ANCHORS`` each.
"""
import numpy as np

from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.structures import BoxMode

from ..config import ConfigError, check_value, derived_cfg
from .yolo import YOLOV3

__all__ = ["is_yolo_config", "kmeans_anchors", "record_boxes", "resize_scale", "training_box_sizes", "with_yolo_anchors", "yolo_anchors"]


def _iou(wh, centroids):
    inter = np.minimum(wh[:, None], centroids[None]).prod(axis=2)
    return inter / (wh.prod(axis=1)[:, None] + centroids.prod(axis=1)[None] - inter)


def kmeans_anchors(wh, k, seed=0, max_iter=300):
    """``k`` centroids [k, 2] of the box sizes ``wh`` [B, 2] under the 1 - IoU distance,
    sorted by area. Seeded k-means++ initialisation, then Lloyd iterations until no box
    changes cluster; a cluster left empty keeps its centroid."""
    wh = np.asarray(wh, dtype=np.float64).reshape(-1, 2)
    wh = wh[(wh > 0).all(axis=1)]  # a box of no area overlaps no anchor
    # k-means++ draws each next centroid among the sizes not yet chosen: k needs k sizes.
    sizes = len(np.unique(wh, axis=0))
    if sizes < k:
        raise ConfigError(f"{len(wh)} training boxes of {sizes} distinct sizes cannot give {k} anchors; fix: fewer "
                          "MODEL.YOLO.NUM_ANCHORS or levels, or give MODEL.YOLO.ANCHORS")
    rng = np.random.default_rng(seed)
    centroids = wh[[rng.integers(len(wh))]]
    while len(centroids) < k:
        distance = (1 - _iou(wh, centroids)).min(axis=1) ** 2
        centroids = np.vstack([centroids, wh[rng.choice(len(wh), p=distance / distance.sum())]])
    assignment = None
    for _ in range(max_iter):
        nearest = _iou(wh, centroids).argmax(axis=1)
        if assignment is not None and np.array_equal(nearest, assignment):
            break
        assignment = nearest
        for cluster in range(k):
            members = wh[assignment == cluster]
            if len(members):
                centroids[cluster] = np.median(members, axis=0)  # robust to a few outlier boxes
    return centroids[np.argsort(centroids.prod(axis=1))]


def resize_scale(height, width, min_size, max_size):
    """The factor by which ResizeShortestEdge(min_size, max_size) scales a height x width image
    (1 for a min_size of 0: detectron2 leaves the image as it is)."""
    if min_size == 0:
        return 1.0
    scale = min_size / min(height, width)
    if max(height, width) * scale > max_size:
        scale = max_size / max(height, width)
    return scale


def record_boxes(record):
    """[B, 4] XYXY_ABS boxes of a dataset record's annotations (any absolute ``bbox_mode``;
    XYXY_ABS where it has none)."""
    boxes = [BoxMode.convert(list(a["bbox"]), a.get("bbox_mode", BoxMode.XYXY_ABS), BoxMode.XYXY_ABS)
             for a in record.get("annotations", [])]
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4)


def training_box_sizes(dataset_dicts, min_size, max_size):
    """[B, 2] widths and heights of every box of ``dataset_dicts`` (XYXY_ABS or XYWH_ABS),
    scaled as ResizeShortestEdge(min_size, max_size) scales its image."""
    sizes = [np.zeros((0, 2))]
    for record in dataset_dicts:
        boxes = record_boxes(record)
        sizes.append((boxes[:, 2:] - boxes[:, :2]) * resize_scale(record["height"], record["width"], min_size, max_size))
    return np.concatenate(sizes).astype(np.float64)


def yolo_anchors(cfg, dataset_dicts, seed=0):
    """``MODEL.YOLO.ANCHORS`` computed from ``dataset_dicts``: per level, finest first, a
    list of ``NUM_ANCHORS`` [w, h] rounded to 0.1 px."""
    y = cfg.MODEL.YOLO
    check_value("MODEL.YOLO.NUM_ANCHORS", y.NUM_ANCHORS, y.NUM_ANCHORS >= 1, "at least 1 (anchors per level)", 3)
    wh = training_box_sizes(dataset_dicts, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    centroids = kmeans_anchors(wh, len(y.IN_FEATURES) * y.NUM_ANCHORS, seed)
    return [[[round(float(w), 1), round(float(h), 1)] for w, h in centroids[i:i + y.NUM_ANCHORS]]
            for i in range(0, len(centroids), y.NUM_ANCHORS)]


def is_yolo_config(cfg):
    """Whether ``cfg``'s meta-architecture is the YOLO detector (or a student of it)."""
    arch = cfg.MODEL.META_ARCHITECTURE
    return arch in META_ARCH_REGISTRY and issubclass(META_ARCH_REGISTRY.get(arch), YOLOV3)


def with_yolo_anchors(cfg, dataset_dicts):
    """``cfg`` itself unless it is a YOLO config without anchors; then a copy whose
    ``MODEL.YOLO.ANCHORS`` are computed from ``dataset_dicts`` (seed 0: they do not
    change with the training seed, so runs of several seeds share them)."""
    if not is_yolo_config(cfg) or cfg.MODEL.YOLO.ANCHORS:
        return cfg
    return derived_cfg(cfg, {"MODEL.YOLO.ANCHORS": yolo_anchors(cfg, dataset_dicts)})
