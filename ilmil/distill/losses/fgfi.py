"""FGFI, fine-grained feature imitation (Wang et al. 2019): feature maps imitated
near objects only.

With M_l the FGFI mask of level l (ilmil.distill.masks: locations whose anchors
overlap a GT box at more than psi times that box's best anchor IoU; without anchors
on that level, the GT-box mask) and a(.) the connector:

    L = sum_l sum_{x,y,c} M_l (a(S_l) - T_l)^2 / (2 sum_l sum_{x,y} M_l)

With NORMALIZE, a(S_l) and T_l are first standardised per channel over (N, H, W), as
PKD does: the raw form assumes pretrained features of about unit scale, and on
features trained from scratch it outweighs the detection loss by orders of magnitude
(RetinaNet, 6400-iteration teacher: ~950 against 0.8).
"""
import torch

from detectron2.config import configurable

from ...config import ConfigError, check_value
from ..connectors import match_size
from ..masks import fgfi_mask, gt_box_mask
from ..registry import DISTILL_LOSS_REGISTRY, DistillLoss
from .feature import feature_connectors, require_feature_maps, standardize

__all__ = ["FGFIImitation", "weighted_imitation"]


@DISTILL_LOSS_REGISTRY.register()
class FGFIImitation(DistillLoss):
    """Masked feature imitation near the GT boxes."""

    config_key = "FGFI"

    @configurable
    def __init__(self, *, layers, psi=0.5, normalize=True, connectors=None):
        super().__init__()
        if not layers:
            raise ConfigError("ILMIL.DISTILL.FGFI.LAYERS is empty; fix: name at least one feature map, e.g. p3")
        self.layers = tuple(layers)
        # psi <= 0 would keep every location, psi >= 1 none (IoU > psi x the best IoU).
        self.psi = check_value("ILMIL.DISTILL.FGFI.PSI", psi, 0 < psi < 1, "in (0, 1)", 0.5)
        self.normalize = normalize
        self.connectors = connectors if connectors is not None else torch.nn.ModuleDict()

    @classmethod
    def from_config(cls, cfg, student_shapes=None, teacher_shapes=None):
        fgfi = cfg.ILMIL.DISTILL.FGFI
        require_feature_maps(fgfi.LAYERS, student_shapes, "ILMIL.DISTILL.FGFI.LAYERS")
        return {"layers": fgfi.LAYERS, "psi": fgfi.PSI, "normalize": fgfi.NORMALIZE,
                "connectors": feature_connectors(fgfi.LAYERS, student_shapes or {}, teacher_shapes or {},
                                                 cfg.ILMIL.DISTILL.CONNECTOR, "ILMIL.DISTILL.FGFI.LAYERS")}

    def records(self):
        return self.layers

    def masks(self, teacher, context):
        """{layer: [N, H, W] mask} at the teacher's map sizes."""
        sizes = {name: tuple(teacher[name].shape[-2:]) for name in self.layers}
        anchored = [name for name in self.layers if name in context.anchors]
        # A box's best IoU is over the anchors of every level, imitated or not.
        masks = fgfi_mask(context.gt_instances, context.anchors, {n: sizes[n] for n in anchored},
                          self.psi) if anchored else {}
        for name in self.layers:
            if name not in masks:
                masks[name] = gt_box_mask(context.gt_instances, sizes[name], context.strides[name])
        return masks

    def forward(self, student, teacher, context):
        return weighted_imitation(student, teacher, self.layers, self.connectors, self.masks(teacher, context),
                                  normalize=self.normalize)


def weighted_imitation(student, teacher, layers, connectors, weights, min_area=1.0, normalize=False):
    """sum_l sum_{n,x,y,c} W_l (a(S_l) - T_l)^2 / (2 max(sum_l sum_{n,x,y} W_l, ``min_area``)),
    ``weights``: {layer: [N, H, W] map W_l at the teacher's size}; ``connectors`` a(.) where given;
    ``normalize``: a(S_l) and T_l standardised per channel first."""
    total, area = 0.0, 0.0
    for name in layers:
        s, t = student[name], teacher[name].detach()
        if name in connectors:
            s = connectors[name](s)
        s = match_size(s, t)
        if normalize:
            s, t = standardize(s), standardize(t)
        weight = weights[name][:, None]
        total = total + ((s - t).pow(2) * weight).sum()
        area = area + weight.sum()
    return total / (2 * area.clamp(min=min_area))
