"""The registry of distillation losses and what a loss is given.

A loss is a small ``nn.Module`` registered in ``DISTILL_LOSS_REGISTRY``. Its name
in the config is its section under ``ILMIL.DISTILL`` (``config_key``: ``FEAT``,
``RPN``, ...), whose ``ENABLED`` and ``WEIGHT`` keys switch and weigh the term; the
section's other keys are the loss's own. A term is logged as
``loss_distill_<section in lower case>``.

``forward(student, teacher, context)`` receives the recorded outputs of both
models (dicts: each name of ``records()`` -> that layer's output, see recorder.py),
in float32 with autocast off, and a :class:`DistillContext`, and returns a scalar.
Every loss is zero when the student's outputs, as the loss maps them (its connectors,
the review's fusions), equal the teacher's; learned term weights (distiller.py) add
their own regulariser on top.
"""
from dataclasses import dataclass, field

from torch import nn

from detectron2.utils.registry import Registry

from ..config import ConfigError

__all__ = ["DISTILL_LOSS_REGISTRY", "DistillContext", "DistillLoss", "registered_terms"]

DISTILL_LOSS_REGISTRY = Registry("ILMIL_DISTILL_LOSS")
DISTILL_LOSS_REGISTRY.__doc__ = """
Distillation losses, each a ``DistillLoss`` subclass whose ``config_key`` names its
section under ``ILMIL.DISTILL``; built by ``cls(cfg, student_shapes, teacher_shapes)``.
"""


@dataclass
class DistillContext:
    """What a loss may need besides the recorded outputs.

    gt_instances: per image, the stage's GT boxes plus the pseudo-labels (``gt_boxes``,
        ``gt_classes``), in the student's input coordinates.
    strides: layer name -> stride of the recorded feature maps that have one.
    head_strides: a dense head's levels' strides, in the order of its outputs.
    anchors: layer name -> the student's anchors on that level (``Boxes``, position-major),
        for anchor-based detectors.
    num_old_classes: the teacher's classes (the first ones of the student's).
    teacher_outputs: the teacher's outputs by name (Faster R-CNN: ``"proposals"``,
        ``"box_outputs"``; one-stage with pseudo-labels: ``"detections"``; a head with
        objectness (YOLO): ``"objectness"``), for losses that weigh or select by the
        teacher's confidence.
    box_decoders: one-stage detectors, ``"student"`` and ``"teacher"`` -> a function of
        that model's per-level head box outputs giving [N, P, 4] boxes in input pixels
        (``ilmil.modeling.decode_head_boxes``), for losses that compare boxes, not deltas.
    """

    gt_instances: list
    strides: dict = field(default_factory=dict)
    head_strides: list = field(default_factory=list)
    anchors: dict = field(default_factory=dict)
    num_old_classes: int = 0
    teacher_outputs: dict = field(default_factory=dict)
    box_decoders: dict = field(default_factory=dict)


class DistillLoss(nn.Module):
    """Base class of the registered losses.

    Subclasses set ``config_key`` and list in ``records()`` every output they read,
    feature maps and module paths alike: only those are recorded.
    """

    config_key = ""

    def records(self):
        """The layer names or module paths this loss reads from both models."""
        return ()

    def forward(self, student, teacher, context):
        raise NotImplementedError


def registered_terms():
    """``{config section: loss class}`` of every registered loss."""
    terms = {}
    for name, cls in DISTILL_LOSS_REGISTRY:
        if not cls.config_key:
            raise ConfigError(f"distillation loss {name} has no config_key; fix: set it to its ILMIL.DISTILL section")
        terms[cls.config_key] = cls
    return terms
