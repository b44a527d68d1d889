"""Per-class AP of a stage's test set, split into old and new classes.

pycocotools' ``COCOeval`` computes COCO AP@[.5:.95] and AP50 (detectron2's
``COCOEvaluator`` reports per-class AP but not per-class AP50, and its fast path
needs the C++ ops); on VOC-format datasets (metadata ``is_voc``) ``voc_ap.py`` adds
the VOC07 11-point and VOC2010+ area AP50. The ground truth is the stage's test
records: every seen class, with VOC "difficult" and COCO crowd boxes as ignore regions.

For the classes of a stage (``old`` = learned in earlier stages, ``new`` = this
stage's), every metric M gets::

    M_old = mean_{c in old} M_c      M_new = mean_{c in new} M_c      M = mean_{c in old + new} M_c

skipping classes without test objects (M_c NaN). ``AP_class_agnostic`` and
``AP50_class_agnostic`` pool every class (pycocotools' ``useCats = 0``): a detection
matches any object, whatever the class, so they measure finding and boxing objects
apart from naming them (a detector whose classifier lags has these high and AP50
low). ``detections.json`` (written when
the evaluator has an ``output_dir``) lists the stage's detections in COCO result
format: ``image_id`` is the test record's ``image_id`` (the dataset's own id: the
COCO image id, the VOC file id), ``category_id`` the class index in the stage's
class order (``category_name`` names it), ``bbox`` [x, y, width, height] in pixels
of the original image, and ``score``.
"""
import contextlib
import io
import json
import logging
import math
import os

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from detectron2.structures import BoxMode
from detectron2.utils import comm

from ..file_io import atomic_write
from .voc_ap import voc_per_class_ap

__all__ = ["IncrementalEvaluator", "class_agnostic_coco_ap", "coco_ground_truth", "per_class_coco_ap",
           "summarize_old_new"]

logger = logging.getLogger(__name__)


def coco_ground_truth(records, class_names):
    """A pycocotools ``COCO`` index of detectron2 records (``category_id`` contiguous)."""
    images, annotations = [], []
    for image_index, record in enumerate(records):
        images.append({"id": image_index, "width": record["width"], "height": record["height"]})
        for ann in record["annotations"]:
            x0, y0, x1, y1 = BoxMode.convert(ann["bbox"], ann["bbox_mode"], BoxMode.XYXY_ABS)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_index,
                    "category_id": ann["category_id"],
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": (x1 - x0) * (y1 - y0),
                    "iscrowd": int(bool(ann.get("iscrowd", 0) or ann.get("difficult", 0))),
                }
            )
    coco = COCO()
    coco.dataset = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i, "name": name} for i, name in enumerate(class_names)],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _coco_results(coco_gt, detections):
    """pycocotools' results of ``detections``, from copies: loadRes adds an area, an id and
    a box polygon to the dicts it is given (the saved detections keep their format)."""
    return coco_gt.loadRes([dict(d) for d in detections])


def per_class_coco_ap(coco_gt, detections, num_classes):
    """``{class index: (AP, AP50)}`` in percent; NaN for a class without ground truth.

    ``detections`` are COCO-format dicts whose ``image_id`` indexes the records.
    """
    if not detections:  # 0 where the class has objects to find; difficult / crowd ones alone are none (NaN)
        return {c: (0.0 if coco_gt.getAnnIds(catIds=[c], iscrowd=0) else math.nan,) * 2 for c in range(num_classes)}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval = COCOeval(coco_gt, _coco_results(coco_gt, detections), "bbox")
        coco_eval.params.catIds = list(range(num_classes))
        coco_eval.evaluate()
        coco_eval.accumulate()
    # precision: [IoU thresholds, recall points, classes, area ranges, max dets];
    # area "all" and 100 detections per image; -1 marks "no ground truth".
    precision = coco_eval.eval["precision"][:, :, :, 0, -1]
    return {c: _ap_and_ap50(precision[:, :, c]) for c in range(num_classes)}


def _ap_and_ap50(precision):
    """(AP, AP50) in percent of one class's [IoU thresholds, recall points] precision,
    whose -1 marks "no ground truth" (NaN where all are)."""
    def mean(p):
        return float(np.mean(p[p > -1])) * 100 if np.any(p > -1) else math.nan

    return mean(precision), mean(precision[0])


def class_agnostic_coco_ap(coco_gt, detections):
    """``(AP, AP50)`` in percent with every class pooled: a detection matches the objects
    of any class (NaN without ground truth)."""
    if not coco_gt.getAnnIds(iscrowd=0):
        return math.nan, math.nan
    if not detections:
        return 0.0, 0.0
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval = COCOeval(coco_gt, _coco_results(coco_gt, detections), "bbox")
        coco_eval.params.useCats = 0
        coco_eval.evaluate()
        coco_eval.accumulate()
    return _ap_and_ap50(coco_eval.eval["precision"][:, :, 0, 0, -1])  # the one pooled "class", area all, 100 dets


def _nanmean(values):
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def summarize_old_new(per_class, old_classes, new_classes):
    """Every per-class metric (AP, AP50, VOC ones) averaged over all seen, old and
    new classes, plus ``per_class`` by name."""
    metrics = list(next(iter(per_class.values()))) if per_class else []
    summary = {}
    for suffix, names in (("", old_classes + new_classes), ("_old", old_classes), ("_new", new_classes)):
        for metric in metrics:
            summary[metric + suffix] = _nanmean([per_class[n][metric] for n in names])
    summary["per_class"] = {n: per_class[n] for n in old_classes + new_classes}
    return summary


class IncrementalEvaluator(DatasetEvaluator):
    """Evaluates a model on a registered stage test set (see ``register_stage_datasets``);
    with ``output_dir``, also saves the detections there (``detections.json``)."""

    def __init__(self, dataset_name, output_dir=None):
        self._dataset_name = dataset_name
        self._output_dir = output_dir
        meta = MetadataCatalog.get(dataset_name)
        self._class_names = list(meta.thing_classes)
        self._old = list(meta.old_classes)
        self._new = list(meta.new_classes)
        self._is_voc = bool(meta.get("is_voc", False))
        self._records = DatasetCatalog.get(dataset_name)
        self._index_of = {r["image_id"]: i for i, r in enumerate(self._records)}
        self.reset()

    def reset(self):
        self._detections = []
        self._evaluated = []

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            self._evaluated.append(inp["image_id"])
            instances = out["instances"].to("cpu")
            self._detections.extend(instances_to_coco_json(instances, self._index_of[inp["image_id"]]))

    def evaluate(self):
        detections = comm.gather(self._detections, dst=0)
        evaluated = comm.gather(self._evaluated, dst=0)
        if not comm.is_main_process():
            return {}
        detections = [d for part in detections for d in part]
        evaluated = [image_id for part in evaluated for image_id in part]
        coco_gt = coco_ground_truth(self._records, self._class_names)
        per_index = per_class_coco_ap(coco_gt, detections, len(self._class_names))
        per_class = {
            name: {"AP": per_index[i][0], "AP50": per_index[i][1]} for i, name in enumerate(self._class_names)
        }
        if self._is_voc:
            for i, voc in voc_per_class_ap(self._records, detections, len(self._class_names)).items():
                per_class[self._class_names[i]].update(voc)
        if self._output_dir:
            self._save_detections(detections)
        summary = summarize_old_new(per_class, self._old, self._new)
        summary["AP_class_agnostic"], summary["AP50_class_agnostic"] = class_agnostic_coco_ap(coco_gt, detections)
        summary["num_detections"] = len(detections)
        summary["num_images"] = len(self._records)
        # Images the model saw, over all processes; each exactly once when it equals num_images.
        summary["num_images_evaluated"] = len(evaluated)
        if sorted(map(str, evaluated)) != sorted(str(r["image_id"]) for r in self._records):
            logger.warning("%s: %d of %d test images were evaluated (a sharding problem?)",
                           self._dataset_name, len(set(map(str, evaluated))), len(self._records))
        logger.info(
            "%s: AP50 %.1f (old %.1f, new %.1f), AP %.1f; class-agnostic AP50 %.1f",
            self._dataset_name, summary["AP50"], summary["AP50_old"], summary["AP50_new"], summary["AP"],
            summary["AP50_class_agnostic"],
        )
        return {"bbox": summary}

    def _save_detections(self, detections):
        # image_id: the record's own id (it indexed the records for pycocotools)
        saved = [
            dict(det, image_id=self._records[det["image_id"]]["image_id"],
                 category_name=self._class_names[det["category_id"]])
            for det in detections
        ]
        os.makedirs(self._output_dir, exist_ok=True)
        atomic_write(os.path.join(self._output_dir, "detections.json"), lambda f: json.dump(saved, f), mode="w")
