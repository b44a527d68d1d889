"""MFRRK distillation losses: multi-layer feature maps, RPN and RCN knowledge.

Each loss is an ``nn.Module`` registered in ``DISTILL_LOSS_REGISTRY`` and built
from the config by name; the teacher's tensors are always detached. S = student,
T = teacher.

Feature distances ``d_l`` (per layer l):
    l2           mean((S - T)^2)
    normalized   S', T' standardised per channel over (N, H, W); mean((S' - T')^2) / 2   (PKD)
    filtered_l1  S^ = S - mean(S), T^ = T - mean(T); mean(max(T^ - S^, 0))            (Faster ILOD)
Layer weighting:
    uniform      L_feat = sum_l d_l
    adaptive     dbar_l <- m * dbar_l + (1 - m) * d_l (detached, m = 0.9);
                 w_l = clip(L * dbar_l / sum(dbar), 0.5, 2); L_feat = sum_l w_l * d_l
RPN (all anchors, objectness logits o and deltas r):
    mean(max(o_T - o_S, 0)^2) + mean over anchors with o_T - o_S > margin of sum_4 (r_T - r_S)^2
RCN (teacher proposals, logits of [old classes, background]):
    l2  per-proposal mean-centred L2;  kl  T^2 * KL(softmax(z_T / T) || softmax(z_S / T))
    unbiased_kl  kl with the student's new classes merged into its background (MMA, .unbiased)
    + mean over proposals and old classes of sum_4 (t_T - t_S)^2
"""
import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.utils.registry import Registry

from ..config import check_choice
from .unbiased import unbiased_student_log_probs

__all__ = [
    "DISTILL_LOSS_REGISTRY",
    "FEATURE_DISTANCES",
    "FeatureDistillation",
    "RPNDistillation",
    "RCNDistillation",
    "build_distill_loss",
    "check_distill_choices",
    "old_class_logits",
]

DISTILL_LOSS_REGISTRY = Registry("ILMIL_DISTILL_LOSS")
DISTILL_LOSS_REGISTRY.__doc__ = """
Registry of distillation losses. A loss is an ``nn.Module`` built by
``cls(cfg)`` (``@configurable``); its forward returns a scalar tensor.
"""


def _l2(student, teacher):
    return F.mse_loss(student, teacher)


def _standardize(x, eps=1e-6):
    # Per-channel (x - mean) / std over batch and space: batch_norm's fused kernel does
    # it, forward and backward, ~3x faster on CPU than separate mean / std / arithmetic.
    return F.batch_norm(x, None, None, training=True, eps=eps)


def _normalized(student, teacher):
    return F.mse_loss(_standardize(student), _standardize(teacher)) / 2


def _filtered_l1(student, teacher):
    # Only where the teacher responds more strongly than the student (Faster ILOD).
    return F.relu((teacher - teacher.mean()) - (student - student.mean())).mean()


FEATURE_DISTANCES = {"l2": _l2, "normalized": _normalized, "filtered_l1": _filtered_l1}
LAYER_WEIGHTINGS = ("uniform", "adaptive")
RCN_LOGITS = ("l2", "kl", "unbiased_kl")


def check_distill_choices(cfg):
    """Refuse an unknown distance, layer weighting or logits mode of ``cfg`` by its key,
    before any work (the losses themselves are built when a stage starts training)."""
    d = cfg.ILMIL.DISTILL
    check_choice("ILMIL.DISTILL.FEAT.DISTANCE", d.FEAT.DISTANCE, FEATURE_DISTANCES)
    check_choice("ILMIL.DISTILL.FEAT.LAYER_WEIGHTING", d.FEAT.LAYER_WEIGHTING, LAYER_WEIGHTINGS)
    check_choice("ILMIL.DISTILL.RCN.LOGITS", d.RCN.LOGITS, RCN_LOGITS)


def build_distill_loss(name, cfg):
    return DISTILL_LOSS_REGISTRY.get(name)(cfg)


@DISTILL_LOSS_REGISTRY.register()
class FeatureDistillation(nn.Module):
    """Multi-layer feature-map distillation with uniform or adaptive layer weights."""

    @configurable
    def __init__(self, *, layers, distance="normalized", weighting="adaptive", momentum=0.9, weight_range=(0.5, 2.0)):
        super().__init__()
        if distance not in FEATURE_DISTANCES:
            raise ValueError(f"unknown feature distance {distance!r}; choose one of {sorted(FEATURE_DISTANCES)}")
        if weighting not in LAYER_WEIGHTINGS:
            raise ValueError(f"unknown layer weighting {weighting!r}; choose uniform or adaptive")
        if not layers:
            raise ValueError("feature distillation needs at least one layer (ILMIL.DISTILL.FEAT.LAYERS)")
        self.layers = tuple(layers)
        self.distance = FEATURE_DISTANCES[distance]
        self.weighting = weighting
        self.momentum = momentum
        self.weight_range = tuple(weight_range)
        # Saved with the student's weights, so --resume continues the running average;
        # a model without this loss skips it when loading (ilmil.checkpoint.DISTILLATION_STATE_PREFIXES).
        self.register_buffer("ema_distance", torch.zeros(len(self.layers)))

    @classmethod
    def from_config(cls, cfg):
        feat = cfg.ILMIL.DISTILL.FEAT
        return {
            "layers": feat.LAYERS,
            "distance": feat.DISTANCE,
            "weighting": feat.LAYER_WEIGHTING,
            "momentum": feat.EMA_MOMENTUM,
            "weight_range": feat.WEIGHT_RANGE,
        }

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

    def forward(self, student_features, teacher_features):
        missing = [n for n in self.layers if n not in student_features or n not in teacher_features]
        if missing:
            raise KeyError(f"feature layers {missing} not produced by the model; available: {sorted(student_features)}")
        distances = []
        for name in self.layers:
            s, t = student_features[name], teacher_features[name].detach()
            if s.shape != t.shape:
                raise ValueError(f"feature {name}: student shape {tuple(s.shape)} != teacher {tuple(t.shape)}")
            distances.append(self.distance(s, t))
        distances = torch.stack(distances)
        return (self.layer_weights(distances) * distances).sum()


def _flatten_rpn(logits, deltas):
    """Per-level RPN head outputs -> [N, all anchors] logits and [N, all anchors, 4] deltas."""
    flat_logits = torch.cat([x.permute(0, 2, 3, 1).flatten(1) for x in logits], dim=1)
    flat_deltas = []
    for x in deltas:
        n, _, h, w = x.shape
        flat_deltas.append(x.view(n, -1, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 4))
    return flat_logits, torch.cat(flat_deltas, dim=1)


@DISTILL_LOSS_REGISTRY.register()
class RPNDistillation(nn.Module):
    """Objectness where the teacher is more confident, and its deltas on those anchors."""

    @configurable
    def __init__(self, *, margin=0.1):
        super().__init__()
        self.margin = margin

    @classmethod
    def from_config(cls, cfg):
        return {"margin": cfg.ILMIL.DISTILL.RPN.DELTA_MARGIN}

    def forward(self, student_logits, student_deltas, teacher_logits, teacher_deltas):
        s_obj, s_del = _flatten_rpn(student_logits, student_deltas)
        t_obj, t_del = _flatten_rpn([t.detach() for t in teacher_logits], [t.detach() for t in teacher_deltas])
        gap = t_obj - s_obj
        loss = F.relu(gap).pow(2).mean()
        confident = gap.detach() > self.margin
        if confident.any():
            loss = loss + (t_del - s_del)[confident].pow(2).sum(dim=1).mean()
        return loss


def old_class_logits(student_scores, num_old):
    """The student's logits of [old classes, background]: columns 0..K-1 and the last."""
    return torch.cat([student_scores[:, :num_old], student_scores[:, -1:]], dim=1)


@DISTILL_LOSS_REGISTRY.register()
class RCNDistillation(nn.Module):
    """Box-head logits of old classes + background, and old-class box deltas."""

    @configurable
    def __init__(self, *, logits="l2", temperature=2.0):
        super().__init__()
        if logits not in RCN_LOGITS:
            raise ValueError(f"unknown RCN logits mode {logits!r}; choose one of {', '.join(RCN_LOGITS)}")
        self.logits = logits
        self.temperature = temperature

    @classmethod
    def from_config(cls, cfg):
        rcn = cfg.ILMIL.DISTILL.RCN
        return {"logits": rcn.LOGITS, "temperature": rcn.TEMPERATURE}

    def forward(self, student_scores, student_deltas, teacher_scores, teacher_deltas):
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
