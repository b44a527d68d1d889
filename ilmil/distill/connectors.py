"""Connectors: trainable maps from a student layer to the teacher's width and size.

Feature terms compare a student map S with the teacher's T at the same role. When
their channel counts differ (a narrower student), S passes through a connector
a(.) first; when their strides differ, a(S) is resized to T's spatial size
(bilinear). Connectors are trained with the student and belong to its
distillation state, not to the detector: loaders of a deployed model skip them.
"""
import torch.nn.functional as F
from torch import nn

from detectron2.layers import Conv2d, get_norm
from detectron2.utils.registry import Registry

__all__ = ["CONNECTOR_REGISTRY", "build_connector", "match_size"]

CONNECTOR_REGISTRY = Registry("ILMIL_CONNECTOR")
CONNECTOR_REGISTRY.__doc__ = "Connectors, built by ``cls(in_channels, out_channels)``."


@CONNECTOR_REGISTRY.register()
class Conv1x1BN(nn.Sequential):
    """1x1 convolution and BatchNorm (FitNets' regressor as most detection KD uses it)."""

    def __init__(self, in_channels, out_channels):
        conv = Conv2d(in_channels, out_channels, kernel_size=1, bias=False, norm=get_norm("BN", out_channels))
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        super().__init__(conv)


@CONNECTOR_REGISTRY.register()
class Conv1x1(nn.Sequential):
    """A plain 1x1 convolution with bias."""

    def __init__(self, in_channels, out_channels):
        super().__init__(nn.Conv2d(in_channels, out_channels, kernel_size=1))


def build_connector(name, in_channels, out_channels):
    return CONNECTOR_REGISTRY.get(name)(in_channels, out_channels)


def match_size(student, teacher):
    """``student`` resized to ``teacher``'s spatial size when strides differ."""
    if student.shape[-2:] == teacher.shape[-2:]:
        return student
    return F.interpolate(student, size=teacher.shape[-2:], mode="bilinear", align_corners=False)
