"""Dense-head distillation: the one-stage analogue of MFRRK's RPN and RCN terms, on
the outputs of a RetinaNet / FCOS ``head`` (per level: class logits [N, A K, H, W],
box regression [N, A 4, H, W]).

At every anchor a and old class k (the teacher's K classes, the first ones of the
student's), with sigmoid probabilities p = sigma(z / tau) at TEMPERATURE tau:

    KL_{a,k} = p_T log(p_T / p_S) + (1 - p_T) log((1 - p_T) / (1 - p_S))         (binary KL)
    L_cls = tau^2 sum_{a,k} KL_{a,k} / max(1, n_T),   n_T = sum_a max_k sigma(z_T)  (NORMALIZER objects)
    L_box = mean over anchors where max_k sigma(z_T) >= BOX_SCORE_THRESH of sum_4 |r_S - r_T|
    L_dense = L_cls + L_box

L_cls keeps the old classes' scores everywhere (most anchors are background, where
it keeps them low too); L_box keeps the boxes where the teacher sees an old object.

The KL is divided by the teacher's soft object count n_T as the focal loss is by its
number of foreground anchors. NORMALIZER ``mean`` averages it over every anchor and
class instead, which weighs an element ~1e-6 against the focal loss's ~1 / n_fg: on
RetinaNet it barely moved the class scores (the kd suite: 7.5 AP50 against 29.0).
A head with objectness, below, is normalised by the teacher's objectness instead.

A head with objectness o (YOLO; the context's ``teacher_outputs["objectness"]``) has
its class scores trained only where there is an object, so there, with q = sigma(o_T):

    L_cls = tau^2 sum_a q_a mean_k KL_{a,k} / sum_a q_a       (class KL where the teacher sees objects)
    L_obj = tau^2 mean_a KL(sigma(o_T / tau) || sigma(o_S / tau))
    L_box over anchors where q_a max_k sigma(z_T) >= BOX_SCORE_THRESH (the detector's own score)
    L_dense = L_cls + L_obj + L_box
"""
import torch.nn.functional as F

from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling.meta_arch.dense_detector import permute_to_N_HWA_K

from ...config import check_choice
from ..registry import DISTILL_LOSS_REGISTRY, DistillLoss

__all__ = ["DENSE_NORMALIZERS", "DenseHeadDistillation"]

HEAD = "head"
DENSE_NORMALIZERS = ("mean", "objects")


def _flatten(levels, channels_per_anchor):
    """Per-level [N, A C, H, W] maps -> [N, all anchors, C]."""
    return cat([permute_to_N_HWA_K(x, channels_per_anchor) for x in levels], dim=1)


@DISTILL_LOSS_REGISTRY.register()
class DenseHeadDistillation(DistillLoss):
    """Old-class scores at every anchor and boxes where the teacher is confident."""

    config_key = "DENSE"

    @configurable
    def __init__(self, *, temperature=1.0, box_score_thresh=0.5, normalizer="objects"):
        super().__init__()
        check_choice("ILMIL.DISTILL.DENSE.NORMALIZER", normalizer, DENSE_NORMALIZERS)
        self.normalizer = normalizer
        self.temperature = temperature
        self.box_score_thresh = box_score_thresh

    @classmethod
    def from_config(cls, cfg, student_shapes=None, teacher_shapes=None):
        dense = cfg.ILMIL.DISTILL.DENSE
        return {"temperature": dense.TEMPERATURE, "box_score_thresh": dense.BOX_SCORE_THRESH,
                "normalizer": dense.NORMALIZER}

    def records(self):
        return (HEAD,)

    def forward(self, student, teacher, context):
        s_logits, s_boxes = student[HEAD][:2]  # FCOS adds centerness, not distilled here
        t_logits, t_boxes = teacher[HEAD][:2]
        anchors = t_boxes[0].shape[1] // 4
        num_old = t_logits[0].shape[1] // anchors
        z_s = _flatten(s_logits, s_logits[0].shape[1] // anchors)[..., :num_old]
        z_t = _flatten([x.detach() for x in t_logits], num_old)
        kl = _binary_kl(z_s, z_t, self.temperature)
        score = z_t.sigmoid().max(dim=2).values
        objectness = context.teacher_outputs.get("objectness") if context is not None else None
        if objectness is None:
            loss = kl.sum() / score.sum().clamp(min=1.0) if self.normalizer == "objects" else kl.mean()
        else:
            o_t = _flatten([x.detach() for x in objectness], 1)[..., 0]
            o_s = _flatten(student[HEAD][2], 1)[..., 0]
            q = o_t.sigmoid()
            loss = (kl.mean(dim=2) * q).sum() / q.sum().clamp(min=1e-6) + _binary_kl(o_s, o_t, self.temperature).mean()
            score = score * q
        confident = score >= self.box_score_thresh
        if confident.any():
            r_s = _flatten(s_boxes, 4)
            r_t = _flatten([x.detach() for x in t_boxes], 4)
            loss = loss + (r_s - r_t)[confident].abs().sum(dim=1).mean()
        return loss


def _binary_kl(z_s, z_t, tau):
    """tau^2 KL(sigma(z_T / tau) || sigma(z_S / tau)) per element: BCE(z_S, p_T) less the
    teacher's entropy BCE(z_T, p_T), so it is zero when z_S = z_T."""
    p_t = (z_t / tau).sigmoid()
    kl = (F.binary_cross_entropy_with_logits(z_s / tau, p_t, reduction="none")
          - F.binary_cross_entropy_with_logits(z_t / tau, p_t, reduction="none"))
    return kl * tau * tau
