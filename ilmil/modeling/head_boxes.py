"""Boxes, in input pixels, of a one-stage head's box outputs.

A dense head's box outputs are deltas from its anchors, and their scale differs
between detectors: RetinaNet's are centre offsets in anchor sizes and log size
ratios (about 0-1), FCOS's the distances to the box sides in strides (1-8 on
shapes), YOLO's cell offsets and log anchor multiples. A loss that compares two
heads' boxes with one formula on every detector compares them decoded.
"""
from detectron2.layers import cat
from detectron2.modeling.meta_arch.dense_detector import permute_to_N_HWA_K
from detectron2.structures import Boxes

__all__ = ["decode_head_boxes", "flatten_levels", "head_anchor_boxes"]


def flatten_levels(levels, channels_per_anchor):
    """Per-level [N, A C, H, W] head outputs -> [N, P, C] over the P anchors of every level,
    position-major (index (i W + j) A + a), as detectron2 flattens dense outputs."""
    return cat([permute_to_N_HWA_K(x, channels_per_anchor) for x in levels], dim=1)


def head_anchor_boxes(detector, maps):
    """Per level, the ``Boxes`` of a dense ``detector``'s anchors on maps of the sizes of
    ``maps``, position-major: its own ``level_anchors`` where it has them (YOLO), else its
    ``anchor_generator``'s (which reads only the maps' sizes and device)."""
    own = getattr(detector, "level_anchors", None)
    if own is not None:
        return [Boxes(anchors) for anchors in own(maps)]
    return detector.anchor_generator(maps)


def decode_head_boxes(detector, box_levels):
    """[N, P, 4] XYXY boxes of a dense head's per-level box outputs ``box_levels``, at the
    ``detector``'s anchors of those map sizes: its own ``decode_head_boxes`` where it has one
    (YOLO), else its ``box2box_transform`` at its ``anchor_generator``'s anchors (detectron2's
    RetinaNet and FCOS, and ilmil's)."""
    own = getattr(detector, "decode_head_boxes", None)
    if own is not None:
        return own(box_levels)
    deltas = flatten_levels(box_levels, 4)
    anchors = Boxes.cat(head_anchor_boxes(detector, box_levels)).tensor
    num_images, num_anchors = deltas.shape[:2]
    boxes = detector.box2box_transform.apply_deltas(deltas.reshape(-1, 4), anchors.repeat(num_images, 1))
    return boxes.view(num_images, num_anchors, 4)
