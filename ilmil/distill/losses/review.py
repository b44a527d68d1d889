"""Knowledge review with foreground / background decoupling (ReviewKD's fusion and
hierarchical context loss, decoupled as Zhang & Pan 2023 do for RetinaNet and FCOS).

The student's levels S_1 .. S_L (``LAYERS``, fine to coarse) are fused coarse to
fine by ``AttentionFusion`` modules (ilmil.distill.connectors): O_L from S_L alone,
O_l from S_l and the fused map of level l+1, each at the teacher's width, so a
student level learns from the teacher's level and, through the fusion, its
higher levels. With T_l the teacher's map and M_l the GT-box mask of the level
(pseudo-labels included in incremental runs):

    D_k = mean_c (P_k(O_l) - P_k(T_l))^2           P_k: the full size (k = 0), then adaptive
                                                   average pooling to each of POOL_SIZES
    d_k = FG_WEIGHT * sum(M_k D_k) / sum(M_k)      M_k = P_k(M_l), the share of each pooled
        + BG_WEIGHT * sum((1 - M_k) D_k) / sum(1 - M_k)     cell inside a box
          (without DECOUPLE: d_k = mean(D_k))
    L = sum_l sum_k 2^-k d_k / sum_k 2^-k

With NORMALIZE, O_l and T_l are first standardised per channel over (N, H, W), as
PKD does: the published method compares pretrained features of about unit scale,
while detectors trained from scratch grow features whose raw squared error outweighs
the detection loss by orders of magnitude.

A pool size not smaller than the map is skipped (it would repeat the full size).
"""
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable

from ...config import ConfigError, check_value
from ..connectors import AttentionFusion, match_size
from ..masks import gt_box_mask
from ..registry import DISTILL_LOSS_REGISTRY, DistillLoss
from .feature import require_feature_maps, standardize

__all__ = ["KnowledgeReview", "pyramid_distance"]


def pyramid_distance(student, teacher, mask=None, pool_sizes=(4, 2, 1), fg_weight=1.0, bg_weight=1.0):
    """The level term of the module docstring: ``student`` and ``teacher`` [N, C, H, W],
    ``mask`` [N, H, W] (None: not decoupled)."""
    total, weights = 0.0, 0.0
    sizes = [None] + [size for size in pool_sizes if size < min(teacher.shape[-2:])]
    for k, size in enumerate(sizes):
        s, t, m = student, teacher, mask
        if size is not None:
            s, t = F.adaptive_avg_pool2d(student, size), F.adaptive_avg_pool2d(teacher, size)
            m = F.adaptive_avg_pool2d(mask[:, None], size)[:, 0] if mask is not None else None
        squared = (s - t).pow(2).mean(dim=1)
        if m is None:
            distance = squared.mean()
        else:  # an empty part (no box in the batch) contributes 0
            distance = (fg_weight * (m * squared).sum() / m.sum().clamp(min=1e-12)
                        + bg_weight * ((1 - m) * squared).sum() / (1 - m).sum().clamp(min=1e-12))
        total = total + 0.5**k * distance
        weights += 0.5**k
    return total / weights


@DISTILL_LOSS_REGISTRY.register()
class KnowledgeReview(DistillLoss):
    """Student levels fused coarse to fine, imitating the teacher's levels at several
    scales, foreground and background apart (see the module docstring)."""

    config_key = "REVIEW"

    @configurable
    def __init__(self, *, layers, fusions=None, normalize=True, decouple=True, fg_weight=1.0, bg_weight=1.0,
                 pool_sizes=(4, 2, 1)):
        super().__init__()
        if not layers:
            raise ConfigError("ILMIL.DISTILL.REVIEW.LAYERS is empty; fix: name the levels, fine to coarse, "
                              "e.g. [p2, p3, p4, p5, p6]")
        if any(not isinstance(size, int) or size < 1 for size in pool_sizes):
            raise ConfigError(f"ILMIL.DISTILL.REVIEW.POOL_SIZES {list(pool_sizes)}: sizes must be whole numbers of "
                              "at least 1; fix: e.g. [4, 2, 1], or [] for the full size only")
        self.layers = tuple(layers)
        # Empty when built without the models' shapes (the config check); the distiller builds it with them.
        self.fusions = fusions if fusions is not None else nn.ModuleList()
        self.normalize = normalize
        self.decouple = decouple
        self.fg_weight = check_value("ILMIL.DISTILL.REVIEW.FG_WEIGHT", fg_weight, fg_weight >= 0, "at least 0", 0.25)
        self.bg_weight = check_value("ILMIL.DISTILL.REVIEW.BG_WEIGHT", bg_weight, bg_weight >= 0, "at least 0", 1.0)
        self.pool_sizes = tuple(pool_sizes)

    @classmethod
    def from_config(cls, cfg, student_shapes=None, teacher_shapes=None):
        review = cfg.ILMIL.DISTILL.REVIEW
        check_value("ILMIL.DISTILL.REVIEW.MID_CHANNELS", review.MID_CHANNELS, review.MID_CHANNELS >= 1, "at least 1", 64)
        layers = list(review.LAYERS)
        require_feature_maps(layers, student_shapes, "ILMIL.DISTILL.REVIEW.LAYERS")
        strides = [student_shapes[name].stride for name in layers] if student_shapes else []
        if any(finer > coarser for finer, coarser in zip(strides, strides[1:])):
            # Each level is fused with the one after it, enlarged to its size: given coarse first,
            # the fusion would shrink the finer map instead, another method.
            ordered = sorted(layers, key=lambda name: student_shapes[name].stride)
            raise ConfigError(f"ILMIL.DISTILL.REVIEW.LAYERS {layers}: strides {strides}, and the review goes fine to "
                              f"coarse; fix: {ordered}")
        fusions = None
        if student_shapes and teacher_shapes and all(name in teacher_shapes for name in layers):
            fusions = nn.ModuleList(
                AttentionFusion(student_shapes[name].channels, review.MID_CHANNELS, teacher_shapes[name].channels,
                                fuse=i + 1 < len(layers))
                for i, name in enumerate(layers))  # fmt: skip
        return {"layers": layers, "fusions": fusions, "normalize": review.NORMALIZE, "decouple": review.DECOUPLE,
                "fg_weight": review.FG_WEIGHT, "bg_weight": review.BG_WEIGHT, "pool_sizes": tuple(review.POOL_SIZES)}

    def records(self):
        return self.layers

    def review(self, student):
        """The fused student maps O_l, fine to coarse, at the teacher's widths."""
        outputs, above = [], None
        for name, fusion in zip(reversed(self.layers), reversed(self.fusions)):
            out, above = fusion(student[name], above)
            outputs.append(out)
        return outputs[::-1]

    def forward(self, student, teacher, context):
        total = 0.0
        for name, out in zip(self.layers, self.review(student)):
            t, out = teacher[name].detach(), match_size(out, teacher[name])
            if self.normalize:
                t, out = standardize(t), standardize(out)
            mask = gt_box_mask(context.gt_instances, t.shape[-2:], context.strides[name]) if self.decouple else None
            total = total + pyramid_distance(out, t, mask, self.pool_sizes, self.fg_weight, self.bg_weight)
        return total
