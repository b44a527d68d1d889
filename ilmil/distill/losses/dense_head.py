"""Dense-head distillation: the one-stage analogue of MFRRK's RPN and RCN terms, on
the outputs of a RetinaNet / FCOS ``head`` (per level: class logits [N, A K, H, W],
box regression [N, A 4, H, W]).

At every anchor a and old class k (the teacher's K classes, the first ones of the
student's), with sigmoid probabilities p = sigma(z / tau) at TEMPERATURE tau:

    KL_{a,k} = p_T log(p_T / p_S) + (1 - p_T) log((1 - p_T) / (1 - p_S))         (binary KL)
    L_cls = tau^2 sum_{a,k} KL_{a,k} / max(1, n_T),   n_T = sum_a max_k sigma(z_T)  (NORMALIZER objects)
    L_box = mean over anchors where max_k sigma(z_T) >= BOX_SCORE_THRESH of
            1 - GIoU(b_S, b_T)              (BOX_LOSS giou, the default: the boxes b the
                                             head's box deltas r decode to, where the
                                             teacher's has an area)
            sum_4 |r_S - r_T|               (BOX_LOSS l1: the deltas themselves)
    L_dense = L_cls + L_box

L_cls keeps the old classes' scores everywhere (most anchors are background, where
it keeps them low too); L_box keeps the boxes where the teacher sees an old object.
The deltas' scale is the detector's: RetinaNet's are about 0-1, FCOS's the distances
to the box sides in strides (1-8 on shapes), where the L1 outweighed the detection
loss's own GIoU term ~15x and cost the kd students AP (BENCHMARKS.md). The GIoU of the
decoded boxes is in [0, 2] on every detector and level (IoU does not change when both
boxes are shifted or scaled alike).

With EXCLUDE_NEW_GT, the anchors whose cell centre lies in a GT box of a new class are
left out of every sum above (n_T unchanged; with objectness, its weights q are masked
too and so is their sum): there the detection loss trains the new class, and the
old-class teacher, which has never seen it, often scores it as the old class it most
resembles; the KL would hold that score up against the GT
(FCOS 10+10: new-class AP50 46.2 with the term on every anchor, BENCHMARKS.md).

The KL is divided by the teacher's soft object count n_T as the focal loss is by its
number of foreground anchors. NORMALIZER ``mean`` averages it over every anchor and
class instead, which weighs an element ~1e-6 against the focal loss's ~1 / n_fg: on
RetinaNet it barely moved the class scores (the kd suite: 7.5 AP50 against 29.0).
A head with objectness, below, is normalised by the teacher's objectness instead.

A head with objectness o (YOLO; the context's ``teacher_outputs["objectness"]``) has
its class scores trained only where there is an object, so there, with q = sigma(o_T):

    L_cls = tau^2 sum_a q_a mean_k KL_{a,k} / sum_a q_a       (class KL where the teacher sees objects)
    L_obj = tau^2 sum_a KL(sigma(o_T / tau) || sigma(o_S / tau)) / sum_a q_a   (NORMALIZER mean: mean_a)
    L_box over anchors where q_a max_k sigma(z_T) >= BOX_SCORE_THRESH (the detector's own score)
    L_dense = L_cls + L_obj + L_box
"""
import torch.nn.functional as F
from fvcore.nn import giou_loss

from detectron2.config import configurable
from detectron2.layers import cat

from ...config import check_choice, check_value
from ...modeling.head_boxes import flatten_levels
from ..masks import gt_box_mask
from ..registry import DISTILL_LOSS_REGISTRY, DistillLoss

__all__ = ["DENSE_BOX_LOSSES", "DENSE_NORMALIZERS", "DenseHeadDistillation"]

HEAD = "head"
DENSE_NORMALIZERS = ("mean", "objects")
DENSE_BOX_LOSSES = ("l1", "giou")


@DISTILL_LOSS_REGISTRY.register()
class DenseHeadDistillation(DistillLoss):
    """Old-class scores at every anchor and boxes where the teacher is confident."""

    config_key = "DENSE"

    @configurable
    def __init__(self, *, temperature=1.0, box_score_thresh=0.5, box_loss="giou", normalizer="objects",
                 exclude_new_gt=False):
        super().__init__()
        check_choice("ILMIL.DISTILL.DENSE.NORMALIZER", normalizer, DENSE_NORMALIZERS)
        self.box_loss = check_choice("ILMIL.DISTILL.DENSE.BOX_LOSS", box_loss, DENSE_BOX_LOSSES)
        self.normalizer = normalizer
        self.temperature = check_value("ILMIL.DISTILL.DENSE.TEMPERATURE", temperature, temperature > 0, "above 0", 1.0)
        self.box_score_thresh = box_score_thresh
        self.exclude_new_gt = exclude_new_gt

    @classmethod
    def from_config(cls, cfg, student_shapes=None, teacher_shapes=None):
        dense = cfg.ILMIL.DISTILL.DENSE
        return {"temperature": dense.TEMPERATURE, "box_score_thresh": dense.BOX_SCORE_THRESH,
                "box_loss": dense.BOX_LOSS, "normalizer": dense.NORMALIZER, "exclude_new_gt": dense.EXCLUDE_NEW_GT}

    def records(self):
        return (HEAD,)

    def forward(self, student, teacher, context):
        s_logits, s_boxes = student[HEAD][:2]  # FCOS adds centerness, not distilled here
        t_logits, t_boxes = teacher[HEAD][:2]
        anchors = t_boxes[0].shape[1] // 4
        num_old = t_logits[0].shape[1] // anchors
        z_s = flatten_levels(s_logits, s_logits[0].shape[1] // anchors)[..., :num_old]
        z_t = flatten_levels([x.detach() for x in t_logits], num_old)
        keep = self._keep(context, t_logits, anchors) if self.exclude_new_gt else None
        kl = _binary_kl(z_s, z_t, self.temperature)
        score = z_t.sigmoid().max(dim=2).values
        if keep is not None:
            kl = kl * keep[..., None]
        objectness = context.teacher_outputs.get("objectness") if context is not None else None
        if objectness is None:
            loss = kl.sum() / score.sum().clamp(min=1.0) if self.normalizer == "objects" else kl.mean()
        else:
            o_t = flatten_levels([x.detach() for x in objectness], 1)[..., 0]
            o_s = flatten_levels(student[HEAD][2], 1)[..., 0]
            q = o_t.sigmoid()
            kl_obj = _binary_kl(o_s, o_t, self.temperature)
            kept = q.new_ones(q.shape) if keep is None else keep.to(q.dtype)
            q = q * kept
            # The objectness KL over the teacher's object count, as the class KL of a head without
            # objectness: a mean over every anchor (thousands per image, a handful of objects)
            # would leave it about a hundred times weaker.
            teacher_objects = q.sum()
            objects = teacher_objects if self.normalizer == "objects" else kept.sum()
            loss = ((kl.mean(dim=2) * q).sum() / teacher_objects.clamp(min=1e-6)
                    + (kl_obj * kept).sum() / objects.clamp(min=1.0))
            score = score * q
        if keep is not None:
            score = score * keep
        confident = score >= self.box_score_thresh
        if confident.any():
            loss = loss + self._box_term(s_boxes, [x.detach() for x in t_boxes], confident, context)
        return loss

    def _box_term(self, s_boxes, t_boxes, confident, context):
        if self.box_loss == "l1":
            return (flatten_levels(s_boxes, 4) - flatten_levels(t_boxes, 4))[confident].abs().sum(dim=1).mean()
        decoders = context.box_decoders if context is not None else {}
        if not decoders:
            raise ValueError("DENSE.BOX_LOSS giou decodes the head's boxes: it needs the context's "
                             "box_decoders (a one-stage student sets them)")
        b_s = decoders["student"](s_boxes)[confident].float()
        b_t = decoders["teacher"](t_boxes)[confident].float()
        # A teacher box of no area (FCOS clamps negative distances to 0) is no box to keep.
        has_area = (b_t[:, 2:] > b_t[:, :2]).all(dim=1)
        if not has_area.any():
            return b_s.sum() * 0.0
        return giou_loss(b_s[has_area], b_t[has_area], reduction="mean")

    @staticmethod
    def _keep(context, levels, anchors):
        """[N, all anchors] of 0 where the cell centre lies in a GT box of a new class, else
        1; None when no image has one (a compression run, where every class is old)."""
        new_gt = [inst[inst.gt_classes >= context.num_old_classes] for inst in context.gt_instances]
        if not any(len(inst) for inst in new_gt):
            return None
        if len(context.head_strides) != len(levels):
            raise ValueError(f"DENSE.EXCLUDE_NEW_GT needs the head's {len(levels)} level strides in "
                             f"the context, got {context.head_strides}")
        masks = []
        for x, stride in zip(levels, context.head_strides):
            inside = gt_box_mask(new_gt, x.shape[-2:], stride)  # [N, H, W]
            masks.append(inside[..., None].expand(-1, -1, -1, anchors).flatten(1))  # position-major
        return 1.0 - cat(masks, dim=1)


def _binary_kl(z_s, z_t, tau):
    """tau^2 KL(sigma(z_T / tau) || sigma(z_S / tau)) per element: BCE(z_S, p_T) less the
    teacher's entropy BCE(z_T, p_T), so it is zero when z_S = z_T."""
    p_t = (z_t / tau).sigmoid()
    kl = (F.binary_cross_entropy_with_logits(z_s / tau, p_t, reduction="none")
          - F.binary_cross_entropy_with_logits(z_t / tau, p_t, reduction="none"))
    return kl * tau * tau
