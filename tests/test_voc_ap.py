"""VOC07 11-point and VOC2010+ area AP50 (ilmil.evaluation.voc_ap) on hand-computed
cases, against pycocotools' AP50 on the same detections, and inside the stage evaluator."""
import json
import math

import numpy as np
import pytest
import torch

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode, Boxes, Instances

from ilmil.evaluation import (IncrementalEvaluator, class_agnostic_coco_ap, coco_ground_truth, per_class_coco_ap, voc_ap,
                              voc_per_class_ap)


def _record(image_id, boxes, size=100):
    """``boxes``: (x0, y0, x1, y1, class, difficult)."""
    return {
        "image_id": image_id, "width": size, "height": size,
        "annotations": [{"bbox": list(b[:4]), "bbox_mode": BoxMode.XYXY_ABS, "category_id": b[4], "difficult": b[5]}
                        for b in boxes],
    }


def _det(image, box, score, category=0):
    x0, y0, x1, y1 = box
    return {"image_id": image, "category_id": category, "bbox": [x0, y0, x1 - x0, y1 - y0], "score": score}


def _voc(records, detections, num_classes=1):
    return voc_per_class_ap(records, detections, num_classes)


def _coco_ap50(records, detections, num_classes=1):
    return per_class_coco_ap(coco_ground_truth(records, [f"c{i}" for i in range(num_classes)]), detections, num_classes)


A, B = (10, 10, 40, 40), (50, 50, 90, 90)
FAR = (0, 60, 20, 95)  # overlaps neither A nor B


def test_tp_fp_tp_ranking():
    # ranks: TP (0.9), FP (0.8), TP (0.7): recall .5 .5 1, precision 1 .5 2/3
    records = [_record(0, [(*A, 0, 0), (*B, 0, 0)])]
    detections = [_det(0, A, 0.9), _det(0, FAR, 0.8), _det(0, B, 0.7)]
    ap = _voc(records, detections)[0]
    assert ap["VOC_AREA_AP50"] == pytest.approx(100 * (0.5 * 1 + 0.5 * 2 / 3))
    assert ap["VOC07_AP50"] == pytest.approx(100 * (6 * 1 + 5 * 2 / 3) / 11)  # t = 0..0.5 -> 1, t = 0.6..1 -> 2/3
    # COCO samples the same envelope at 101 recall points: 51 at precision 1, 50 at 2/3.
    assert _coco_ap50(records, detections)[0][1] == pytest.approx(100 * (51 + 50 * 2 / 3) / 101)


def test_class_agnostic_ap_matches_boxes_whatever_their_class():
    # Both objects found with the other's class: no AP50 per class, all of it pooled.
    records = [_record(0, [(*A, 0, 0), (*B, 1, 0)])]
    swapped = [_det(0, A, 0.9, category=1), _det(0, B, 0.8, category=0)]
    gt = coco_ground_truth(records, ["c0", "c1"])
    assert [ap50 for _, ap50 in per_class_coco_ap(gt, swapped, 2).values()] == [0.0, 0.0]
    assert class_agnostic_coco_ap(gt, swapped)[1] == pytest.approx(100.0)
    # A miss ranked between them: TP, FP, TP as in the ranking test above.
    ranked = swapped + [_det(0, FAR, 0.85, category=1)]
    assert class_agnostic_coco_ap(gt, ranked)[1] == pytest.approx(100 * (51 + 50 * 2 / 3) / 101)
    assert class_agnostic_coco_ap(gt, []) == (0.0, 0.0)


def test_voc_ap_of_recall_precision_arrays():
    assert voc_ap([0.5, 0.5, 1.0], [1.0, 0.5, 2 / 3], use_07_metric=False) == pytest.approx(5 / 6)
    assert voc_ap([0.5, 0.5, 1.0], [1.0, 0.5, 2 / 3], use_07_metric=True) == pytest.approx(28 / 33)
    # recall never reaches 1: the 11-point AP counts 0 where recall < t
    assert voc_ap([0.25], [1.0], use_07_metric=True) == pytest.approx(3 / 11)
    assert voc_ap([0.25], [1.0], use_07_metric=False) == pytest.approx(0.25)
    assert voc_ap([], [], use_07_metric=False) == 0.0


def test_difficult_boxes_are_neither_tp_nor_fp():
    records = [_record(0, [(*A, 0, 1), (*B, 0, 0)])]
    detections = [_det(0, A, 0.9), _det(0, B, 0.8)]  # the best-scored one hits the difficult box
    ap = _voc(records, detections)[0]
    assert ap == {"VOC07_AP50": pytest.approx(100), "VOC_AREA_AP50": pytest.approx(100)}
    # counted as ground truth, the difficult box would make the ranking TP TP of 2: also 100;
    # as an FP it would halve the first precision: the ignore rule is what keeps 100.
    as_fp = _voc([_record(0, [(*B, 0, 0)])], [_det(0, FAR, 0.9), _det(0, B, 0.8)])[0]
    assert as_fp["VOC_AREA_AP50"] == pytest.approx(50)
    # a difficult-only class has no positives: NaN, as COCO's -1
    only_difficult = _voc([_record(0, [(*A, 0, 1)])], [_det(0, A, 0.9)])[0]
    assert math.isnan(only_difficult["VOC07_AP50"]) and math.isnan(only_difficult["VOC_AREA_AP50"])
    # and so in COCO's AP, whether the model detects nothing or only another class
    records = [_record(0, [(*A, 0, 1), (*B, 1, 0)])]
    for detections in ([], [_det(0, B, 0.9, category=1)]):
        assert all(math.isnan(v) for v in _coco_ap50(records, detections, num_classes=2)[0]), detections
    gt = coco_ground_truth([_record(0, [(*A, 0, 1)])], ["c0"])
    assert all(math.isnan(v) for v in class_agnostic_coco_ap(gt, []))


def test_duplicates_are_false_positives_and_misses_cap_recall():
    records = [_record(0, [(*A, 0, 0), (*B, 0, 0)])]
    ap = _voc(records, [_det(0, A, 0.9), _det(0, (11, 11, 40, 40), 0.8)])[0]  # B missed, A detected twice
    assert ap["VOC_AREA_AP50"] == pytest.approx(50)
    assert ap["VOC07_AP50"] == pytest.approx(100 * 6 / 11)


def test_detections_in_images_without_objects_of_the_class_are_false_positives():
    records = [_record(0, [(*A, 0, 0)]), _record(1, [(*B, 1, 0)])]
    ap = _voc(records, [_det(1, B, 0.95, category=0), _det(0, A, 0.5)], num_classes=2)
    assert ap[0]["VOC_AREA_AP50"] == pytest.approx(50)  # FP then TP: precision 1/2 at recall 1
    assert ap[1]["VOC_AREA_AP50"] == 0.0  # ground truth but no detection
    assert math.isnan(_voc(records, [], num_classes=3)[2]["VOC07_AP50"])  # no ground truth at all


def test_iou_of_exactly_half_is_a_miss_for_voc_and_a_hit_for_coco():
    records = [_record(0, [(0, 0, 10, 10, 0, 0)])]
    detections = [_det(0, (0, 0, 10, 5), 0.9)]  # IoU 50 / 100
    assert _voc(records, detections)[0]["VOC_AREA_AP50"] == 0.0  # devkit: IoU > 0.5
    assert _coco_ap50(records, detections)[0][1] == pytest.approx(100)  # pycocotools: IoU >= 0.5


def _random_case(seed, num_images=80, num_classes=3, perfect=False):
    rng = np.random.default_rng(seed)
    records, detections = [], []
    for image in range(num_images):
        boxes = []
        for _ in range(rng.integers(1, 5)):
            x0, y0 = rng.uniform(0, 150, 2)
            w, h = rng.uniform(20, 100, 2)
            boxes.append((x0, y0, min(x0 + w, 256), min(y0 + h, 256), int(rng.integers(num_classes)), 0))
        records.append(_record(image, boxes, size=256))
        for x0, y0, x1, y1, c, _ in boxes:
            if perfect:
                detections.append(_det(image, (x0, y0, x1, y1), float(rng.uniform(0.5, 1)), c))
                continue
            if rng.random() < 0.85:  # found, with a jittered box and a score that favours good boxes
                jitter = rng.normal(0, 0.1, 4) * [x1 - x0, y1 - y0, x1 - x0, y1 - y0]
                box = np.array([x0, y0, x1, y1]) + jitter
                detections.append(_det(image, tuple(box), float(np.clip(rng.normal(0.7, 0.15), 0.01, 1)), c))
        for _ in range(0 if perfect else rng.integers(0, 4)):  # background false positives
            x0, y0 = rng.uniform(0, 200, 2)
            detections.append(_det(image, (x0, y0, x0 + 40, y0 + 40), float(rng.uniform(0, 0.8)),
                                   int(rng.integers(num_classes))))
    return records, detections


def test_perfect_detections_score_100_in_every_definition():
    records, detections = _random_case(0, perfect=True)
    voc, coco = _voc(records, detections, 3), _coco_ap50(records, detections, 3)
    for c in range(3):
        assert voc[c]["VOC07_AP50"] == pytest.approx(100)
        assert voc[c]["VOC_AREA_AP50"] == pytest.approx(100)
        assert coco[c][1] == pytest.approx(100)


@pytest.mark.parametrize("seed", [1, 2])
def test_area_ap_agrees_with_coco_ap50_on_realistic_detections(seed):
    records, detections = _random_case(seed)
    voc, coco = _voc(records, detections, 3), _coco_ap50(records, detections, 3)
    for c in range(3):
        assert 30 < coco[c][1] < 95, coco  # a realistic, imperfect case
        # Area AP vs 101-point sampling of the same envelope; the matching differs too
        # (COCO skips boxes already taken, VOC calls a detection on one a duplicate).
        assert voc[c]["VOC_AREA_AP50"] == pytest.approx(coco[c][1], abs=2.0)
        # 11 recall points instead of 101: coarser still
        assert voc[c]["VOC07_AP50"] == pytest.approx(coco[c][1], abs=5.0)
    assert np.mean([voc[c]["VOC_AREA_AP50"] - coco[c][1] for c in range(3)]) == pytest.approx(0, abs=1.0)


def test_evaluator_adds_voc_ap_on_voc_datasets_and_saves_detections(tmp_path):
    name = "test_voc_ap_stage1_test"
    records = [_record("000005", [(*A, 0, 0), (*B, 1, 0)]), _record("000007", [(*B, 1, 1)])]
    for catalog in (DatasetCatalog, MetadataCatalog):
        if name in catalog.list():
            catalog.remove(name)
    DatasetCatalog.register(name, lambda: records)
    MetadataCatalog.get(name).set(thing_classes=["cat", "dog"], old_classes=["cat"], new_classes=["dog"], is_voc=True)
    evaluator = IncrementalEvaluator(name, output_dir=str(tmp_path / "stage_1"))
    evaluator.reset()
    for record, boxes, classes in ((records[0], [A, B], [0, 1]), (records[1], [B], [1])):
        instances = Instances((100, 100), pred_boxes=Boxes(torch.tensor(boxes, dtype=torch.float32)),
                              scores=torch.tensor([0.9] * len(boxes)), pred_classes=torch.tensor(classes))
        evaluator.process([{"image_id": record["image_id"]}], [{"instances": instances}])
    summary = evaluator.evaluate()["bbox"]
    assert summary["per_class"]["dog"]["VOC07_AP50"] == pytest.approx(100)  # the difficult dog is ignored
    for key in ("VOC07_AP50", "VOC07_AP50_old", "VOC07_AP50_new", "VOC_AREA_AP50", "VOC_AREA_AP50_old",
                "VOC_AREA_AP50_new", "AP50_old"):
        assert summary[key] == pytest.approx(100), key
    saved = json.loads((tmp_path / "stage_1" / "detections.json").read_text())
    assert sorted((d["image_id"], d["category_name"], d["category_id"]) for d in saved) == [
        ("000005", "cat", 0), ("000005", "dog", 1), ("000007", "dog", 1)]
    assert saved[0]["bbox"] == pytest.approx([10, 10, 30, 30])
    # The documented format only (pycocotools adds area, id and a polygon to the dicts it is given).
    assert all(d.keys() == {"image_id", "category_id", "category_name", "bbox", "score"} for d in saved)
