"""Connectors: trainable maps from a student layer to the teacher's width and size,
and knowledge review's attention fusion of a student level with the coarser ones.

Feature terms compare a student map S with the teacher's T at the same role. When
their channel counts differ (a narrower student), S passes through a connector
a(.) first; when their strides differ, a(S) is resized to T's spatial size
(bilinear). Connectors are trained with the student and belong to its
distillation state, not to the detector: loaders of a deployed model skip them.
"""
import torch
import torch.nn.functional as F
from torch import nn

from detectron2.layers import Conv2d, get_norm
from detectron2.utils.registry import Registry

__all__ = ["CONNECTOR_REGISTRY", "AttentionFusion", "build_connector", "match_size"]

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


class AttentionFusion(nn.Module):
    """Knowledge review's fusion of a student level with the fused level above it
    (coarser), trained with the student and, like a connector, not part of the detector:

        x = BN(conv1x1(S_l))                      at ``mid_channels``
        y = the level above's fused map, upsampled (nearest) to x's size
        a = sigmoid(conv1x1([x, y]))              spatial attention, 2 maps
        (c_x, c_y) = sigmoid(fc(relu(fc(avgpool([x, y])))))   channel attention, 2 x mid
        fused = x * a_0 * c_x + y * a_1 * c_y     (the coarsest level: fused = x)
        out = BN(conv3x3(fused))                  at the teacher's width

    ``forward(x, above)`` returns ``(out, fused)``; ``fused`` goes to the level below.
    """

    def __init__(self, in_channels, mid_channels, out_channels, fuse):
        super().__init__()
        self.reduce = Conv2d(in_channels, mid_channels, kernel_size=1, bias=False, norm=get_norm("BN", mid_channels))
        self.output = Conv2d(mid_channels, out_channels, kernel_size=3, padding=1, bias=False,
                             norm=get_norm("BN", out_channels))
        self.spatial = nn.Conv2d(2 * mid_channels, 2, kernel_size=1) if fuse else None
        hidden = max(2 * mid_channels // 8, 4)
        self.channel = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(2 * mid_channels, hidden, kernel_size=1), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, 2 * mid_channels, kernel_size=1),
        ) if fuse else None  # fmt: skip

    def forward(self, x, above=None):
        x = self.reduce(x)
        if self.spatial is not None:
            y = F.interpolate(above, size=x.shape[-2:], mode="nearest")
            both = torch.cat([x, y], dim=1)
            spatial = torch.sigmoid(self.spatial(both))
            channel_x, channel_y = torch.sigmoid(self.channel(both)).chunk(2, dim=1)
            x = x * spatial[:, :1] * channel_x + y * spatial[:, 1:] * channel_y
        return self.output(x), x
