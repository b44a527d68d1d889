"""Attention transfer (Zagoruyko & Komodakis 2017), one of M-KD's kinds of knowledge:
where a hidden layer is active, not what its channels hold, so student and teacher
widths need no connector.

Per layer l and image, with F_l [C, H, W] a map (the student's attention map resized
to the teacher's size, bilinear):

    Q_l = vec(mean_c F_l^2) / ||vec(mean_c F_l^2)||_2
    L = sum_l mean_images ||Q_l(S) - Q_l(T)||_2
"""
import torch.nn.functional as F

from detectron2.config import configurable

from ...config import ConfigError
from ..connectors import match_size
from ..registry import DISTILL_LOSS_REGISTRY, DistillLoss

__all__ = ["AttentionTransfer", "attention_map"]


def attention_map(features):
    """[N, 1, H, W] spatial attention of [N, C, H, W] ``features``: the channel mean of
    the squared activations (the loss normalises it, after any resizing)."""
    return features.pow(2).mean(dim=1, keepdim=True)


@DISTILL_LOSS_REGISTRY.register()
class AttentionTransfer(DistillLoss):
    """Normalised spatial attention maps of hidden layers (see the module docstring)."""

    config_key = "AT"

    @configurable
    def __init__(self, *, layers):
        super().__init__()
        if not layers:
            raise ConfigError("ILMIL.DISTILL.AT.LAYERS is empty; fix: name at least one layer, e.g. res4")
        self.layers = tuple(layers)

    @classmethod
    def from_config(cls, cfg, student_shapes=None, teacher_shapes=None):
        return {"layers": cfg.ILMIL.DISTILL.AT.LAYERS}

    def records(self):
        return self.layers

    def forward(self, student, teacher, context=None):
        total = 0.0
        for name in self.layers:
            t = attention_map(teacher[name].detach())
            s = match_size(attention_map(student[name]), t)
            q_s = F.normalize(s.flatten(1), dim=1)
            q_t = F.normalize(t.flatten(1), dim=1)
            total = total + (q_s - q_t).norm(dim=1).mean()
        return total
