"""RCN distillation (MFRRK's RCN term): the box head's knowledge of the old classes.

On teacher proposals (the top TOPK by objectness per image, NUM_SAMPLES of them
drawn at random, optionally none within NEW_GT_IOU_THRESH of a new-class GT box),
with z the box-head logits of [old classes, background] and t the old-class box
deltas:

    l2           mean over proposals of ||z_S - mean(z_S) - (z_T - mean(z_T))||^2 / (K + 1)   (Faster ILOD)
    kl           T^2 KL(softmax(z_T / T) || softmax(z_S / T))
    unbiased_kl  kl with the student's new classes merged into its background: the
                 teacher's "background" may be a new object (MMA)
    L_rcn = logits term + mean over proposals and old classes of sum_4 (t_T - t_S)^2

An R-CNN student evaluates its box head on the boxes ``select_rois`` picks, in
the same pooling pass as its detection loss.
"""
import torch
import torch.nn.functional as F

from detectron2.config import configurable
from detectron2.structures import Boxes

from ...config import check_choice, check_value
from ...modeling.pseudo_labels import away_from_gt
from ...modeling.unbiased import unbiased_student_log_probs
from ..registry import DISTILL_LOSS_REGISTRY, DistillLoss

__all__ = ["RCN_LOGITS", "RCNDistillation", "old_class_logits"]

RCN_LOGITS = ("l2", "kl", "unbiased_kl")


def old_class_logits(student_scores, num_old):
    """The student's logits of [old classes, background]: columns 0..K-1 and the last."""
    return torch.cat([student_scores[:, :num_old], student_scores[:, -1:]], dim=1)


@DISTILL_LOSS_REGISTRY.register()
class RCNDistillation(DistillLoss):
    """Box-head logits of old classes + background, and old-class box deltas."""

    config_key = "RCN"
    # Where an R-CNN student finds this term's box-head outputs on the selected boxes.
    ROIS = "rois:RCN"

    @configurable
    def __init__(self, *, logits="l2", temperature=2.0, topk=128, num_samples=64, new_gt_iou=0.0):
        super().__init__()
        self.logits = check_choice("ILMIL.DISTILL.RCN.LOGITS", logits, RCN_LOGITS)
        self.temperature = check_value("ILMIL.DISTILL.RCN.TEMPERATURE", temperature, temperature > 0, "above 0", 2.0)
        self.topk = check_value("ILMIL.DISTILL.RCN.TOPK", topk, topk >= 1, "at least 1", 128)
        self.num_samples = check_value("ILMIL.DISTILL.RCN.NUM_SAMPLES", num_samples, num_samples >= 1, "at least 1", 64)
        self.new_gt_iou = check_value("ILMIL.DISTILL.RCN.NEW_GT_IOU_THRESH", new_gt_iou, 0 <= new_gt_iou <= 1,
                                      "in [0, 1] (0: off)", 0.5)

    @classmethod
    def from_config(cls, cfg, student_shapes=None, teacher_shapes=None):
        rcn = cfg.ILMIL.DISTILL.RCN
        return {"logits": rcn.LOGITS, "temperature": rcn.TEMPERATURE, "topk": rcn.TOPK,
                "num_samples": rcn.NUM_SAMPLES, "new_gt_iou": rcn.NEW_GT_IOU_THRESH}

    def select_rois(self, proposals, box_outputs, gt_instances=None):
        """The teacher proposals this step distils: per image the top ``topk`` (they come
        sorted by objectness), without those on a new-class GT box when ``new_gt_iou`` > 0,
        ``num_samples`` drawn at random. Returns their boxes per image and the teacher's
        (scores, deltas) on them."""
        scores, deltas = box_outputs
        num_old = scores.shape[1] - 1  # the teacher's classes; its old-class objects keep their proposals
        boxes, rows, start = [], [], 0
        for i, p in enumerate(proposals):
            top = min(len(p), self.topk)
            candidates = torch.arange(top, device=scores.device)
            if self.new_gt_iou > 0 and gt_instances is not None:
                new_gt = gt_instances[i][gt_instances[i].gt_classes >= num_old]
                candidates = candidates[away_from_gt(p.proposal_boxes[:top], new_gt, self.new_gt_iou)]
            pick = candidates[torch.randperm(len(candidates), device=scores.device)[: self.num_samples]]
            boxes.append(Boxes(p.proposal_boxes.tensor[pick]))
            rows.append(start + pick)
            start += len(p)
        rows = torch.cat(rows)
        return boxes, (scores[rows], deltas[rows])

    def forward(self, student, teacher, context=None):
        student_scores, student_deltas = student[self.ROIS]
        teacher_scores, teacher_deltas = teacher[self.ROIS]
        if len(teacher_scores) == 0:  # the teacher kept no proposal in this batch
            return (student_scores.sum() + student_deltas.sum()) * 0.0
        num_old = teacher_scores.shape[1] - 1
        z_t = teacher_scores.detach()
        t = self.temperature
        if self.logits == "l2":
            z_s = old_class_logits(student_scores, num_old)
            z_s = z_s - z_s.mean(dim=1, keepdim=True)
            z_t = z_t - z_t.mean(dim=1, keepdim=True)
            cls_loss = (z_s - z_t).pow(2).mean()
        else:
            if self.logits == "kl":
                log_q = F.log_softmax(old_class_logits(student_scores, num_old) / t, dim=1)
            else:  # the teacher's background may be a new class: the student's new ones count as background
                log_q = unbiased_student_log_probs(student_scores, num_old, t)
            cls_loss = F.kl_div(log_q, F.log_softmax(z_t / t, dim=1), reduction="batchmean", log_target=True) * t * t
        t_del = teacher_deltas.detach()
        box_dim = t_del.shape[1]  # 4 (class-agnostic) or 4K
        s_del = student_deltas[:, :box_dim]
        box_loss = (s_del - t_del).pow(2).view(len(s_del), -1, 4).sum(dim=2).mean()
        return cls_loss + box_loss
