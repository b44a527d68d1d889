"""PASCAL VOC AP50 per class, as the VOC devkit computes it: VOC07 11-point and VOC2010+ area.

Written here rather than taken from detectron2: its ``PascalVOCDetectionEvaluator``
uses ``np.bool`` (removed in numpy 1.24; this stack runs numpy 2) and re-reads the
XML files of a VOC folder, while a stage's test set is a list of relabelled records.

Matching (devkit ``VOCevaldet``), per class: the detections of every image in
descending score order; each one is compared with the ground-truth boxes of its
image and class, difficult ones included, and takes the box of largest IoU. If
that IoU > 0.5: a difficult (or crowd) box makes the detection ignored, neither TP
nor FP; a box not yet taken makes it a TP and is taken; a taken box makes it an FP
(duplicate). Otherwise (IoU <= 0.5, or no box) it is an FP. At rank i::

    recall_i = TP_i / N          N = number of non-difficult boxes of the class
    precision_i = TP_i / (TP_i + FP_i)

    VOC07 11-point:   AP = 1/11 * sum_{t = 0, 0.1, ..., 1} max_{recall_i >= t} precision_i   (0 if none)
    VOC2010+ area:    AP = sum_i (recall_i - recall_{i-1}) * max_{j >= i} precision_j       (recall_0 = 0)

The area AP is the exact area under the monotone precision envelope; COCO's AP50
(pycocotools) samples the same envelope at 101 recall points and matches at
IoU >= 0.5, so the two differ by about a point on realistic detections and agree
on perfect ones (100). A class without non-difficult boxes has AP NaN.

IoU is computed on detectron2's continuous coordinates (width = x1 - x0). The VOC
loader maps the devkit's 1-based inclusive pixels [xmin, xmax] to [xmin - 1, xmax],
so ground-truth widths equal the devkit's ``xmax - xmin + 1``, as in detectron2's
own VOC evaluation.
"""
import math

import numpy as np

from detectron2.structures import BoxMode

__all__ = ["VOC_METRICS", "voc_ap", "voc_per_class_ap"]

# Per-class metric names, as they appear in results.json (with _old / _new variants).
VOC_METRICS = ("VOC07_AP50", "VOC_AREA_AP50")

IOU_THRESHOLD = 0.5


def voc_ap(recall, precision, use_07_metric):
    """AP (a fraction) of a ranked list's recall and precision arrays, VOC07 or area."""
    recall, precision = np.asarray(recall, float), np.asarray(precision, float)
    if use_07_metric:
        return float(
            np.mean([precision[recall >= t].max() if np.any(recall >= t) else 0.0 for t in np.linspace(0, 1, 11)])
        )
    padded_recall = np.concatenate(([0.0], recall, [1.0]))
    envelope = np.concatenate(([0.0], precision, [0.0]))
    envelope = np.maximum.accumulate(envelope[::-1])[::-1]  # max precision at this recall or beyond
    steps = np.where(padded_recall[1:] != padded_recall[:-1])[0]
    return float(np.sum((padded_recall[steps + 1] - padded_recall[steps]) * envelope[steps + 1]))


def _iou(box, boxes):
    """IoU of one XYXY box with each row of ``boxes``."""
    width = np.clip(np.minimum(boxes[:, 2], box[2]) - np.maximum(boxes[:, 0], box[0]), 0, None)
    height = np.clip(np.minimum(boxes[:, 3], box[3]) - np.maximum(boxes[:, 1], box[1]), 0, None)
    intersection = width * height
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return intersection / (area + areas - intersection)


def _ground_truth(records, num_classes):
    """Per class: {image index: (XYXY boxes, ignore flags)} and the count of non-ignored boxes."""
    boxes = [dict() for _ in range(num_classes)]
    num_positives = [0] * num_classes
    for image_index, record in enumerate(records):
        for ann in record["annotations"]:
            c = ann["category_id"]
            xyxy = BoxMode.convert(ann["bbox"], ann["bbox_mode"], BoxMode.XYXY_ABS)
            ignore = bool(ann.get("difficult", 0) or ann.get("iscrowd", 0))
            boxes[c].setdefault(image_index, ([], []))
            boxes[c][image_index][0].append(xyxy)
            boxes[c][image_index][1].append(ignore)
            num_positives[c] += not ignore
    return boxes, num_positives


def _ranked_matches(ground_truth, detections):
    """TP and FP flags of the detections of one class in descending score order."""
    gt = {i: (np.asarray(b, float).reshape(-1, 4), np.asarray(ig, bool)) for i, (b, ig) in ground_truth.items()}
    taken = {i: np.zeros(len(ig), bool) for i, (_, ig) in gt.items()}
    order = sorted(detections, key=lambda d: -d["score"])  # stable: ties keep their input order
    tp, fp = np.zeros(len(order)), np.zeros(len(order))
    for rank, det in enumerate(order):
        x, y, w, h = det["bbox"]
        image_gt = gt.get(det["image_id"])
        if image_gt is None:
            fp[rank] = 1
            continue
        ious = _iou(np.array([x, y, x + w, y + h]), image_gt[0])
        best = int(np.argmax(ious))
        if ious[best] <= IOU_THRESHOLD:
            fp[rank] = 1
        elif image_gt[1][best]:
            continue  # difficult: neither TP nor FP
        elif taken[det["image_id"]][best]:
            fp[rank] = 1
        else:
            tp[rank] = 1
            taken[det["image_id"]][best] = True
    return tp, fp


def voc_per_class_ap(records, detections, num_classes):
    """``{class index: {"VOC07_AP50": ap, "VOC_AREA_AP50": ap}}`` in percent (NaN without ground truth).

    ``records`` are detectron2 dicts (contiguous ``category_id``; ``difficult`` and
    ``iscrowd`` boxes ignored); ``detections`` are COCO-format dicts (``bbox`` XYWH)
    whose ``image_id`` indexes ``records``.
    """
    ground_truth, num_positives = _ground_truth(records, num_classes)
    by_class = [[] for _ in range(num_classes)]
    for det in detections:
        by_class[det["category_id"]].append(det)
    result = {}
    for c in range(num_classes):
        if num_positives[c] == 0:
            result[c] = {name: math.nan for name in VOC_METRICS}
            continue
        tp, fp = _ranked_matches(ground_truth[c], by_class[c])
        tp, fp = np.cumsum(tp), np.cumsum(fp)
        recall = tp / num_positives[c]
        # eps: the first ranks may all be ignored (difficult) detections, 0 / 0
        precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        result[c] = {
            "VOC07_AP50": 100 * voc_ap(recall, precision, use_07_metric=True),
            "VOC_AREA_AP50": 100 * voc_ap(recall, precision, use_07_metric=False),
        }
    return result
