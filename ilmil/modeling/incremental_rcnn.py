"""``IncrementalRCNN``: a Faster R-CNN student that learns from a frozen teacher.

Without a teacher (stage 0, ``finetune``) it is detectron2's ``GeneralizedRCNN``.
With one, each training step runs the teacher (eval mode, no grad) on the same
augmented batch and adds, as configured:

- pseudo-labels: the teacher's confident old-class detections as extra GT;
- ``loss_distill_feat``: multi-layer feature distillation (backbone res2..res5, FPN p2..p6);
- ``loss_distill_rpn``: RPN objectness and deltas;
- ``loss_distill_rcn``: box-head logits and deltas on the teacher's top proposals;
- an unbiased box-head classification loss (``ILMIL.UNBIASED_CLS``, MMA): a
  proposal labelled background may be an unlabeled old object.

The teacher is held outside the module tree: it is not in the student's
``state_dict``, not in its optimizer and never wrapped by DistributedDataParallel.
"""
import logging

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.layers import Conv2d, FrozenBatchNorm2d
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN
from detectron2.structures import Boxes
from detectron2.utils.events import get_event_storage

from ..checkpoint import CheckpointError, safe_load
from ..config import check_choice, uses_teacher
from .build import load_detector
from .distillation import build_distill_loss
from .expansion import CLASSIFIER_KEYS, state_dict_num_classes
from .pseudo_labels import add_pseudo_labels, away_from_gt, drop_boxes_on_new_gt, teacher_detections
from .unbiased import unbiased_cross_entropy

__all__ = [
    "CheckpointClassesError",
    "IncrementalRCNN",
    "TEACHER_PRECISIONS",
    "TeacherMismatchError",
    "build_teacher",
    "checkpoint_class_names",
    "fold_batchnorm",
    "load_checked_checkpoint",
]

logger = logging.getLogger(__name__)

# ILMIL.TEACHER.PRECISION -> the autocast dtype of the teacher pass (None: no autocast).
TEACHER_PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointClassesError(ValueError):
    """A checkpoint does not hold the classes it is used for."""


class TeacherMismatchError(CheckpointClassesError):
    """The teacher checkpoint does not hold the classes the schedule expects."""


class _OutputRecorder:
    """Keeps the latest output of a module (a forward hook), so intermediate
    results (backbone stages, RPN head outputs) are read without re-running them."""

    def __init__(self, module):
        self.output = None
        module.register_forward_hook(self._record)

    def _record(self, module, inputs, output):
        self.output = output

    def pop(self):
        output, self.output = self.output, None
        return output


class _Frozen:
    """Holds a module without registering it as a submodule."""

    def __init__(self, module):
        self.module = module


def _float32(outputs):
    """``outputs`` (tensors in dicts, lists and tuples; other values as they are)
    with every floating-point tensor in float32."""
    if isinstance(outputs, torch.Tensor):
        return outputs.float() if outputs.is_floating_point() else outputs
    if isinstance(outputs, dict):
        return {key: _float32(value) for key, value in outputs.items()}
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(_float32(value) for value in outputs)
    return outputs


def checkpoint_class_names(checkpoint):
    """Class names recorded in an ilmil checkpoint, or None (a plain detectron2 one)."""
    return checkpoint.get("ilmil", {}).get("class_names")


def load_checked_checkpoint(
    weights,
    expected_classes=None,
    error=TeacherMismatchError,
    use="the schedule expects the {n} old classes",
    fix="give the checkpoint of the previous stage, or fix --stages / --class-order",
):
    """A detector checkpoint (``{"model": state dict, ...}``) and its class count,
    refused with ``error`` (naming both lists) when its class count or recorded
    class names differ from ``expected_classes``; ``use`` and ``fix`` word the message."""
    checkpoint = safe_load(weights)
    if "model" not in checkpoint:
        checkpoint = {"model": checkpoint}
    state = checkpoint["model"]
    num_classes = state_dict_num_classes(state)
    if num_classes is None:
        raise CheckpointError(f"checkpoint {weights} holds no classifier ({' or '.join(CLASSIFIER_KEYS)}): not a "
                              "Faster R-CNN, RetinaNet or FCOS detector; fix: give a detector checkpoint written by "
                              "ilmil's tools")
    if expected_classes is not None:
        names = checkpoint_class_names(checkpoint)
        if num_classes != len(expected_classes) or (names is not None and list(names) != list(expected_classes)):
            found = list(names) if names is not None else f"{num_classes} unnamed classes"
            expected = use.format(n=len(expected_classes))
            raise error(f"checkpoint {weights} holds {found}, but {expected} {list(expected_classes)}: {fix}")
    return checkpoint, num_classes


def build_teacher(cfg, weights, expected_classes=None):
    """The frozen teacher: a ``GeneralizedRCNN`` with ``weights``' class count.

    Refuses a checkpoint whose class count (or recorded class names) differs
    from ``expected_classes``, naming both.
    """
    checkpoint, num_classes = load_checked_checkpoint(weights, expected_classes)
    teacher_cfg = cfg.clone()
    teacher_cfg.defrost()
    teacher_cfg.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
    teacher_cfg.MODEL.ROI_HEADS.NUM_CLASSES = num_classes
    teacher_cfg.MODEL.WEIGHTS = ""
    teacher = load_detector(teacher_cfg, weights, checkpoint)  # a pruned teacher keeps its widths
    teacher.eval()
    fold_batchnorm(teacher)
    teacher.requires_grad_(False)
    return teacher


def fold_batchnorm(model):
    """Fold each BatchNorm that follows a convolution into that convolution.

    Only for a model that never trains again (the teacher): in eval mode its
    BatchNorm is a fixed affine map, and folding it away saves ~8 % of the
    backbone's forward time on CPU.
    """
    for module in model.modules():
        if isinstance(module, Conv2d) and isinstance(module.norm, (nn.BatchNorm2d, FrozenBatchNorm2d)):
            norm = module.norm
            module.weight, module.bias = fuse_conv_bn_weights(
                module.weight, module.bias, norm.running_mean, norm.running_var, norm.eps, norm.weight, norm.bias
            )
            module.norm = None
    return model


@META_ARCH_REGISTRY.register()
class IncrementalRCNN(GeneralizedRCNN):
    @configurable
    def __init__(
        self,
        *,
        teacher=None,
        feature_loss=None,
        rpn_loss=None,
        rcn_loss=None,
        loss_weights=None,
        pseudo_labels=None,
        rcn_topk=128,
        rcn_num_samples=64,
        rcn_new_gt_iou=0.0,
        teacher_num_proposals=0,
        teacher_precision="float32",
        unbiased_cls=False,
        **kwargs,
    ):
        """
        Args:
            teacher: frozen old-class ``GeneralizedRCNN`` or None (no distillation).
            feature_loss, rpn_loss, rcn_loss: distillation loss modules, or None (term off).
            loss_weights: {"feat": w, "rpn": w, "rcn": w}.
            pseudo_labels: None (off) or {"score_thresh", "nms_thresh", "iou_thresh"}.
            rcn_topk, rcn_num_samples: teacher proposals kept by objectness, then sampled.
            rcn_new_gt_iou: proposals at this IoU with a GT box are not sampled (0 = all are).
            teacher_num_proposals: teacher proposals per image through its box head (0 = all).
            teacher_precision: a key of ``TEACHER_PRECISIONS``, the teacher pass's autocast dtype.
            unbiased_cls: box-head classification with background as "background or an old
                class" (the teacher's classes); needs a teacher.
            kwargs: arguments of ``GeneralizedRCNN``.
        """
        super().__init__(**kwargs)
        check_choice("ILMIL.TEACHER.PRECISION", teacher_precision, TEACHER_PRECISIONS)
        self.teacher_dtype = TEACHER_PRECISIONS[teacher_precision]
        self._teacher = _Frozen(teacher) if teacher is not None else None
        self.feature_loss = feature_loss
        self.rpn_loss = rpn_loss
        self.rcn_loss = rcn_loss
        self.loss_weights = dict(loss_weights or {})
        self.pseudo_labels = pseudo_labels
        self.rcn_topk = rcn_topk
        self.rcn_num_samples = rcn_num_samples
        self.rcn_new_gt_iou = rcn_new_gt_iou
        self.teacher_num_proposals = teacher_num_proposals
        self.unbiased_cls = unbiased_cls
        self.bn_stats_frozen = False
        self._recorders = self._attach_recorders(self)
        if teacher is not None:
            teacher.to(self.device)
            self._teacher_recorders = self._attach_recorders(teacher)

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        ilmil = cfg.ILMIL
        if not ilmil.TEACHER.WEIGHTS or not uses_teacher(cfg):
            return ret
        expected = None
        if cfg.DATASETS.TRAIN:
            expected = MetadataCatalog.get(cfg.DATASETS.TRAIN[0]).get("old_classes")
        distill = ilmil.DISTILL
        for key, enabled in (("ILMIL.DISTILL.RCN.ENABLED", distill.RCN.ENABLED),
                             ("ILMIL.UNBIASED_CLS.ENABLED", ilmil.UNBIASED_CLS.ENABLED)):
            if enabled and (cfg.MODEL.MASK_ON or cfg.MODEL.KEYPOINT_ON or cfg.MODEL.ROI_BOX_HEAD.TRAIN_ON_PRED_BOXES):
                # both replace the box branch's pass (forward), which has no mask/keypoint variant here
                raise ValueError(
                    f"{key} needs box-only ROI heads: set MODEL.MASK_ON, MODEL.KEYPOINT_ON "
                    f"and MODEL.ROI_BOX_HEAD.TRAIN_ON_PRED_BOXES to False, or {key} False"
                )
        ret["teacher"] = build_teacher(cfg, ilmil.TEACHER.WEIGHTS, expected)
        if distill.FEAT.ENABLED:
            ret["feature_loss"] = build_distill_loss("FeatureDistillation", cfg)
        if distill.RPN.ENABLED:
            ret["rpn_loss"] = build_distill_loss("RPNDistillation", cfg)
        if distill.RCN.ENABLED:
            ret["rcn_loss"] = build_distill_loss("RCNDistillation", cfg)
        ret["loss_weights"] = {"feat": distill.FEAT.WEIGHT, "rpn": distill.RPN.WEIGHT, "rcn": distill.RCN.WEIGHT}
        pseudo = ilmil.PSEUDO_LABELS
        if pseudo.ENABLED:
            ret["pseudo_labels"] = {
                "score_thresh": pseudo.SCORE_THRESH,
                "nms_thresh": pseudo.NMS_THRESH,
                "iou_thresh": pseudo.NEW_GT_IOU_THRESH,
            }
        ret["rcn_topk"] = distill.RCN.TOPK
        ret["rcn_num_samples"] = distill.RCN.NUM_SAMPLES
        ret["rcn_new_gt_iou"] = distill.RCN.NEW_GT_IOU_THRESH
        ret["teacher_num_proposals"] = ilmil.TEACHER.NUM_PROPOSALS
        ret["teacher_precision"] = ilmil.TEACHER.PRECISION
        ret["unbiased_cls"] = ilmil.UNBIASED_CLS.ENABLED
        return ret

    @property
    def teacher(self):
        return self._teacher.module if self._teacher is not None else None

    @staticmethod
    def _attach_recorders(model):
        recorders = {"rpn_head": _OutputRecorder(model.proposal_generator.rpn_head)}
        if hasattr(model.backbone, "bottom_up"):  # FPN: record the ResNet stages too
            recorders["bottom_up"] = _OutputRecorder(model.backbone.bottom_up)
        return recorders

    @staticmethod
    def _all_features(features, recorders):
        """Backbone outputs (p2..p6 with FPN) plus the recorded bottom-up stages (res2..res5)."""
        bottom_up = recorders.get("bottom_up")
        recorded = bottom_up.pop() if bottom_up is not None else None
        return {**(recorded or {}), **features}

    def _box_outputs(self, model, features, boxes):
        heads = model.roi_heads
        pooled = heads.box_pooler([features[f] for f in heads.box_in_features], boxes)
        return heads.box_predictor(heads.box_head(pooled))

    def forward(self, batched_inputs):
        if not self.training or self.teacher is None:
            return super().forward(batched_inputs)
        images = self.preprocess_image(batched_inputs)
        gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
        teacher = self.run_teacher(images, gt_instances)

        if self.pseudo_labels is not None:
            gt_instances = self.add_pseudo_labels(teacher, gt_instances)

        features = self.backbone(images.tensor)
        all_features = self._all_features(features, self._recorders)
        proposals, proposal_losses = self.proposal_generator(images, features, gt_instances)
        rpn_logits, rpn_deltas = self._recorders["rpn_head"].pop()
        if self.rcn_loss is None and not self.unbiased_cls:
            _, detector_losses = self.roi_heads(images, features, proposals, gt_instances)
            rcn_outputs = None
        else:
            detector_losses, rcn_outputs = self._box_losses_and_rcn_outputs(
                features, proposals, gt_instances, teacher.get("rcn_boxes")
            )

        losses = {**detector_losses, **proposal_losses}
        if self.feature_loss is not None:
            losses["loss_distill_feat"] = self.loss_weights["feat"] * self.feature_loss(
                all_features, teacher["features"]
            )
        if self.rpn_loss is not None:
            losses["loss_distill_rpn"] = self.loss_weights["rpn"] * self.rpn_loss(
                rpn_logits, rpn_deltas, *teacher["rpn"]
            )
        if self.rcn_loss is not None:
            losses["loss_distill_rcn"] = self.loss_weights["rcn"] * self.rcn_loss(
                *rcn_outputs, *teacher["rcn_outputs"]
            )
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
    def run_teacher(self, images, gt_instances=None):
        """One teacher pass: features, RPN outputs, proposals at test settings and
        box-head outputs on them (shared by pseudo-labels and the RCN term); under
        autocast at ``teacher_dtype`` when set, its tensors returned in float32.
        ``gt_instances`` (the stage's new-class GT) steer the RCN sampling."""
        if self.teacher_dtype is None:
            out = self._teacher_pass(images)
        else:
            with torch.autocast(self.device.type, dtype=self.teacher_dtype):
                out = _float32(self._teacher_pass(images))
        if self.rcn_loss is not None:
            out["rcn_boxes"], out["rcn_outputs"] = self._sample_rcn_proposals(
                out["proposals"], out["box_outputs"], gt_instances
            )
        return out

    def _teacher_pass(self, images):
        teacher = self.teacher
        features = teacher.backbone(images.tensor)
        out = {"features": self._all_features(features, self._teacher_recorders)}
        proposals, _ = teacher.proposal_generator(images, features, None)
        out["rpn"] = self._teacher_recorders["rpn_head"].pop()
        if self.teacher_num_proposals > 0:
            # Sorted by objectness: the top ones hold the old objects, and the box head
            # on all test-time proposals is a fifth of the teacher pass on CPU.
            proposals = [p[: self.teacher_num_proposals] for p in proposals]
        out["proposals"] = proposals
        out["box_outputs"] = self._box_outputs(teacher, features, [p.proposal_boxes for p in proposals])
        return out

    def _sample_rcn_proposals(self, proposals, box_outputs, gt_instances=None):
        """Top ``rcn_topk`` teacher proposals per image (they come sorted by
        objectness), without those on a GT box when ``rcn_new_gt_iou`` > 0,
        ``rcn_num_samples`` of them drawn at random."""
        scores, deltas = box_outputs
        boxes, rows, start = [], [], 0
        for i, p in enumerate(proposals):
            top = min(len(p), self.rcn_topk)
            candidates = torch.arange(top, device=scores.device)
            if self.rcn_new_gt_iou > 0 and gt_instances is not None:
                candidates = candidates[away_from_gt(p.proposal_boxes[:top], gt_instances[i], self.rcn_new_gt_iou)]
            pick = candidates[torch.randperm(len(candidates), device=scores.device)[: self.rcn_num_samples]]
            boxes.append(Boxes(p.proposal_boxes.tensor[pick]))
            rows.append(start + pick)
            start += len(p)
        rows = torch.cat(rows)
        return boxes, (scores[rows], deltas[rows])

    def add_pseudo_labels(self, teacher, gt_instances):
        cfg = self.pseudo_labels
        detections = teacher_detections(
            self.teacher.roi_heads.box_predictor,
            teacher["box_outputs"],
            teacher["proposals"],
            cfg["score_thresh"],
            cfg["nms_thresh"],
        )
        merged, count = [], 0
        for gt, det in zip(gt_instances, detections):
            det = drop_boxes_on_new_gt(det, gt, cfg["iou_thresh"])
            count += len(det)
            merged.append(add_pseudo_labels(gt, det))
        get_event_storage().put_scalar("pseudo_boxes_per_image", count / max(len(gt_instances), 1))
        return merged

    def freeze_bn_stats(self):
        """Use (and keep) the BatchNorm running statistics in training too; the
        affine parameters still learn."""
        self.bn_stats_frozen = True
        return self.train(self.training)

    def train(self, mode=True):
        """The teacher stays in eval mode whatever the student's mode."""
        super().train(mode)
        if self.bn_stats_frozen:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
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
