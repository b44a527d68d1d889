"""The registered distillation losses (imported here so that they register themselves)."""
from .dense_head import DenseHeadDistillation
from .feature import FEATURE_DISTANCES, LAYER_WEIGHTINGS, FeatureDistillation
from .fgfi import FGFIImitation
from .rcn import RCN_LOGITS, RCNDistillation, old_class_logits
from .rpn import RPNDistillation

__all__ = ["FEATURE_DISTANCES", "LAYER_WEIGHTINGS", "RCN_LOGITS", "DenseHeadDistillation", "FGFIImitation",
           "FeatureDistillation", "RCNDistillation", "RPNDistillation", "old_class_logits"]
