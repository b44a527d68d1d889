"""Pseudo-labels (docs/methods.md, section 4.1): the teacher's detections with score >= 0.5 after
per-class NMS at 0.3, dropped where IoU with a new-class GT box >= 0.7, are added
as GT of their old classes. Tested on a real ``FastRCNNOutputLayers``."""
import pytest
import torch

from detectron2.layers import ShapeSpec
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers
from detectron2.structures import Boxes, Instances, pairwise_iou

from ilmil.modeling import add_pseudo_labels, drop_boxes_on_new_gt, one_class_per_box, teacher_detections

IMAGE_SIZE = (100, 120)


def _detections(boxes, classes, scores=None):
    det = Instances(IMAGE_SIZE)
    det.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).view(-1, 4))
    det.pred_classes = torch.tensor(classes, dtype=torch.int64)
    det.scores = torch.tensor(scores if scores is not None else [0.9] * len(classes), dtype=torch.float32)
    return det


def _gt(boxes, classes):
    gt = Instances(IMAGE_SIZE)
    gt.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).view(-1, 4))
    gt.gt_classes = torch.tensor(classes, dtype=torch.int64)
    return gt


# --------------------------------------------------------------------------- one_class_per_box


def test_one_box_scored_under_two_classes_keeps_its_most_confident_class():
    det = _detections(
        [
            [0, 0, 10, 10],  # class 1 at 0.6...
            [0, 0, 10, 9],  # ...and class 2 at 0.8 on nearly the same box (IoU 0.9): this one kept
            [0, 0, 10, 4],  # IoU 0.4 with both: another object, kept
            [50, 50, 60, 60],  # elsewhere, kept
        ],
        [1, 2, 1, 1],
        [0.6, 0.8, 0.7, 0.55],
    )
    kept = one_class_per_box(det, 0.7)
    assert kept.pred_classes.tolist() == [2, 1, 1] and kept.scores.tolist() == pytest.approx([0.8, 0.7, 0.55])
    assert len(one_class_per_box(det, 1.0)) == 4  # 1 keeps every detection
    assert len(one_class_per_box(det, 0.3)) == 2  # the 0.4 overlap goes too


# --------------------------------------------------------------------------- drop_boxes_on_new_gt


def test_detection_overlapping_a_new_gt_box_is_dropped_and_others_kept():
    gt = _gt([[0, 0, 10, 10], [60, 60, 80, 80]], [3, 4])
    det = _detections(
        [
            [0, 0, 10, 10],  # IoU 1.0 with GT 0: dropped
            [0, 0, 10, 6],  # IoU 0.6 with GT 0: kept
            [30, 30, 50, 50],  # no overlap: kept
            [61, 61, 80, 80],  # IoU 0.9025 with GT 1: dropped
        ],
        [0, 1, 2, 0],
    )
    ious = pairwise_iou(det.pred_boxes, gt.gt_boxes).max(dim=1).values
    assert ious.tolist() == pytest.approx([1.0, 0.6, 0.0, 0.9025])
    kept = drop_boxes_on_new_gt(det, gt, 0.7)
    assert kept.pred_boxes.tensor.tolist() == [[0, 0, 10, 6], [30, 30, 50, 50]]
    assert kept.pred_classes.tolist() == [1, 2]
    assert kept.scores.shape == (2,)


def test_detection_at_exactly_the_iou_threshold_is_dropped():
    gt = _gt([[0, 0, 10, 10]], [3])
    det = _detections([[0, 0, 10, 7], [0, 0, 10, 6.9]], [0, 1])  # IoU 0.70 and 0.69
    kept = drop_boxes_on_new_gt(det, gt, 0.7)
    assert kept.pred_classes.tolist() == [1]


def test_without_gt_boxes_every_detection_is_kept():
    det = _detections([[0, 0, 10, 10], [5, 5, 20, 20]], [0, 1])
    assert len(drop_boxes_on_new_gt(det, _gt([], []), 0.7)) == 2
    assert len(drop_boxes_on_new_gt(_detections([], []), _gt([[0, 0, 5, 5]], [3]), 0.7)) == 0


# --------------------------------------------------------------------------- add_pseudo_labels


def test_pseudo_labels_are_appended_after_the_gt_with_their_classes():
    gt = _gt([[0, 0, 10, 10], [60, 60, 80, 80]], [3, 4])
    det = _detections([[20, 20, 40, 40], [5, 50, 25, 70]], [1, 0], scores=[0.8, 0.6])
    merged = add_pseudo_labels(gt, det)
    assert merged.image_size == IMAGE_SIZE
    assert merged.gt_boxes.tensor.tolist() == [[0, 0, 10, 10], [60, 60, 80, 80], [20, 20, 40, 40], [5, 50, 25, 70]]
    assert merged.gt_classes.tolist() == [3, 4, 1, 0]
    assert merged.gt_classes.dtype == torch.int64
    assert set(merged.get_fields()) == {"gt_boxes", "gt_classes"}
    # The inputs are left as they were.
    assert len(gt) == 2 and len(det) == 2


def test_no_detections_leave_the_gt_unchanged():
    gt = _gt([[0, 0, 10, 10]], [3])
    merged = add_pseudo_labels(gt, _detections([], []))
    assert merged.gt_boxes.tensor.tolist() == [[0, 0, 10, 10]] and merged.gt_classes.tolist() == [3]


# --------------------------------------------------------------------------- teacher_detections


def _predictor(num_classes):
    """A real detectron2 box predictor; its layers are not used (predictions are given)."""
    return FastRCNNOutputLayers(
        input_shape=ShapeSpec(channels=8),
        box2box_transform=Box2BoxTransform(weights=(10.0, 10.0, 5.0, 5.0)),
        num_classes=num_classes,
    )


def _proposals(boxes, image_size=IMAGE_SIZE):
    p = Instances(image_size)
    p.proposal_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).view(-1, 4))
    return p


def _logits(probs):
    """Logits whose softmax is ``probs`` (rows: [class 0, ..., class K-1, background])."""
    return torch.tensor(probs, dtype=torch.float32).log()


def _predictions(probs, num_classes):
    scores = _logits(probs)
    return scores, torch.zeros(len(probs), 4 * num_classes)  # zero deltas: boxes = proposals


# Image 0: two overlapping boxes of class 0 (IoU 0.5), the same box as class 1, and
# one box scored below the threshold for every class.
BOXES_0 = [[0, 0, 20, 20], [0, 0, 20, 10], [50, 50, 70, 70], [0, 0, 20, 20]]
PROBS_0 = [[0.9, 0.05, 0.05], [0.7, 0.1, 0.2], [0.3, 0.3, 0.4], [0.1, 0.8, 0.1]]


def test_teacher_detections_keep_confident_boxes_after_per_class_nms():
    iou = pairwise_iou(Boxes(torch.tensor(BOXES_0[:1], dtype=torch.float32)),
                       Boxes(torch.tensor(BOXES_0[1:2], dtype=torch.float32)))
    assert iou.item() == pytest.approx(0.5)
    (det,) = teacher_detections(_predictor(2), _predictions(PROBS_0, 2), [_proposals(BOXES_0)], 0.5, 0.3)
    assert det.image_size == IMAGE_SIZE
    # The 0.7 box of class 0 is suppressed by the 0.9 one (IoU 0.5 > 0.3); the class-1
    # box on the same place is kept (NMS is per class); the 0.3/0.3 box is below 0.5.
    assert det.pred_classes.tolist() == [0, 1]
    assert det.scores.tolist() == pytest.approx([0.9, 0.8], rel=1e-5)
    assert det.pred_boxes.tensor.flatten().tolist() == pytest.approx([0, 0, 20, 20, 0, 0, 20, 20], abs=1e-4)


def test_teacher_detections_use_the_given_nms_threshold():
    (det,) = teacher_detections(_predictor(2), _predictions(PROBS_0, 2), [_proposals(BOXES_0)], 0.5, 0.6)
    assert sorted(zip(det.pred_classes.tolist(), [round(s, 4) for s in det.scores.tolist()])) == [
        (0, 0.7), (0, 0.9), (1, 0.8)]


def test_teacher_detections_use_the_given_score_threshold():
    (det,) = teacher_detections(_predictor(2), _predictions(PROBS_0, 2), [_proposals(BOXES_0)], 0.85, 0.3)
    assert det.pred_classes.tolist() == [0] and det.scores.tolist() == pytest.approx([0.9], rel=1e-5)
    (det,) = teacher_detections(_predictor(2), _predictions(PROBS_0, 2), [_proposals(BOXES_0)], 0.25, 0.3)
    # 0.3 of box 2 now passes, for both classes; the 0.2 background never counts.
    assert sorted(det.scores.tolist()) == pytest.approx([0.3, 0.3, 0.8, 0.9], rel=1e-5)


def test_teacher_detection_scored_exactly_at_the_threshold_is_kept():
    # One class: logits [0, 0] give a score of exactly 0.5 (docs/methods.md: score >= 0.5).
    predictions = (torch.zeros(1, 2), torch.zeros(1, 4))
    probs = _predictor(1).predict_probs(predictions, [_proposals([[10, 10, 30, 30]])])[0]
    assert probs[0, 0].item() == 0.5
    (det,) = teacher_detections(_predictor(1), predictions, [_proposals([[10, 10, 30, 30]])], 0.5, 0.3)
    assert len(det) == 1, "a detection with score == SCORE_THRESH must become a pseudo-label"


def test_teacher_detections_are_split_per_image_and_apply_the_deltas():
    boxes_1 = [[10, 10, 50, 30]]
    probs_1 = [[0.05, 0.9, 0.05]]
    scores = torch.cat([_logits(PROBS_0), _logits(probs_1)])
    deltas = torch.zeros(5, 8)
    # Image 1's box, class 1: dx = 0.1 * 10 (weights 10) shifts it by 0.1 * width = 4 px.
    deltas[4, 4:8] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    dets = teacher_detections(_predictor(2), (scores, deltas), [_proposals(BOXES_0), _proposals(boxes_1)], 0.5, 0.3)
    assert len(dets) == 2
    assert len(dets[0]) == 2
    assert dets[1].pred_classes.tolist() == [1]
    assert dets[1].pred_boxes.tensor.flatten().tolist() == pytest.approx([14, 10, 54, 30], abs=1e-3)


def test_teacher_boxes_are_clipped_to_the_image():
    predictions = _predictions([[0.9, 0.05, 0.05]], 2)
    (det,) = teacher_detections(_predictor(2), predictions, [_proposals([[-5, 90, 40, 130]])], 0.5, 0.3)
    height, _ = IMAGE_SIZE
    assert det.pred_boxes.tensor.flatten().tolist() == pytest.approx([0, 90, 40, height])
