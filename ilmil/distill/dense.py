"""Students of the one-stage detectors: ``IncrementalRetinaNet``, ``IncrementalFCOS`` and
``IncrementalYOLOV3``.

Each is detectron2's detector (ilmil's yacs-built FCOS, ilmil's YOLO) plus the student mixin.
With a teacher, a training step:

1. runs the teacher on the raw images (its own normalisation), recording the
   outputs the terms name; with pseudo-labels it runs as at test time (its own
   score threshold and NMS), and its detections at the input size are what
   pseudo-labels come from;
2. adds, as pseudo-labels, the teacher's detections of score >= SCORE_THRESH that do
   not overlap a GT box of the stage at IoU >= NEW_GT_IOU_THRESH;
3. runs the detector's own forward (losses with the merged GT), recording the
   student's outputs, and adds the distiller's terms.

The forward is the detector's own: nothing of RetinaNet's or FCOS's is re-implemented.
"""
import functools

import torch

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY

from ..modeling.fcos import FCOS
from ..modeling.head_boxes import decode_head_boxes, head_anchor_boxes
from ..modeling.retinanet import RetinaNet
from ..modeling.yolo import YOLOV3
from .precision import as_float32
from .registry import DistillContext
from .student import DistillationStudent

__all__ = ["DenseStudent", "IncrementalFCOS", "IncrementalRetinaNet", "IncrementalYOLOV3"]


class DenseStudent(DistillationStudent):
    """The distilled training step of a ``DenseDetector`` (see the module docstring)."""

    method_family = "dense"
    # Whether the head's locations have anchor boxes, which FGFI's mask compares with the GT boxes.
    has_anchor_boxes = True

    @configurable
    def __init__(self, *, teacher=None, distiller=None, pseudo_labels=None, teacher_precision="float32", **kwargs):
        """``init_student``'s arguments, and the detector's as ``kwargs``."""
        super().__init__(**kwargs)
        # The head's input maps, for their anchors (recording keeps references, it computes nothing).
        head_maps = self.head_in_features if distiller is not None and self.has_anchor_boxes else ()
        self.init_student(teacher, distiller, pseudo_labels, teacher_precision, student_records=head_maps)
        # Feature terms alone need the teacher's backbone, not its head or NMS.
        self._teacher_head_needed = teacher is not None and (pseudo_labels is not None or any(
            not path.startswith("backbone") for path in self._teacher_recorder.module_paths))

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        return {**ret, **cls.student_args(cfg, ret["backbone"])}

    def forward(self, batched_inputs):
        if not self.training or self.teacher is None:
            return super().forward(batched_inputs)
        detections = self.run_teacher(batched_inputs)
        gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
        if self.pseudo_labels is not None:
            gt_instances = self.add_pseudo_labels(detections["instances"], gt_instances)
            batched_inputs = [{**x, "instances": gt} for x, gt in zip(batched_inputs, gt_instances)]
        with self._recorder.recording():
            losses = super().forward(batched_inputs)
        student = self._recorder.collect()
        if self.distiller is not None:
            context = DistillContext(
                gt_instances=gt_instances,
                strides=self._strides,
                head_strides=[self._strides[f] for f in self.head_in_features],
                anchors=self.anchors_of(student),
                num_old_classes=self.teacher.num_classes,
                teacher_outputs=self.teacher_outputs(detections),
                box_decoders={"student": functools.partial(decode_head_boxes, self),
                              "teacher": functools.partial(decode_head_boxes, self.teacher)},
            )
            losses = self.distiller.weigh_detection(losses)
            losses.update(self.distiller(student, detections["records"], context))
        return losses

    def anchors_of(self, student):
        """{head level: its anchor boxes} at the sizes of the ``student``'s recorded maps ({} without anchors)."""
        if not self.has_anchor_boxes:
            return {}
        levels = self.head_in_features
        return dict(zip(levels, head_anchor_boxes(self, [student[level] for level in levels])))

    @torch.no_grad()
    def run_teacher(self, batched_inputs):
        """The teacher's pass on the raw images, its own normalisation: the recorded
        outputs (``"records"``) and, with pseudo-labels, its test-time detections at the
        input size (``"instances"``; None without). It runs only as far as these need:
        feature terms alone need the backbone, not the head or the NMS."""
        teacher = self.teacher
        with self._teacher.autocast(), self._teacher_recorder.recording():
            images = teacher.preprocess_image(batched_inputs)
            features = teacher.backbone(images.tensor)
            if self._teacher_head_needed:
                features = [features[f] for f in teacher.head_in_features]
                predictions = teacher.head(features)
        records = as_float32(self._teacher_recorder.collect())
        if self.pseudo_labels is None:
            return {"instances": None, "records": records}
        # detectron2's FCOS inference takes the sigmoid of its inputs in place: it gets copies,
        # so that the recorded head outputs stay the teacher's logits. In float32: its NMS
        # refuses boxes and scores of two dtypes.
        copies = [[x.float().clone() for x in level_outputs] for level_outputs in predictions]
        return {"instances": teacher.forward_inference(images, as_float32(features), copies), "records": records}

    def teacher_outputs(self, detections):
        """The teacher outputs the losses may weigh by: its detections (with pseudo-labels)
        and, for a head with objectness (YOLO), its objectness maps."""
        outputs = {} if detections["instances"] is None else {"detections": detections["instances"]}
        head = detections["records"].get("head")
        if head is not None and getattr(self.teacher, "has_objectness", False):
            outputs["objectness"] = head[2]
        return outputs

    def add_pseudo_labels(self, detections, gt_instances):
        """The teacher's test-time detections (its own NMS) at the pseudo-label score threshold
        merged into ``gt_instances``."""
        thresh = self.pseudo_labels["score_thresh"]
        return self.merge_pseudo_labels([det[det.scores >= thresh] for det in detections], gt_instances)


@META_ARCH_REGISTRY.register()
class IncrementalRetinaNet(DenseStudent, RetinaNet):
    """RetinaNet (detectron2's, with ilmil's choice of anchor assignment) as a student (a
    plain RetinaNet without a teacher)."""

    detector_architecture = "RetinaNet"


@META_ARCH_REGISTRY.register()
class IncrementalFCOS(DenseStudent, FCOS):
    """FCOS as a student (a plain FCOS without a teacher)."""

    detector_architecture = "FCOS"
    # Its locations are points: the anchor generator's stride-sized squares only place them.
    has_anchor_boxes = False


@META_ARCH_REGISTRY.register()
class IncrementalYOLOV3(DenseStudent, YOLOV3):
    """The YOLOv3-style detector as a student (a plain YOLOV3 without a teacher)."""

    detector_architecture = "YOLOV3"
