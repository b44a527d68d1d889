"""Expanding a trained detector from K old classes to K+N (the student's start).

Which classifier a state dict holds is told by its keys:

* Faster R-CNN (``roi_heads.box_predictor``): detectron2's ``FastRCNNOutputLayers``
  keeps background as the LAST logit of ``cls_score``. Expansion copies old rows
  0..K-1, moves the old background row K to the new last row K+N, and keeps the
  student's own fresh initialisation (std 0.01 / 0.001) for the N new rows;
  class-specific ``bbox_pred`` rows 0..4K-1 are copied.
* RetinaNet, FCOS and YOLO (``head.cls_score``; YOLO: ``head.cls_score.<level>``, a
  sigmoid classifier without background): the classification conv has A*K output
  channels for A anchors per location (FCOS: A = 1), read as channel a*K + k for
  anchor a, class k (detectron2's layout, which YOLO's head keeps). K+N
  classes therefore put N new channels after each anchor's K: old channel a*K + k
  goes to a*(K+N) + k, and channels a*(K+N) + K .. a*(K+N) + K+N-1 keep the
  student's fresh initialisation (weights std 0.01, bias -log((1-p)/p) for the
  prior probability p, ``MODEL.RETINANET.PRIOR_PROB`` / ``MODEL.FCOS.PRIOR_PROB`` /
  ``MODEL.YOLO.PRIOR_PROB``), so each new class starts at score p everywhere. The box
  (and FCOS centerness, YOLO objectness) outputs are class-agnostic and copied as they are.

Every other parameter is copied as is, so before any training the student's
old-class logits and boxes equal the teacher's (a dense head's sigmoid scores too;
Faster R-CNN's softmax spreads over the new classes as well, so its old-class
scores shrink by a common factor); only the old student's
distillation state (its layer weights' running average) is left out, as it
belongs to the old model's own stage.
"""
import logging

import torch

from ..checkpoint import DISTILLATION_STATE_PREFIXES, dense_classifiers, state_dict_num_classes

__all__ = ["expand_predictor_state_dict", "load_expanded"]

logger = logging.getLogger(__name__)

_CLS = "roi_heads.box_predictor.cls_score"
_BOX = "roi_heads.box_predictor.bbox_pred"


def expand_predictor_state_dict(old_state, new_state, num_old):
    """Merge ``old_state`` (K = ``num_old`` classes) into ``new_state`` (K+N classes).

    Returns a new state dict with ``new_state``'s shapes; neither input is modified.
    """
    dense = [] if f"{_CLS}.weight" in old_state else dense_classifiers(old_state)
    classifier = tuple(cls_score for cls_score, _ in dense) if dense else (_CLS, _BOX)
    merged = {k: v.clone() for k, v in new_state.items()}
    for key, value in old_state.items():
        # The classifiers are expanded below; the old model's distillation state belongs to its own
        # stage: the student's starts afresh.
        if key.startswith(classifier + DISTILLATION_STATE_PREFIXES):
            continue
        if key in merged and merged[key].shape != value.shape:
            raise ValueError(f"cannot expand: {key} has shape {tuple(value.shape)} in the old model "
                             f"but {tuple(merged[key].shape)} in the new one")
        merged[key] = value.clone()
    found = state_dict_num_classes(old_state)
    if found != num_old:
        raise ValueError(f"the old model has {found} classes, the schedule says {num_old}")
    for suffix in ("weight", "bias"):
        if dense:
            for cls_score, bbox_pred in dense:
                _expand_dense_classifier(old_state[f"{cls_score}.{suffix}"], merged[f"{cls_score}.{suffix}"],
                                         old_state[f"{bbox_pred}.weight"].shape[0] // 4, num_old)
            continue
        old_cls, new_cls = old_state[f"{_CLS}.{suffix}"], merged[f"{_CLS}.{suffix}"]
        new_cls[:num_old] = old_cls[:num_old]
        new_cls[-1] = old_cls[num_old]  # background stays the last logit
        old_box, new_box = old_state[f"{_BOX}.{suffix}"], merged[f"{_BOX}.{suffix}"]
        if old_box.shape[0] == new_box.shape[0]:  # class-agnostic regression: 4 rows
            new_box.copy_(old_box)
        else:
            new_box[: 4 * num_old] = old_box[: 4 * num_old]
    return merged


def _expand_dense_classifier(old, new, num_anchors, num_old):
    """Copy, in place, anchor a's old rows (a*K .. a*K+K-1 of ``old``) to the first K
    of its rows in ``new`` (a*(K+N) ..); each anchor's last N rows stay as they are."""
    old_rows = old.reshape(num_anchors, num_old, *old.shape[1:])
    new.view(num_anchors, new.shape[0] // num_anchors, *new.shape[1:])[:, :num_old] = old_rows


@torch.no_grad()
def load_expanded(model, old_state, num_old):
    """Load an old model's weights into ``model``, expanding its classifier."""
    model.load_state_dict(expand_predictor_state_dict(old_state, model.state_dict(), num_old))
    logger.info("Student initialised from a %d-class model (classifier expanded)", num_old)
    return model
