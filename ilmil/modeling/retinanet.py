"""detectron2's RetinaNet with a choice of anchor assignment (``MODEL.RETINANET.ASSIGNER``).

``"iou"`` is detectron2's: an anchor is foreground when its IoU with a GT box reaches
``IOU_THRESHOLDS[1]``, background below ``IOU_THRESHOLDS[0]``.

``"atss"`` is adaptive training sample selection (Zhang et al., "Bridging the Gap Between
Anchor-based and Anchor-free Detection via Adaptive Training Sample Selection", CVPR
2020). Per GT box:

1. candidates: on every level, the ``ATSS_TOPK`` anchors whose centres are nearest the
   box's centre;
2. threshold: the mean plus the standard deviation of the candidates' IoUs with the box;
3. positives: candidates whose IoU reaches the threshold and whose centre lies inside
   the box; an anchor positive for several boxes goes to the one it overlaps most.

Everything else is background (nothing is ignored). Losses, box coding and inference
stay detectron2's; only ``label_anchors`` changes.

What it changes is how many feature locations learn each object. On one square anchor
per location its 9 candidates per level are 9 locations, and an object of the shapes
data is positive at 6.8 of them; the IoU rule on detectron2's 9 anchors per location
made it positive at 1.7, and that RetinaNet learned at half FCOS's pace or less
(FCOS's centre sampling: 8.1). On 9 anchors per location ATSS changes little: its
candidates are then the 9 shapes of one or two locations.
"""
import torch

from detectron2.config import configurable
from detectron2.modeling.meta_arch import retinanet
from detectron2.structures import Boxes, pairwise_iou

from ..config import ConfigError, check_choice

__all__ = ["RetinaNet", "atss_assignment"]

ASSIGNERS = ("iou", "atss")


def atss_assignment(anchors_per_level, gt_boxes, topk):
    """ATSS (module docstring) for one image.

    Args:
        anchors_per_level (list[Boxes]): the anchors of each level, in detectron2's order.
        gt_boxes (Boxes): the image's G GT boxes.
        topk (int): candidates per level and GT box.

    Returns:
        (matched_idxs, is_foreground): for each of the R anchors of all levels, the index
        of its GT box (0 where it has none) and whether it is foreground.
    """
    anchors = Boxes.cat(anchors_per_level)
    num_anchors = len(anchors)
    if len(gt_boxes) == 0:
        zeros = torch.zeros(num_anchors, dtype=torch.long, device=anchors.device)
        return zeros, zeros.bool()
    anchor_centers = anchors.get_centers()
    gt_centers = gt_boxes.get_centers()
    distances = torch.cdist(gt_centers, anchor_centers)  # G x R
    candidates, start = [], 0
    for level in anchors_per_level:
        end = start + len(level)
        k = min(topk, len(level))
        candidates.append(distances[:, start:end].topk(k, dim=1, largest=False).indices + start)
        start = end
    candidates = torch.cat(candidates, dim=1)  # G x (k * levels)
    ious = pairwise_iou(gt_boxes, anchors)  # G x R
    candidate_ious = ious.gather(1, candidates)
    # One candidate (ATSS_TOPK 1 on one level) has no spread: its own IoU is the threshold.
    spread = candidate_ious.std(dim=1) if candidate_ious.shape[1] > 1 else torch.zeros_like(candidate_ious[:, 0])
    threshold = candidate_ious.mean(dim=1) + spread
    centers = anchor_centers[candidates]  # G x C x 2
    box = gt_boxes.tensor[:, None, :]
    inside = ((centers[..., 0] > box[..., 0]) & (centers[..., 0] < box[..., 2])
              & (centers[..., 1] > box[..., 1]) & (centers[..., 1] < box[..., 3]))
    positive = (candidate_ious >= threshold[:, None]) & inside
    # Each anchor's IoU with the boxes that chose it; -1 elsewhere, so the max picks the
    # box it overlaps most among those, and -1 means background.
    chosen = torch.full_like(ious, -1.0)
    chosen.scatter_(1, candidates, torch.where(positive, candidate_ious, torch.full_like(candidate_ious, -1.0)))
    best_iou, matched_idxs = chosen.max(dim=0)
    return matched_idxs, best_iou >= 0


class RetinaNet(retinanet.RetinaNet):
    """detectron2's RetinaNet, its anchors assigned by ``MODEL.RETINANET.ASSIGNER`` (not
    registered itself: ``IncrementalRetinaNet`` is the meta-architecture built from it)."""

    @configurable
    def __init__(self, *, assigner="iou", atss_topk=9, **kwargs):
        """``assigner``: ``"iou"`` (detectron2's) or ``"atss"``; ``atss_topk``: ATSS's
        candidates per level; the rest: detectron2's ``RetinaNet``'s arguments."""
        super().__init__(**kwargs)
        self.assigner = assigner
        self.atss_topk = atss_topk

    @classmethod
    def from_config(cls, cfg):
        c = cfg.MODEL.RETINANET
        check_choice("MODEL.RETINANET.ASSIGNER", c.ASSIGNER, ASSIGNERS)
        if c.ATSS_TOPK < 1:
            raise ConfigError(f"MODEL.RETINANET.ATSS_TOPK is {c.ATSS_TOPK}; fix: a positive number of candidates")
        return {**super().from_config(cfg), "assigner": c.ASSIGNER, "atss_topk": c.ATSS_TOPK}

    @torch.no_grad()
    def label_anchors(self, anchors, gt_instances):
        """detectron2's labels (class index, ``num_classes`` for background) and matched
        boxes per image, by the configured assigner."""
        if self.assigner == "iou":
            return super().label_anchors(anchors, gt_instances)
        gt_labels, matched_gt_boxes = [], []
        for gt in gt_instances:
            matched_idxs, foreground = atss_assignment(anchors, gt.gt_boxes, self.atss_topk)
            if len(gt) > 0:
                labels = gt.gt_classes[matched_idxs].clone()
                boxes = gt.gt_boxes.tensor[matched_idxs]
            else:
                labels = torch.zeros_like(matched_idxs)
                boxes = torch.zeros(len(matched_idxs), 4, device=matched_idxs.device)
            labels[~foreground] = self.num_classes
            gt_labels.append(labels)
            matched_gt_boxes.append(boxes)
        return gt_labels, matched_gt_boxes
