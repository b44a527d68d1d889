"""Expanding a trained detector from K old classes to K+N (the student's start).

detectron2's ``FastRCNNOutputLayers`` keeps background as the LAST logit of
``cls_score``. Expansion therefore copies old rows 0..K-1, moves the old
background row K to the new last row K+N, and keeps the student's own fresh
initialisation (std 0.01 / 0.001) for the N new rows; class-specific
``bbox_pred`` rows 0..4K-1 are copied. Every other parameter is copied as is, so
before any training the student's old-class scores and boxes equal the teacher's;
only the old student's distillation state (its layer weights' running average) is
left out, as it belongs to the old model's own stage.
"""
import logging

import torch

from ..checkpoint import DISTILLATION_STATE_PREFIXES

__all__ = ["expand_predictor_state_dict", "load_expanded"]

logger = logging.getLogger(__name__)

_CLS = "roi_heads.box_predictor.cls_score"
_BOX = "roi_heads.box_predictor.bbox_pred"


def expand_predictor_state_dict(old_state, new_state, num_old):
    """Merge ``old_state`` (K = ``num_old`` classes) into ``new_state`` (K+N classes).

    Returns a new state dict with ``new_state``'s shapes; neither input is modified.
    """
    merged = {k: v.clone() for k, v in new_state.items()}
    for key, value in old_state.items():
        # The old model's distillation state belongs to its own stage: the student's starts afresh.
        if key.startswith((_CLS, _BOX) + DISTILLATION_STATE_PREFIXES):
            continue
        if key in merged and merged[key].shape != value.shape:
            raise ValueError(f"cannot expand: {key} has shape {tuple(value.shape)} in the old model "
                             f"but {tuple(merged[key].shape)} in the new one")
        merged[key] = value.clone()
    for suffix in ("weight", "bias"):
        old_cls, new_cls = old_state[f"{_CLS}.{suffix}"], merged[f"{_CLS}.{suffix}"]
        if old_cls.shape[0] != num_old + 1:
            raise ValueError(
                f"the old model has {old_cls.shape[0] - 1} classes, the schedule says {num_old}"
            )
        new_cls[:num_old] = old_cls[:num_old]
        new_cls[-1] = old_cls[num_old]  # background stays the last logit
        old_box, new_box = old_state[f"{_BOX}.{suffix}"], merged[f"{_BOX}.{suffix}"]
        if old_box.shape[0] == new_box.shape[0]:  # class-agnostic regression: 4 rows
            new_box.copy_(old_box)
        else:
            new_box[: 4 * num_old] = old_box[: 4 * num_old]
    return merged


@torch.no_grad()
def load_expanded(model, old_state, num_old):
    """Load an old model's weights into ``model``, expanding its box predictor."""
    model.load_state_dict(expand_predictor_state_dict(old_state, model.state_dict(), num_old))
    logger.info("Student initialised from a %d-class model (box predictor expanded)", num_old)
    return model
