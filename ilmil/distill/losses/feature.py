"""Multi-layer feature-map distillation (MFRRK's feature term; PKD, Faster ILOD's
and FitNets-style imitation as its distances).

Per layer l, with S_l the student's map (through its connector when the widths
differ, resized when the strides do) and T_l the teacher's:

    l2           d_l = mean((S - T)^2)
    normalized   S', T' standardised per channel over (N, H, W); d_l = mean((S' - T')^2) / 2   (PKD)
    filtered_l1  S^ = S - mean(S), T^ = T - mean(T); d_l = mean(max(T^ - S^, 0))            (Faster ILOD)

With FREE_CHANNELS f > 0 (M-KD's exploration), each training step draws for every
layer a random subset of round(f C) of its (teacher-width) channels that d_l leaves out.

Layer weights:

    uniform      L_feat = sum_l d_l
    adaptive     dbar_l <- m * dbar_l + (1 - m) * d_l (detached, m = EMA_MOMENTUM);
                 w_l = clip(L * dbar_l / sum(dbar), WEIGHT_RANGE); L_feat = sum_l w_l * d_l
"""
import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable

from ...config import ConfigError, check_choice, check_value
from ..connectors import build_connector, match_size
from ..registry import DISTILL_LOSS_REGISTRY, DistillLoss

__all__ = ["FEATURE_DISTANCES", "LAYER_WEIGHTINGS", "FeatureDistillation", "feature_connectors", "standardize"]


def _l2(student, teacher):
    return F.mse_loss(student, teacher)


def standardize(x, eps=1e-6):
    # Per-channel (x - mean) / std over batch and space: batch_norm's fused kernel does
    # it, forward and backward, ~3x faster on CPU than separate mean / std / arithmetic.
    if x.numel() == x.shape[1]:
        # One value per channel (a 1 x 1 level, one image): all zeros, which the kernel refuses.
        return x - x.detach()
    return F.batch_norm(x, None, None, training=True, eps=eps)


def _normalized(student, teacher):
    return F.mse_loss(standardize(student), standardize(teacher)) / 2


def _filtered_l1(student, teacher):
    # Only where the teacher responds more strongly than the student (Faster ILOD).
    return F.relu((teacher - teacher.mean()) - (student - student.mean())).mean()


FEATURE_DISTANCES = {"l2": _l2, "normalized": _normalized, "filtered_l1": _filtered_l1}
LAYER_WEIGHTINGS = ("uniform", "adaptive")


def require_feature_maps(layers, student_shapes, key):
    """Refuse ``layers`` (config key ``key``) that are not the backbone's feature maps, for a
    term that needs each layer's stride or width: a module path has neither. Nothing is
    checked without the shapes (a term built for its keys' values alone)."""
    if student_shapes:
        others = [name for name in layers if name not in student_shapes]
        if others:
            raise ConfigError(f"{key}: {', '.join(others)} is not a feature map of the backbone, and this term "
                              f"needs each layer's stride; fix: name feature maps ({', '.join(student_shapes)})")


def feature_connectors(layers, student_shapes, teacher_shapes, connector, key):
    """``nn.ModuleDict`` of a connector per layer whose widths differ (``connector``:
    a CONNECTOR_REGISTRY name, empty = none allowed); ``key`` names the layer list."""
    connectors = nn.ModuleDict()
    for name in layers:
        s, t = student_shapes.get(name), teacher_shapes.get(name)
        if s is None or t is None or s.channels == t.channels:
            continue
        if not connector:
            raise ConfigError(f"{key}: layer {name} has {s.channels} channels in the student and {t.channels} in "
                              "the teacher, and ILMIL.DISTILL.CONNECTOR is empty; fix: set ILMIL.DISTILL.CONNECTOR "
                              "Conv1x1BN (a trained 1x1 conv + BN maps the student's width to the teacher's)")
        connectors[name] = build_connector(connector, s.channels, t.channels)
    return connectors


@DISTILL_LOSS_REGISTRY.register()
class FeatureDistillation(DistillLoss):
    """Multi-layer feature-map distillation with uniform or adaptive layer weights."""

    config_key = "FEAT"

    @configurable
    def __init__(self, *, layers, distance="normalized", weighting="adaptive", momentum=0.9,
                 weight_range=(0.5, 2.0), free_channels=0.0, connectors=None):
        super().__init__()
        if not 0.0 <= free_channels < 1.0:
            raise ConfigError(f"ILMIL.DISTILL.FEAT.FREE_CHANNELS {free_channels}: a fraction in [0, 1); "
                              "fix: e.g. 0.1, or 0 to imitate every channel")
        check_choice("ILMIL.DISTILL.FEAT.DISTANCE", distance, FEATURE_DISTANCES)
        check_choice("ILMIL.DISTILL.FEAT.LAYER_WEIGHTING", weighting, LAYER_WEIGHTINGS)
        if not layers:
            raise ConfigError("ILMIL.DISTILL.FEAT.LAYERS is empty; fix: name at least one layer, e.g. p2")
        if len(weight_range) != 2 or not 0 < weight_range[0] <= weight_range[1]:
            raise ConfigError(f"ILMIL.DISTILL.FEAT.WEIGHT_RANGE {list(weight_range)}: the least and the largest "
                              "layer weight; fix: two numbers, 0 < low <= high, e.g. (0.5, 2.0)")
        self.layers = tuple(layers)
        self.distance = FEATURE_DISTANCES[distance]
        self.weighting = weighting
        self.momentum = check_value("ILMIL.DISTILL.FEAT.EMA_MOMENTUM", momentum, 0 <= momentum < 1, "in [0, 1)", 0.9)
        self.weight_range = tuple(weight_range)
        self.free_channels = free_channels
        self.connectors = connectors if connectors is not None else nn.ModuleDict()
        # Saved with the student's training state, so --resume continues the running average.
        self.register_buffer("ema_distance", torch.zeros(len(self.layers)))

    @classmethod
    def from_config(cls, cfg, student_shapes=None, teacher_shapes=None):
        feat = cfg.ILMIL.DISTILL.FEAT
        return {
            "layers": feat.LAYERS,
            "distance": feat.DISTANCE,
            "weighting": feat.LAYER_WEIGHTING,
            "momentum": feat.EMA_MOMENTUM,
            "weight_range": feat.WEIGHT_RANGE,
            "free_channels": feat.FREE_CHANNELS,
            "connectors": feature_connectors(feat.LAYERS, student_shapes or {}, teacher_shapes or {},
                                             cfg.ILMIL.DISTILL.CONNECTOR, "ILMIL.DISTILL.FEAT.LAYERS"),
        }

    def records(self):
        return self.layers

    def layer_weights(self, distances):
        """Weights of this step; updates the EMA in training mode."""
        if self.weighting == "uniform":
            return torch.ones_like(distances)
        if self.training:
            self.ema_distance.mul_(self.momentum).add_((1 - self.momentum) * distances.detach())
        total = self.ema_distance.sum()
        if total <= 0:
            return torch.ones_like(distances)
        weights = len(self.layers) * self.ema_distance / total
        return weights.clamp(*self.weight_range)

    def imitated_channels(self, channels, device):
        """The channels a training step imitates: all but a random FREE_CHANNELS share."""
        free = round(self.free_channels * channels)
        return torch.randperm(channels, device=device)[free:].sort().values

    def forward(self, student, teacher, context=None):
        distances = []
        for name in self.layers:
            s, t = student[name], teacher[name].detach()
            if name in self.connectors:
                s = self.connectors[name](s)
            s = match_size(s, t)
            if s.shape != t.shape:  # a module path (connectors are built for feature maps only)
                raise ConfigError(f"ILMIL.DISTILL.FEAT.LAYERS: {name} is {tuple(s.shape)} in the student and "
                                  f"{tuple(t.shape)} in the teacher; fix: name a feature map (a connector maps its "
                                  "width) or a module path of the same width in both")
            if self.training and self.free_channels > 0:
                kept = self.imitated_channels(t.shape[1], s.device)
                s, t = s[:, kept], t[:, kept]
            distances.append(self.distance(s, t))
        distances = torch.stack(distances)
        return (self.layer_weights(distances) * distances).sum()
