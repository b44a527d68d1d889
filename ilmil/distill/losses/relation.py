"""Relations between layers: FSP matrices (Yim et al. 2017), one of M-KD's kinds of
knowledge: how a pair of layers' channels co-vary, the "flow" between them.

For a pair (l1, l2) and an image, with F1 [C1, H, W] and F2 [C2, H, W] (the second
resized to the first's size, bilinear; student maps through their connectors
first, so their widths are the teacher's):

    G(F1, F2) = F1 F2^T / (H W)                       in R^{C1 x C2}
    L = sum_pairs mean_images mean_{C1 x C2} (G(S1, S2) - G(T1, T2))^2
"""
import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable

from ...config import ConfigError
from ..connectors import match_size
from ..registry import DISTILL_LOSS_REGISTRY, DistillLoss
from .feature import feature_connectors

__all__ = ["FSPRelation", "fsp_matrix"]


def _resize_matrix(out_size, in_size, like):
    """[out_size, in_size] weights of 1-D bilinear resizing (as ``match_size``), so that a
    map X [in_h, in_w] resized is A_h X A_w^T."""
    identity = torch.eye(in_size, dtype=like.dtype, device=like.device)[None, None]
    return F.interpolate(identity, size=(in_size, out_size), mode="bilinear", align_corners=False)[0, 0].t()


def fsp_matrix(first, second):
    """[N, C1, C2] FSP matrices of [N, C1, H, W] ``first`` and [N, C2, h, w] ``second``.

    A coarser ``second`` is not upsampled: with its resizing A_H F2 A_W^T, the sum over
    the H x W grid of F1 resize(F2)^T equals the sum over the h x w grid of
    (A_H^T F1 A_W) F2^T, the same matrix from a quarter of the products per octave
    (upsampled, the ResNet-stage pairs were most of what M-KD costs over output
    distillation on RetinaNet)."""
    height, width = first.shape[-2:]
    if second.shape[-2] * second.shape[-1] < height * width:
        first = _resize_matrix(height, second.shape[-2], first).t() @ first @ _resize_matrix(
            width, second.shape[-1], first)
    else:
        second = match_size(second, first)
    return torch.bmm(first.flatten(2), second.flatten(2).transpose(1, 2)) / (height * width)


def _pair_layers(pairs):
    """The layers of ``pairs``, each once, in order."""
    return tuple(dict.fromkeys(name for pair in pairs for name in pair))


@DISTILL_LOSS_REGISTRY.register()
class FSPRelation(DistillLoss):
    """The FSP matrices of layer pairs (see the module docstring)."""

    config_key = "FSP"

    @configurable
    def __init__(self, *, pairs, connectors=None):
        super().__init__()
        if not pairs or any(isinstance(pair, str) or len(pair) != 2 for pair in pairs):
            given = [pair if isinstance(pair, str) else list(pair) for pair in pairs]
            raise ConfigError(f"ILMIL.DISTILL.FSP.PAIRS {given}: give pairs of layers; "
                              "fix: e.g. [[res2, res3], [res3, res4], [res4, res5]]")
        self.pairs = tuple(tuple(pair) for pair in pairs)
        self.layers = _pair_layers(self.pairs)
        self.connectors = connectors if connectors is not None else nn.ModuleDict()

    @classmethod
    def from_config(cls, cfg, student_shapes=None, teacher_shapes=None):
        pairs = cfg.ILMIL.DISTILL.FSP.PAIRS
        return {"pairs": pairs,
                "connectors": feature_connectors(_pair_layers(pairs), student_shapes or {}, teacher_shapes or {},
                                                 cfg.ILMIL.DISTILL.CONNECTOR, "ILMIL.DISTILL.FSP.PAIRS")}

    def records(self):
        return self.layers

    def forward(self, student, teacher, context=None):
        mapped = {name: self.connectors[name](student[name]) if name in self.connectors else student[name]
                  for name in self.layers}
        total = 0.0
        for first, second in self.pairs:
            g_s = fsp_matrix(mapped[first], mapped[second])
            g_t = fsp_matrix(teacher[first].detach(), teacher[second].detach())
            if g_s.shape != g_t.shape:  # a module path (connectors are built for feature maps only)
                raise ConfigError(f"ILMIL.DISTILL.FSP.PAIRS: [{first}, {second}] are {mapped[first].shape[1]} and "
                                  f"{mapped[second].shape[1]} channels wide in the student, {teacher[first].shape[1]} "
                                  f"and {teacher[second].shape[1]} in the teacher; fix: name feature maps (a "
                                  "connector maps their widths) or module paths of the same widths in both")
            total = total + (g_s - g_t).pow(2).mean()
        return total
