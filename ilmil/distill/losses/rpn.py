"""RPN distillation (MFRRK's RPN term), on the outputs of ``proposal_generator.rpn_head``.

Over all anchors, with objectness logits o and box deltas r:

    L_rpn = mean(max(o_T - o_S, 0)^2) + mean over anchors with o_T - o_S > DELTA_MARGIN of sum_4 (r_T - r_S)^2

The student is pulled up only where the teacher is more confident (an old object
the student is losing), and its boxes there towards the teacher's.
"""
import torch.nn.functional as F

from detectron2.config import configurable

from ...modeling.head_boxes import flatten_levels
from ..registry import DISTILL_LOSS_REGISTRY, DistillLoss

__all__ = ["RPNDistillation", "flatten_rpn_outputs"]

RPN_HEAD = "proposal_generator.rpn_head"


def flatten_rpn_outputs(logits, deltas):
    """Per-level RPN head outputs -> [N, all anchors] logits and [N, all anchors, 4] deltas."""
    return flatten_levels(logits, 1)[..., 0], flatten_levels(deltas, 4)


@DISTILL_LOSS_REGISTRY.register()
class RPNDistillation(DistillLoss):
    """Objectness where the teacher is more confident, and its deltas on those anchors."""

    config_key = "RPN"

    @configurable
    def __init__(self, *, margin=0.1):
        super().__init__()
        self.margin = margin

    @classmethod
    def from_config(cls, cfg, student_shapes=None, teacher_shapes=None):
        return {"margin": cfg.ILMIL.DISTILL.RPN.DELTA_MARGIN}

    def records(self):
        return (RPN_HEAD,)

    def forward(self, student, teacher, context=None):
        s_obj, s_del = flatten_rpn_outputs(*student[RPN_HEAD])
        t_logits, t_deltas = teacher[RPN_HEAD]
        t_obj, t_del = flatten_rpn_outputs([t.detach() for t in t_logits], [t.detach() for t in t_deltas])
        gap = t_obj - s_obj
        loss = F.relu(gap).pow(2).mean()
        confident = gap.detach() > self.margin
        if confident.any():
            loss = loss + (t_del - s_del)[confident].pow(2).sum(dim=1).mean()
        return loss
