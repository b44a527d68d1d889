"""The distiller: the active loss terms of a config, their weights and their state.

Each registered loss whose ``ILMIL.DISTILL.<SECTION>.ENABLED`` is true becomes a
term, weighted by its ``WEIGHT`` and, with ``ILMIL.DISTILL.TERM_WEIGHTS
uncertainty``, by a learned factor (homoscedastic uncertainty weighting):

    L = sum_k ( w_k L_k / (2 s_k^2) + log s_k ),   s_k learned (as log s_k^2, starting at 0)

With ``ILMIL.DISTILL.DETECTION_WEIGHT uncertainty`` (M-KD's exploration) the detection
loss gets such a factor too, L_det / (2 s_det^2) + log s_det, so the student weighs
imitating the teacher against learning the task itself.

The distiller is a submodule of the student, so its trainable parts (connectors,
learned weights) train and are synchronised with it, and its running state is
resumed with it; it is no part of the detector (``DISTILLER_PREFIX``).

The terms run in float32, outside autocast (precision.py): under mixed precision the
recorded maps are float16, where a sum over a map overflows (an FSP matrix sums H x W
products).
"""
import dataclasses

import torch
from torch import nn

from detectron2.config import CfgNode

from ..config import ConfigError, check_choice
from .precision import as_float32, autocast_off
from .registry import registered_terms

__all__ = ["DISTILLER_PREFIX", "TERM_WEIGHTINGS", "Distiller", "build_distiller", "enabled_terms"]

# State-dict prefix of the distiller inside a student (see ilmil.checkpoint).
DISTILLER_PREFIX = "distiller."
TERM_WEIGHTINGS = ("fixed", "uncertainty")


def enabled_terms(cfg):
    """``{section: loss class}`` of the terms ``cfg`` switches on, in config order;
    refuses an enabled section that no registered loss claims."""
    registered = registered_terms()
    terms = {}
    for section, node in cfg.ILMIL.DISTILL.items():
        if not isinstance(node, CfgNode) or not node.get("ENABLED", False):
            continue
        if section not in registered:
            raise ConfigError(f"ILMIL.DISTILL.{section}.ENABLED True: no registered distillation loss has the "
                              f"config section {section}; fix: register one (README, Writing a distillation loss) "
                              f"or enable one of {', '.join(sorted(registered))}")
        terms[section] = registered[section]
    return terms


class Distiller(nn.Module):
    """The weighted sum of named distillation terms."""

    def __init__(self, terms, weights, term_weights="fixed", detection_weight="fixed"):
        """
        Args:
            terms: {section: built loss module}.
            weights: {section: fixed weight}.
            term_weights: "fixed" or "uncertainty" (a learned factor per term).
            detection_weight: "fixed" or "uncertainty" (a learned factor on the detection loss).
        """
        super().__init__()
        check_choice("ILMIL.DISTILL.TERM_WEIGHTS", term_weights, TERM_WEIGHTINGS)
        check_choice("ILMIL.DISTILL.DETECTION_WEIGHT", detection_weight, TERM_WEIGHTINGS)
        self.terms = nn.ModuleDict({section.lower(): loss for section, loss in terms.items()})
        self.weights = {section.lower(): float(w) for section, w in weights.items()}
        self.log_variances = None
        if term_weights == "uncertainty":
            self.log_variances = nn.ParameterDict(
                {name: nn.Parameter(torch.zeros(())) for name in self.terms})
        self.detection_log_variance = nn.Parameter(torch.zeros(())) if detection_weight == "uncertainty" else None

    def term(self, section):
        """The loss module of config section ``section`` (e.g. ``RCN``), or None."""
        return self.terms[section.lower()] if section.lower() in self.terms else None

    def records(self):
        """Every layer name or module path a term reads."""
        return tuple(dict.fromkeys(name for loss in self.terms.values() for name in loss.records()))

    def weigh_detection(self, losses):
        """The detector's ``losses`` with the learned detection factor (and its
        ``loss_detection_uncertainty`` penalty, log s_det); as they are when fixed."""
        if self.detection_log_variance is None:
            return losses
        log_var = self.detection_log_variance
        weighted = {name: value * torch.exp(-log_var) / 2 for name, value in losses.items()}
        return {**weighted, "loss_detection_uncertainty": log_var / 2}

    def forward(self, student, teacher, context):
        """``{"loss_distill_<section>": weighted term}`` for the recorded outputs, in float32."""
        student, teacher = as_float32(student), as_float32(teacher)
        if context is not None:
            context = dataclasses.replace(context, teacher_outputs=as_float32(context.teacher_outputs))
        losses = {}
        with autocast_off():
            for name, loss in self.terms.items():
                value = self.weights[name] * loss(student, teacher, context)
                if self.log_variances is not None:
                    log_var = self.log_variances[name]
                    value = value * torch.exp(-log_var) / 2 + log_var / 2
                losses[f"loss_distill_{name}"] = value
        return losses


def build_distiller(cfg, student_shapes=None, teacher_shapes=None):
    """The distiller of ``cfg``'s enabled terms (None when none is), each loss built
    from its section with the feature shapes of both models (for connectors)."""
    terms = enabled_terms(cfg)
    if not terms:
        return None
    built = {section: cls(cfg, student_shapes, teacher_shapes) for section, cls in terms.items()}
    weights = {section: cfg.ILMIL.DISTILL[section].WEIGHT for section in terms}
    return Distiller(built, weights, cfg.ILMIL.DISTILL.TERM_WEIGHTS, cfg.ILMIL.DISTILL.DETECTION_WEIGHT)
