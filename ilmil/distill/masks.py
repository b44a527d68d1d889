"""Where on a feature map the objects are: masks for masked, decoupled and weighted losses.

Both masks are [N, H, W] of 0/1 for a level of stride s, built from the context's
GT boxes (pseudo-labels included):

- ``gt_box_mask``: a location (cell centre ((x + 0.5) s, (y + 0.5) s)) is 1 when it
  lies inside any GT box of its image;
- ``fgfi_mask`` (Wang et al. 2019, fine-grained feature imitation): a location is 1
  when one of its anchors has IoU > psi x (the best IoU of some GT box over all
  anchors of every level) with that box; psi = 0.5.
"""
import torch

from detectron2.structures import pairwise_iou

__all__ = ["fgfi_mask", "gt_box_mask"]


def gt_box_mask(gt_instances, size, stride):
    """[N, H, W] mask of the cells of a level of ``size`` (H, W) and ``stride`` inside a GT box."""
    height, width = size
    device = gt_instances[0].gt_boxes.device if gt_instances else "cpu"
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) * stride
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) * stride
    masks = []
    for inst in gt_instances:
        boxes = inst.gt_boxes.tensor
        if len(boxes) == 0:
            masks.append(torch.zeros(height, width, device=device))
            continue
        inside_y = (ys[None, :] >= boxes[:, 1:2]) & (ys[None, :] <= boxes[:, 3:4])  # [B, H]
        inside_x = (xs[None, :] >= boxes[:, 0:1]) & (xs[None, :] <= boxes[:, 2:3])  # [B, W]
        masks.append((inside_y[:, :, None] & inside_x[:, None, :]).any(dim=0).float())
    return torch.stack(masks)


def fgfi_mask(gt_instances, anchors, sizes, psi=0.5):
    """``{level: [N, H, W] mask}`` of FGFI's near-object anchor locations.

    Args:
        anchors: {level: Boxes of its H * W * A anchors, in detectron2's order (position-major)}.
        sizes: {level: (H, W)}.
    """
    levels = list(anchors)
    counts = [len(anchors[level]) for level in levels]
    all_anchors = anchors[levels[0]].cat([anchors[level] for level in levels])
    masks = {level: [] for level in levels}
    for inst in gt_instances:
        if len(inst) == 0:
            near = torch.zeros(len(all_anchors), dtype=torch.bool, device=all_anchors.device)
        else:
            iou = pairwise_iou(inst.gt_boxes, all_anchors)  # [B, all anchors]
            near = (iou > psi * iou.max(dim=1, keepdim=True).values).any(dim=0)
        for level, part in zip(levels, near.split(counts)):
            height, width = sizes[level]
            masks[level].append(part.view(height, width, -1).any(dim=2).float())
    return {level: torch.stack(m) for level, m in masks.items()}
