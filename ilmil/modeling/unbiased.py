"""MMA's unbiased losses (Cermelli et al. 2022): in a later stage "background"
means two different things, and each loss merges the classes it may hide.

- In the stage's data, a proposal labelled background may be an unlabeled old
  object: the box head's classification loss takes "background or an old class"
  as its target, log(p_bg + sum_old p_c).
- In the teacher's output, "background" may be a new object the teacher never
  learned: the RCN distillation compares the teacher's background with the
  student's "background or a new class", p_bg + sum_new p_c.

Logit layout of the expanded box predictor (detectron2's, background last):
[K old classes, N new classes, background].
"""
import torch.nn.functional as F

from detectron2.layers import cat

__all__ = ["unbiased_cross_entropy", "unbiased_student_log_probs"]


def unbiased_cross_entropy(scores, gt_classes, num_old):
    """Mean box-head classification loss over proposals: -log(p_bg + sum_old p_c)
    for those labelled background (the last class index), the usual -log p_y
    for the others (new-class and pseudo-labelled old-class boxes). With no old
    classes it is the usual cross-entropy."""
    if gt_classes.numel() == 0:
        return scores.sum() * 0.0
    log_p = F.log_softmax(scores, dim=1)
    background = scores.shape[1] - 1
    background_or_old = cat([log_p[:, :num_old], log_p[:, background:]], dim=1).logsumexp(dim=1)
    labelled = log_p.gather(1, gt_classes[:, None]).squeeze(1)
    return -labelled.where(gt_classes != background, background_or_old).mean()


def unbiased_student_log_probs(student_scores, num_old, temperature=1.0):
    """Log-probabilities at ``temperature`` of the student's [old classes, background
    or a new class]: its K old columns, and the new columns merged with the last."""
    log_p = F.log_softmax(student_scores / temperature, dim=1)
    return cat([log_p[:, :num_old], log_p[:, num_old:].logsumexp(dim=1, keepdim=True)], dim=1)
