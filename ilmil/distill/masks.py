"""Where on a feature map the objects are: masks for masked, decoupled and weighted losses.

The first two masks are [N, H, W] of 0/1 for a level of stride s, built from the context's
GT boxes (pseudo-labels included):

- ``gt_box_mask``: a location (cell centre ((x + 0.5) s, (y + 0.5) s)) is 1 when it
  lies inside any GT box of its image;
- ``fgfi_mask`` (Wang et al. 2019, fine-grained feature imitation): a location is 1
  when one of its anchors has IoU > psi x (the best IoU of some GT box over all
  anchors of every level) with that box; psi = 0.5.

``gaussian_box_mask`` is a soft GT mask in [0, 1]: highest at the box centres.
"""
import torch

from detectron2.structures import pairwise_iou

__all__ = ["fgfi_mask", "gaussian_box_mask", "gt_box_mask"]


def _per_image_masks(gt_instances, size, stride, box_masks):
    """[N, H, W]: per image, ``box_masks(boxes, ys, xs)`` ([B, H, W]) maxed over its boxes,
    ys / xs the cell centres ((k + 0.5) * stride) of a level of ``size``; 0 without boxes."""
    height, width = size
    device = gt_instances[0].gt_boxes.device if gt_instances else "cpu"
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) * stride
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) * stride
    masks = []
    for inst in gt_instances:
        boxes = inst.gt_boxes.tensor
        if len(boxes) == 0:
            masks.append(torch.zeros(height, width, device=device))
        else:
            masks.append(box_masks(boxes, ys, xs).max(dim=0).values)
    return torch.stack(masks)


def gt_box_mask(gt_instances, size, stride):
    """[N, H, W] mask of the cells of a level of ``size`` (H, W) and ``stride`` inside a GT box."""

    def inside(boxes, ys, xs):
        inside_y = (ys[None, :] >= boxes[:, 1:2]) & (ys[None, :] <= boxes[:, 3:4])  # [B, H]
        inside_x = (xs[None, :] >= boxes[:, 0:1]) & (xs[None, :] <= boxes[:, 2:3])  # [B, W]
        return (inside_y[:, :, None] & inside_x[:, None, :]).float()

    return _per_image_masks(gt_instances, size, stride, inside)


def fgfi_mask(gt_instances, anchors, sizes, psi=0.5):
    """``{level: [N, H, W] mask}`` of FGFI's near-object anchor locations on the levels of
    ``sizes``; a box's best IoU is taken over the anchors of every level of ``anchors``.

    Args:
        anchors: {level: Boxes of its H * W * A anchors, in detectron2's order (position-major)}.
        sizes: {level: (H, W)} of the levels to mask, a subset of ``anchors``'.
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
            if level in sizes:
                height, width = sizes[level]
                masks[level].append(part.view(height, width, -1).any(dim=2).float())
    return {level: torch.stack(masks[level]) for level in sizes}


def gaussian_box_mask(gt_instances, size, stride):
    """[N, H, W] soft GT mask of a level: per box, exp(-(dx^2 / (2 sx^2) + dy^2 / (2 sy^2)))
    at the cell centres inside it (dx, dy from the box centre, sx, sy half its width and
    height: 1 at the centre, exp(-1/2) at the middle of an edge), 0 outside; the max over boxes."""

    def gaussian(boxes, ys, xs):
        centre = (boxes[:, :2] + boxes[:, 2:]) / 2
        half = ((boxes[:, 2:] - boxes[:, :2]) / 2).clamp(min=1e-3)
        dx = (xs[None, :] - centre[:, 0:1]) / half[:, 0:1]  # [B, W], in half-widths
        dy = (ys[None, :] - centre[:, 1:2]) / half[:, 1:2]  # [B, H]
        inside = (dy.abs() <= 1)[:, :, None] & (dx.abs() <= 1)[:, None, :]
        return torch.exp(-(dy[:, :, None] ** 2 + dx[:, None, :] ** 2) / 2) * inside

    return _per_image_masks(gt_instances, size, stride, gaussian)
