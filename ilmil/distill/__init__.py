"""Distillation for detectron2 detectors: the teacher (teacher.py), what is recorded
of both models (recorder.py), connectors between their widths (connectors.py), the
loss registry and its terms (registry.py, losses/), their weighted sum (distiller.py),
and the students that use them (student.py; rcnn.py: ``IncrementalRCNN``; dense.py:
``IncrementalRetinaNet``, ``IncrementalFCOS``, ``IncrementalYOLOV3``, registered meta-architectures)."""
from detectron2.modeling import build_model

from ..config import ConfigError, check_choice, check_value, derived_cfg
from .connectors import CONNECTOR_REGISTRY, AttentionFusion, build_connector, match_size
from .distiller import DISTILLER_PREFIX, TERM_WEIGHTINGS, Distiller, build_distiller, enabled_terms
from .losses import (
    FEATURE_DISTANCES,
    LAYER_WEIGHTINGS,
    RCN_LOGITS,
    AttentionTransfer,
    DenseHeadDistillation,
    FGFIImitation,
    FSPRelation,
    FeatureDistillation,
    KnowledgeReview,
    RCNDistillation,
    RPNDistillation,
    feature_connectors,
    old_class_logits,
    pyramid_distance,
)
from .dense import DenseStudent, IncrementalFCOS, IncrementalRetinaNet, IncrementalYOLOV3
from .rcnn import IncrementalRCNN
from .recorder import Recorder, feature_shapes, recordable_names
from .registry import DISTILL_LOSS_REGISTRY, DistillContext, DistillLoss, registered_terms
from .student import DistillationStudent, is_student_architecture
from .teacher import (TEACHER_PRECISIONS, FrozenTeacher, build_teacher, detector_architecture, fold_batchnorm,
                      teacher_cfg)

__all__ = [
    "AttentionFusion",
    "AttentionTransfer",
    "CONNECTOR_REGISTRY",
    "DISTILLER_PREFIX",
    "DISTILL_LOSS_REGISTRY",
    "FEATURE_DISTANCES",
    "LAYER_WEIGHTINGS",
    "RCN_LOGITS",
    "TEACHER_PRECISIONS",
    "TERM_WEIGHTINGS",
    "DenseHeadDistillation",
    "DenseStudent",
    "DistillContext",
    "DistillationStudent",
    "DistillLoss",
    "Distiller",
    "FGFIImitation",
    "FSPRelation",
    "FeatureDistillation",
    "FrozenTeacher",
    "IncrementalFCOS",
    "IncrementalYOLOV3",
    "IncrementalRCNN",
    "IncrementalRetinaNet",
    "KnowledgeReview",
    "RCNDistillation",
    "RPNDistillation",
    "Recorder",
    "build_connector",
    "build_distiller",
    "build_teacher",
    "check_distill_config",
    "enabled_terms",
    "feature_connectors",
    "feature_shapes",
    "is_student_architecture",
    "fold_batchnorm",
    "match_size",
    "old_class_logits",
    "pyramid_distance",
    "recordable_names",
    "registered_terms",
    "teacher_cfg",
]


def check_distill_config(cfg):
    """Refuse, before any work, what would stop a distilled stage when it starts: an
    unknown choice, an enabled section no loss claims, a layer the models lack, widths
    that differ without a connector. The terms are built on untrained models of the
    student's config and of the teacher's (its own config file, else the student's)."""
    d = cfg.ILMIL.DISTILL
    check_choice("ILMIL.TEACHER.PRECISION", cfg.ILMIL.TEACHER.PRECISION, TEACHER_PRECISIONS)
    check_choice("ILMIL.DISTILL.TERM_WEIGHTS", d.TERM_WEIGHTS, TERM_WEIGHTINGS)
    check_choice("ILMIL.DISTILL.DETECTION_WEIGHT", d.DETECTION_WEIGHT, TERM_WEIGHTINGS)
    if d.CONNECTOR:
        check_choice("ILMIL.DISTILL.CONNECTOR", d.CONNECTOR, [name for name, _ in CONNECTOR_REGISTRY])
    iou = cfg.ILMIL.PSEUDO_LABELS.CROSS_CLASS_IOU
    check_value("ILMIL.PSEUDO_LABELS.CROSS_CLASS_IOU", iou, 0 < iou <= 1, "in (0, 1]", 0.7)
    for section, loss_class in registered_terms().items():
        if section in d:
            weight = d[section].WEIGHT
            check_value(f"ILMIL.DISTILL.{section}.WEIGHT", weight, weight >= 0, "at least 0", 1.0)
            if weight == 0 and d[section].ENABLED:
                # It would still run (its teacher too) for nothing, and a learned weight
                # (TERM_WEIGHTS uncertainty) on a zero term only ever falls.
                raise ConfigError(f"ILMIL.DISTILL.{section}.WEIGHT 0 with ILMIL.DISTILL.{section}.ENABLED True: the term "
                                  f"would run for nothing; fix: ILMIL.DISTILL.{section}.ENABLED False to switch it off")
            loss_class(cfg)  # its keys' values, whether or not the term is on: a typo is not silently kept
    if not enabled_terms(cfg):
        if d.DETECTION_WEIGHT == "uncertainty":  # weighs the detection loss against terms: none, so none learned
            raise ConfigError("ILMIL.DISTILL.DETECTION_WEIGHT uncertainty with no distillation term enabled: there "
                              "is nothing to weigh the detection loss against; fix: enable a term "
                              "(ILMIL.DISTILL.<TERM>.ENABLED True) or ILMIL.DISTILL.DETECTION_WEIGHT fixed")
        return
    student = _plain_detector(cfg)
    if d.RCN.ENABLED and not hasattr(student, "roi_heads"):
        raise ConfigError(f"ILMIL.DISTILL.RCN.ENABLED True: the RCN term distils a box head on proposals, which "
                          f"{cfg.MODEL.META_ARCHITECTURE} has not; fix: set it False (a one-stage head's outputs: "
                          "ILMIL.DISTILL.DENSE)")
    teacher = _plain_detector(teacher_cfg(cfg, cfg.MODEL.ROI_HEADS.NUM_CLASSES))
    teacher_file = cfg.ILMIL.TEACHER.CONFIG_FILE or "(the student's)"
    for section in ("DENSE", "RPN"):
        # These terms compare the heads' outputs anchor by anchor.
        ours, theirs = _anchors_per_location(student, section), _anchors_per_location(teacher, section)
        if d[section].ENABLED and None not in (ours, theirs) and ours != theirs:
            raise ConfigError(f"ILMIL.DISTILL.{section}.ENABLED True: the student's head has {ours} anchors per "
                              f"location (level by level), the teacher's of ILMIL.TEACHER.CONFIG_FILE {teacher_file} "
                              f"{theirs}, and the term compares them anchor by anchor; fix: give both the same "
                              "anchors (MODEL.ANCHOR_GENERATOR, MODEL.YOLO.ANCHORS), or switch the term off")
    distiller = build_distiller(cfg, feature_shapes(student.backbone), feature_shapes(teacher.backbone))
    for section, loss in distiller.terms.items():
        section = section.upper()
        key = f"ILMIL.DISTILL.{section}" + (".LAYERS" if "LAYERS" in d[section] else "")
        Recorder(student, loss.records(), key).remove()
        Recorder(teacher, loss.records(), f"{key}, in the teacher of ILMIL.TEACHER.CONFIG_FILE {teacher_file}").remove()


def _anchors_per_location(model, section):
    """The anchors per feature location, level by level, of the head ``section`` distils
    (RPN: the proposal generator's); None where the model has no anchors there."""
    owner = getattr(model, "proposal_generator", None) if section == "RPN" else model
    generator = getattr(owner, "anchor_generator", None)
    if generator is not None:
        return list(generator.num_anchors)
    anchors = getattr(owner, "anchors", None)  # YOLO's, per level
    return None if anchors is None else [len(level) for level in anchors]


def _plain_detector(cfg):
    """An untrained detector of ``cfg``'s architecture, without a teacher of its own."""
    plain = detector_architecture(cfg.MODEL.META_ARCHITECTURE)
    return build_model(derived_cfg(cfg, {"MODEL.META_ARCHITECTURE": plain, "MODEL.DEVICE": "cpu"}))
