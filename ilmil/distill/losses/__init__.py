"""The registered distillation losses (imported here so that they register themselves)."""
from .attention import AttentionTransfer, attention_map
from .dense_head import DenseHeadDistillation
from .feature import FEATURE_DISTANCES, LAYER_WEIGHTINGS, FeatureDistillation, feature_connectors
from .fgfi import FGFIImitation
from .information_map import INFORMATION_WEIGHTINGS, InformationMapDistillation, teacher_object_maps
from .rcn import RCN_LOGITS, RCNDistillation, old_class_logits
from .relation import FSPRelation, fsp_matrix
from .review import KnowledgeReview, pyramid_distance
from .rpn import RPNDistillation

__all__ = ["FEATURE_DISTANCES", "INFORMATION_WEIGHTINGS", "LAYER_WEIGHTINGS", "RCN_LOGITS", "AttentionTransfer",
           "DenseHeadDistillation", "FGFIImitation", "FSPRelation", "FeatureDistillation",
           "InformationMapDistillation", "KnowledgeReview", "RCNDistillation", "RPNDistillation", "attention_map",
           "feature_connectors", "fsp_matrix", "old_class_logits", "pyramid_distance", "teacher_object_maps"]
