"""What every student meta-architecture shares: a frozen teacher held outside its
module tree, the distiller of the config's terms as a submodule, the recorders of
both models, and training with the teacher always in eval mode.

A student class (``IncrementalRCNN``, ``IncrementalRetinaNet``, ``IncrementalFCOS``, ``IncrementalYOLOV3``)
is a detectron2 detector plus this mixin and its own ``forward``; without a teacher
(stage 0, ``finetune``, ``joint``) it is the plain detector it extends, named by
``detector_architecture`` (what its teachers are built as).
"""
from torch import nn

from detectron2.data import MetadataCatalog
from detectron2.utils.events import get_event_storage

from ..config import uses_teacher
from ..modeling.pseudo_labels import add_pseudo_labels, drop_boxes_on_new_gt, one_class_per_box
from .distiller import DISTILLER_PREFIX, build_distiller
from .recorder import Recorder, feature_shapes
from .teacher import FrozenTeacher, build_teacher

__all__ = ["DistillationStudent", "is_student_architecture"]


def is_student_architecture(cls):
    """Whether meta-architecture class ``cls`` can hold a teacher."""
    return issubclass(cls, DistillationStudent)


class DistillationStudent:
    """Mixin of the student meta-architectures (see the module docstring)."""

    # The plain detector the student extends: what its teachers and deployed models are built as.
    detector_architecture = ""
    # Its method presets: configs/methods/<method_family>/<method>.yaml ("" = configs/methods/).
    method_family = ""

    def init_student(self, teacher=None, distiller=None, pseudo_labels=None, teacher_precision="float32",
                     student_records=()):
        """Attach ``teacher`` (None: a plain detector), ``distiller`` and the pseudo-label
        settings (None: off; else {"score_thresh", "nms_thresh", "iou_thresh", "cross_class_iou"}).
        ``student_records``: names the student's step needs recorded besides the terms'."""
        self._teacher = FrozenTeacher(teacher, teacher_precision) if teacher is not None else None
        self.distiller = distiller
        self.pseudo_labels = pseudo_labels
        self.bn_stats_frozen = False
        if teacher is not None:
            teacher.to(self.device)
            records = distiller.records() if distiller is not None else ()
            self._recorder = Recorder(self, (*records, *student_records))
            self._teacher_recorder = Recorder(teacher, records)
            self._strides = {name: shape.stride for name, shape in feature_shapes(self.backbone).items()}

    @classmethod
    def student_args(cls, cfg, backbone):
        """The ``init_student`` arguments of ``cfg``: the teacher of ``ILMIL.TEACHER`` checked
        against the training data's old classes, the distiller, the pseudo-label settings."""
        ilmil = cfg.ILMIL
        if not ilmil.TEACHER.WEIGHTS or not uses_teacher(cfg):
            return {}
        expected = MetadataCatalog.get(cfg.DATASETS.TRAIN[0]).get("old_classes") if cfg.DATASETS.TRAIN else None
        teacher = build_teacher(cfg, ilmil.TEACHER.WEIGHTS, expected)
        pseudo = ilmil.PSEUDO_LABELS
        return {
            "teacher": teacher,
            "distiller": build_distiller(cfg, feature_shapes(backbone), feature_shapes(teacher.backbone)),
            "pseudo_labels": {"score_thresh": pseudo.SCORE_THRESH, "nms_thresh": pseudo.NMS_THRESH,
                              "iou_thresh": pseudo.NEW_GT_IOU_THRESH,
                              "cross_class_iou": pseudo.CROSS_CLASS_IOU} if pseudo.ENABLED else None,
            "teacher_precision": ilmil.TEACHER.PRECISION,
        }

    def merge_pseudo_labels(self, detections, gt_instances):
        """Per image, the GT with the teacher's ``detections`` (at the pseudo-label score
        threshold already) added as labels, except those on a GT box; the count is logged."""
        merged, count = [], 0
        for gt, det in zip(gt_instances, detections):
            det = one_class_per_box(det, self.pseudo_labels["cross_class_iou"])
            det = drop_boxes_on_new_gt(det, gt, self.pseudo_labels["iou_thresh"])
            count += len(det)
            merged.append(add_pseudo_labels(gt, det))
        get_event_storage().put_scalar("pseudo_boxes_per_image", count / max(len(gt_instances), 1))
        return merged

    @property
    def teacher(self):
        return self._teacher.module if self._teacher is not None else None

    def freeze_bn_stats(self):
        """Use (and keep) the BatchNorm running statistics in training too; the
        affine parameters still learn."""
        self.bn_stats_frozen = True
        return self.train(self.training)

    def train(self, mode=True):
        """The teacher stays in eval mode whatever the student's mode."""
        super().train(mode)
        if self.bn_stats_frozen:
            for name, module in self.named_modules():
                # The detector's BatchNorms; a connector's (new with this stage) learns its statistics.
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and not name.startswith(DISTILLER_PREFIX):
                    module.eval()
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def _apply(self, fn, *args, **kwargs):
        """Moving the student (``.to(device)``) moves the teacher too."""
        super()._apply(fn, *args, **kwargs)
        if getattr(self, "_teacher", None) is not None:
            self._teacher.module._apply(fn, *args, **kwargs)
        return self
