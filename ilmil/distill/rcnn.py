"""``IncrementalRCNN``: a Faster R-CNN student that learns from a frozen teacher.

Without a teacher (stage 0, ``finetune``, ``joint``) it is detectron2's
``GeneralizedRCNN``. With one, each training step runs the teacher (its own
normalisation, no gradients) on the same augmented batch, records the outputs
the distiller's terms name in both models, and adds, as configured:

- pseudo-labels: the teacher's confident old-class detections as extra GT;
- the distiller's terms (``loss_distill_<section>``: ``feat``, ``rpn``, ``rcn``, and
  any registered loss whose ``ILMIL.DISTILL`` section is enabled);
- an unbiased box-head classification loss (``ILMIL.UNBIASED_CLS``, MMA): a
  proposal labelled background may be an unlabeled old object.

Its own part in distillation is what only a two-stage detector has: the box head
run on the teacher proposals a RoI term selects (the RCN term), in one pooling
pass with the detection loss's proposals.
"""
import torch

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN
from detectron2.structures import Boxes

from ..config import ConfigError, uses_teacher
from ..modeling.pseudo_labels import teacher_detections
from ..modeling.unbiased import unbiased_cross_entropy
from .losses import RCNDistillation
from .precision import as_float32
from .registry import DistillContext
from .student import DistillationStudent

__all__ = ["IncrementalRCNN"]


@META_ARCH_REGISTRY.register()
class IncrementalRCNN(DistillationStudent, GeneralizedRCNN):
    detector_architecture = "GeneralizedRCNN"

    @configurable
    def __init__(self, *, teacher=None, distiller=None, pseudo_labels=None, teacher_num_proposals=0,
                 teacher_precision="float32", unbiased_cls=False, **kwargs):
        """
        Args:
            teacher: frozen ``GeneralizedRCNN`` (``ilmil.distill.build_teacher``) or None.
            distiller: ``ilmil.distill.Distiller`` of the active terms, or None.
            pseudo_labels: None (off) or {"score_thresh", "nms_thresh", "iou_thresh", "cross_class_iou"}.
            teacher_num_proposals: teacher proposals per image through its box head (0 = all).
            teacher_precision: a key of ``TEACHER_PRECISIONS``, the teacher pass's autocast dtype.
            unbiased_cls: box-head classification with background as "background or an old
                class" (the teacher's classes); needs a teacher.
            kwargs: arguments of ``GeneralizedRCNN``.
        """
        super().__init__(**kwargs)
        self.init_student(teacher, distiller, pseudo_labels, teacher_precision)
        self.teacher_num_proposals = teacher_num_proposals
        self.unbiased_cls = unbiased_cls

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        ilmil = cfg.ILMIL
        if not ilmil.TEACHER.WEIGHTS or not uses_teacher(cfg):
            return ret
        for key, enabled in (("ILMIL.DISTILL.RCN.ENABLED", ilmil.DISTILL.RCN.ENABLED),
                             ("ILMIL.UNBIASED_CLS.ENABLED", ilmil.UNBIASED_CLS.ENABLED)):
            if enabled and (cfg.MODEL.MASK_ON or cfg.MODEL.KEYPOINT_ON or cfg.MODEL.ROI_BOX_HEAD.TRAIN_ON_PRED_BOXES):
                # both replace the box branch's pass (forward), which has no mask/keypoint variant here
                raise ConfigError(
                    f"{key} needs box-only ROI heads: set MODEL.MASK_ON, MODEL.KEYPOINT_ON "
                    f"and MODEL.ROI_BOX_HEAD.TRAIN_ON_PRED_BOXES to False, or {key} False"
                )
        return {**ret, **cls.student_args(cfg, ret["backbone"]),
                "teacher_num_proposals": ilmil.TEACHER.NUM_PROPOSALS, "unbiased_cls": ilmil.UNBIASED_CLS.ENABLED}

    def _rcn_term(self):
        return self.distiller.term(RCNDistillation.config_key) if self.distiller is not None else None

    def _box_outputs(self, model, features, boxes):
        heads = model.roi_heads
        pooled = heads.box_pooler([features[f] for f in heads.box_in_features], boxes)
        return heads.box_predictor(heads.box_head(pooled))

    def _anchors(self, features):
        """{RPN level: its anchors}: the anchor generator caches its grids, so this is cheap."""
        rpn = self.proposal_generator
        levels = rpn.in_features
        return dict(zip(levels, rpn.anchor_generator([features[f] for f in levels])))

    def forward(self, batched_inputs):
        if not self.training or self.teacher is None:
            return super().forward(batched_inputs)
        images = self.preprocess_image(batched_inputs)
        gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
        teacher = self.run_teacher(images, gt_instances, batched_inputs)

        if self.pseudo_labels is not None:
            gt_instances = self.add_pseudo_labels(teacher, gt_instances)

        with self._recorder.recording():
            features = self.backbone(images.tensor)
            proposals, proposal_losses = self.proposal_generator(images, features, gt_instances)
        student = self._recorder.collect()
        rcn = self._rcn_term()
        if rcn is None and not self.unbiased_cls:
            _, detector_losses = self.roi_heads(images, features, proposals, gt_instances)
        else:
            detector_losses, rcn_outputs = self._box_losses_and_rcn_outputs(
                features, proposals, gt_instances, teacher.get("rcn_boxes")
            )
            if rcn is not None:
                student[rcn.ROIS] = rcn_outputs

        losses = {**detector_losses, **proposal_losses}
        if self.distiller is not None:
            context = DistillContext(
                gt_instances=gt_instances,
                strides=self._strides,
                anchors=self._anchors(features),
                num_old_classes=self.teacher.roi_heads.num_classes,
                teacher_outputs={"proposals": teacher["proposals"], "box_outputs": teacher["box_outputs"]},
            )
            losses = self.distiller.weigh_detection(losses)
            losses.update(self.distiller(student, teacher["records"], context))
        return losses

    def _box_losses_and_rcn_outputs(self, features, proposals, gt_instances, rcn_boxes=None):
        """The box head's detection losses on the sampled proposals, and its outputs
        on the teacher's RCN boxes (None: no RCN term), from one ROIAlign + box-head
        pass over both sets: pooling is a large part of the backward pass on CPU, and
        two pooler calls would pay for it twice. (The box head is per-ROI, so sharing
        the batch changes nothing.) With ``unbiased_cls`` the classification loss is
        the unbiased one."""
        heads = self.roi_heads
        proposals = heads.label_and_sample_proposals(proposals, gt_instances)
        if rcn_boxes is None:
            rcn_boxes = [sampled.proposal_boxes[:0] for sampled in proposals]
        boxes, is_rcn = [], []
        for sampled, extra in zip(proposals, rcn_boxes):
            boxes.append(Boxes.cat([sampled.proposal_boxes, extra]))
            is_rcn += [False] * len(sampled) + [True] * len(extra)
        scores, deltas = self._box_outputs(self, features, boxes)
        is_rcn = torch.tensor(is_rcn, device=scores.device)
        predictor = heads.box_predictor
        losses = predictor.losses((scores[~is_rcn], deltas[~is_rcn]), proposals)
        if self.unbiased_cls:
            gt_classes = torch.cat([p.gt_classes for p in proposals])
            num_old = self.teacher.roi_heads.num_classes
            losses["loss_cls"] = predictor.loss_weight.get("loss_cls", 1.0) * unbiased_cross_entropy(
                scores[~is_rcn], gt_classes, num_old
            )
        return losses, (scores[is_rcn], deltas[is_rcn])

    @torch.no_grad()
    def run_teacher(self, images, gt_instances=None, batched_inputs=None):
        """One teacher pass: the recorded outputs (``"records"``), proposals at test
        settings and box-head outputs on them (shared by pseudo-labels and the RCN
        term); under autocast at the configured precision, its tensors returned in
        float32. ``images``: the student's input, used as the teacher's when both
        normalise alike (else ``batched_inputs`` are normalised the teacher's way).
        ``gt_instances`` (the stage's new-class GT) steer the RCN sampling."""
        if batched_inputs is not None:
            images = self._teacher.images(batched_inputs, images, self)
        with self._teacher.autocast():
            out = as_float32(self._teacher_pass(images))
        rcn = self._rcn_term()
        if rcn is not None:
            out["rcn_boxes"], out["records"][rcn.ROIS] = rcn.select_rois(
                out["proposals"], out["box_outputs"], gt_instances
            )
        return out

    def _teacher_pass(self, images):
        teacher = self.teacher
        with self._teacher_recorder.recording():
            features = teacher.backbone(images.tensor)
            proposals, _ = teacher.proposal_generator(images, features, None)
        out = {"records": self._teacher_recorder.collect()}
        if self.teacher_num_proposals > 0:
            # Sorted by objectness: the top ones hold the old objects, and the box head
            # on all test-time proposals is a fifth of the teacher pass on CPU.
            proposals = [p[: self.teacher_num_proposals] for p in proposals]
        out["proposals"] = proposals
        out["box_outputs"] = self._box_outputs(teacher, features, [p.proposal_boxes for p in proposals])
        return out

    def add_pseudo_labels(self, teacher, gt_instances):
        cfg = self.pseudo_labels
        detections = teacher_detections(
            self.teacher.roi_heads.box_predictor,
            teacher["box_outputs"],
            teacher["proposals"],
            cfg["score_thresh"],
            cfg["nms_thresh"],
        )
        return self.merge_pseudo_labels(detections, gt_instances)
