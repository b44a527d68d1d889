"""A YOLOv3-style detector (Redmon & Farhadi, "YOLOv3: An Incremental Improvement",
2018) registered in detectron2, built from ``MODEL.YOLO`` (``add_yolo_config``).

* Backbones (``MODEL.BACKBONE.NAME``): ``build_darknet_backbone``, Darknet-53 (a
  stem, then five stride-2 stages of 1, 2, 8, 8, 4 residual blocks; BN + LeakyReLU
  0.1) under YOLOv3's neck; ``build_darknet_tiny_backbone``, YOLOv3-tiny's plain
  conv / max-pool stack under a neck of one conv per level, two levels (strides 16,
  32) as YOLOv3-tiny or three (8-32, as YOLOv3-tiny-3l). ``MODEL.YOLO.WIDTH_MULTIPLIER``
  scales every width (rounded to multiples of 8), ``DEPTH_MULTIPLIER`` every stage's
  block count (at least 1), so a teacher trains on a CPU.
* The neck is top-down, coarse to fine: each level's block (alternating 1x1 and 3x3
  convs) reads the backbone map, or, below the coarsest, the backbone map
  concatenated with the 2x upsampled (1x1-reduced) coarser level. The backbone
  maps are ``dark3..dark5`` (strides 8-32), the neck's ``p3..p5`` (tiny: ``dark4,
  dark5`` and ``p4, p5``); the recorder reads both, so distillation terms can name
  backbone and neck layers.
* The head has, per level, a 3x3 conv and three 1x1 outputs for its A anchors:
  ``cls_score`` (A K class logits, anchor a's class k at channel a K + k, as
  RetinaNet), ``bbox_pred`` (A 4: t_x, t_y, t_w, t_h) and ``objectness`` (A).
  Class and objectness biases start at -log((1-p)/p), p = ``PRIOR_PROB``. With
  ``CLASS_CONV`` the class logits read a 3x3 conv of their own (``cls_convs``).
* Anchors: ``MODEL.YOLO.ANCHORS``, per level (finest first) a list of [w, h] in
  input pixels; empty, they are computed at the start of a run by k-means over the
  training boxes (ilmil/modeling/anchor_kmeans.py) and recorded in its config.yaml.

Box decoding, for the anchor (w_a, h_a) of cell (i, j) on a level of stride s:
x = (j + sigma(t_x)) s, y = (i + sigma(t_y)) s, w = w_a exp(t_w), h = h_a exp(t_h).

Training (per batch of N images): every GT box is assigned to the anchor of best
width/height IoU over all levels, and to every other anchor whose IoU with it
exceeds ``MATCH_IOU_THRESH``, in the cell holding its centre. With
``NEIGHBOUR_CELLS`` (YOLOv5's assignment), the same anchors of the two adjacent
cells nearest the centre (left or right, above or below) are trained too, and the
centre decodes as x = (j + 2 sigma(t_x) - 0.5) s (same for y), so that a neighbour
cell's prediction can reach it: about 6 feature locations per object on shapes
instead of 2 (FCOS: 8), though at 400 iterations it did not speed up the classifier
(BENCHMARKS.md). Then

    loss_box = BOX_WEIGHT N mean_pos (1 - GIoU(decoded box, GT))      (GIoU, not YOLOv3's xy-BCE + wh-L2:
                                                                        one term, scale-free)
    loss_cls = CLS_WEIGHT N mean_{pos, k} BCE(z_k, onehot_k)               (CLASS_LOSS bce)
             = CLS_WEIGHT N sum_{every anchor, k} FL(z_k, onehot_k) / n_pos  (CLASS_LOSS focal)
    loss_obj = OBJ_WEIGHT N sum_l balance_l mean_l BCE(o, 1[pos])

with FL the sigmoid focal loss (``FOCAL_LOSS_ALPHA``, ``FOCAL_LOSS_GAMMA``; the one-hot is zero
away from the positives), n_pos the batch's positive anchors (at least 1), and where the
objectness mean of level l leaves out the negatives whose decoded box overlaps some GT at
IoU > ``IGNORE_THRESH`` (YOLOv3's ignored predictions), and balance_l
(``OBJ_LEVEL_WEIGHTS``) weighs finer levels more, as they hold more cells.
Inference: score = sigma(o) sigma(z_k), then the usual dense-detector filtering
(score threshold, top-k per level, per-class NMS, ``TEST.DETECTIONS_PER_IMAGE``).
"""
import functools
import math

import torch
import torch.nn.functional as F
from fvcore.nn import giou_loss, sigmoid_focal_loss
from torch import nn

from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, batched_nms, cat, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY, Backbone
from detectron2.modeling.meta_arch.dense_detector import DenseDetector
from detectron2.structures import Boxes, Instances, pairwise_iou

from ..config import ConfigError, check_choice
from .head_boxes import flatten_levels

__all__ = ["YOLOV3", "YOLOHead", "level_anchor_boxes", "build_darknet_backbone", "build_darknet_tiny_backbone"]

# Darknet-53: (output width, residual blocks) of each stride-2 stage.
DARKNET53_STAGES = ((64, 1), (128, 2), (256, 8), (512, 8), (1024, 4))
# YOLOv3-tiny: the widths of its conv + 2x2 max-pool stages (stride 2 .. 32 after each pool).
TINY_WIDTHS = (16, 32, 64, 128, 256, 512)
CLASS_LOSSES = ("bce", "focal")


def _width(channels, multiplier):
    return max(8, int(round(channels * multiplier / 8)) * 8)


def conv_bn_leaky(in_channels, out_channels, kernel_size, stride=1, norm="BN"):
    """YOLO's conv unit: conv, BatchNorm, LeakyReLU 0.1."""
    return Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2,
                  bias=not norm, norm=get_norm(norm, out_channels),
                  activation=functools.partial(F.leaky_relu, negative_slope=0.1))


class DarknetResidual(nn.Module):
    """x + conv3x3(conv1x1(x)), the 1x1 halving the width."""

    def __init__(self, channels, norm):
        super().__init__()
        self.conv1 = conv_bn_leaky(channels, channels // 2, 1, norm=norm)
        self.conv2 = conv_bn_leaky(channels // 2, channels, 3, norm=norm)

    def forward(self, x):
        return x + self.conv2(self.conv1(x))


class Darknet53(Backbone):
    """Darknet-53 (width and depth scaled); outputs ``dark1..dark5`` (strides 2..32)."""

    def __init__(self, width=1.0, depth=1.0, norm="BN", out_features=("dark3", "dark4", "dark5")):
        super().__init__()
        channels = _width(32, width)
        self.stem = conv_bn_leaky(3, channels, 3, norm=norm)
        self._out_feature_channels, self._out_feature_strides = {}, {}
        self.stage_names = []
        for index, (out, blocks) in enumerate(DARKNET53_STAGES, start=1):
            out = _width(out, width)
            layers = [conv_bn_leaky(channels, out, 3, stride=2, norm=norm)]
            layers += [DarknetResidual(out, norm) for _ in range(max(1, round(blocks * depth)))]
            name = f"dark{index}"
            self.add_module(name, nn.Sequential(*layers))
            self.stage_names.append(name)
            self._out_feature_channels[name], self._out_feature_strides[name] = out, 2 ** index
            channels = out
        self._out_features = _check_out_features(out_features, self.stage_names)

    def forward(self, x):
        outputs = {}
        x = self.stem(x)
        for name in self.stage_names:
            x = getattr(self, name)(x)
            if name in self._out_features:
                outputs[name] = x
        return outputs


class DarknetTiny(Backbone):
    """YOLOv3-tiny's backbone: conv3x3 + max-pool stages, then a stride-1 pool and a
    wide conv; outputs ``dark3`` (stride 8), ``dark4`` (16) and ``dark5`` (32): YOLOv3-tiny's
    neck reads the last two, a three-level one (YOLOv3-tiny-3l) all three."""

    def __init__(self, width=1.0, norm="BN", out_features=("dark3", "dark4", "dark5")):
        super().__init__()
        widths = [_width(c, width) for c in TINY_WIDTHS]
        layers, channels = [], 3
        self.stage_names = []
        self._out_feature_channels, self._out_feature_strides = {}, {}
        for index, out in enumerate(widths[:5]):  # dark0 (stride 1) .. dark4 (stride 16)
            stage = [nn.MaxPool2d(2, 2)] if index > 0 else []
            stage.append(conv_bn_leaky(channels, out, 3, norm=norm))
            layers.append((f"dark{index}", nn.Sequential(*stage), out, 2 ** index))
            channels = out
        # Max-pool to stride 32, a conv, a stride-1 pool (3x3 here, "same" size), a 2x-wide conv.
        last = _width(1024, width)
        stage = nn.Sequential(nn.MaxPool2d(2, 2), conv_bn_leaky(channels, widths[5], 3, norm=norm),
                              nn.MaxPool2d(3, 1, 1), conv_bn_leaky(widths[5], last, 3, norm=norm))
        layers.append(("dark5", stage, last, 32))
        for name, module, out, stride in layers:
            self.add_module(name, module)
            self.stage_names.append(name)
            self._out_feature_channels[name], self._out_feature_strides[name] = out, stride
        self._out_features = _check_out_features(out_features, self.stage_names)

    def forward(self, x):
        outputs = {}
        for name in self.stage_names:
            x = getattr(self, name)(x)
            if name in self._out_features:
                outputs[name] = x
        return outputs


def _check_out_features(out_features, stage_names):
    unknown = [f for f in out_features if f not in stage_names]
    if unknown:
        raise ConfigError(f"MODEL.YOLO.IN_FEATURES names {', '.join(unknown)}, which the YOLO backbone does not "
                          f"have; fix: choose among {', '.join(stage_names)}")
    return list(out_features)


class YOLONeck(Backbone):
    """YOLOv3's top-down neck over ``bottom_up`` (see the module docstring). Outputs
    ``p<k>`` for the backbone map ``dark<k>`` of each level, finest first."""

    def __init__(self, bottom_up, in_features, out_channels, block_convs, norm="BN"):
        super().__init__()
        self.bottom_up = bottom_up
        shapes = bottom_up.output_shape()
        self.in_features = list(in_features)
        self.level_names = [f"p{name[len('dark'):]}" for name in self.in_features]
        self._out_features = list(self.level_names)
        self._out_feature_channels = dict(zip(self.level_names, out_channels))
        self._out_feature_strides = {p: shapes[f].stride for p, f in zip(self.level_names, self.in_features)}
        self._size_divisibility = max(self._out_feature_strides.values())
        coarser = None
        # Coarse to fine: the coarsest level reads its backbone map alone.
        for name, feature, width in reversed(list(zip(self.level_names, self.in_features, out_channels))):
            in_channels = shapes[feature].channels
            if coarser is not None:
                self.add_module(f"reduce_{name}", conv_bn_leaky(coarser, width, 1, norm=norm))
                in_channels += width
            # Even convs 1x1 to the level's width, odd ones 3x3 to twice it; each reads the one before.
            outs = [width if k % 2 == 0 else 2 * width for k in range(block_convs)]
            convs = [conv_bn_leaky(([in_channels] + outs)[k], outs[k], 1 if k % 2 == 0 else 3, norm=norm)
                     for k in range(block_convs)]
            self.add_module(f"block_{name}", nn.Sequential(*convs))
            coarser = width

    @property
    def size_divisibility(self):
        return self._size_divisibility

    def forward(self, x):
        bottom_up = self.bottom_up(x)
        outputs, coarser = dict(bottom_up), None
        for name, feature in reversed(list(zip(self.level_names, self.in_features))):
            x = bottom_up[feature]
            if coarser is not None:
                lateral = F.interpolate(getattr(self, f"reduce_{name}")(coarser), scale_factor=2.0, mode="nearest")
                x = torch.cat([lateral, x], dim=1)
            coarser = outputs[name] = getattr(self, f"block_{name}")(x)
        return {name: outputs[name] for name in self.level_names}

    def output_shape(self):
        return {name: ShapeSpec(channels=self._out_feature_channels[name], stride=self._out_feature_strides[name])
                for name in self.level_names}


# Neck widths (before WIDTH_MULTIPLIER) of each level by stride, and convs per level block.
_NECK = {"darknet53": ({8: 128, 16: 256, 32: 512}, 5), "tiny": ({8: 64, 16: 128, 32: 256}, 1)}


def _neck(cfg, bottom_up, kind):
    y = cfg.MODEL.YOLO
    shapes = bottom_up.output_shape()
    widths, block_convs = _NECK[kind]
    out_channels = [_width(widths[shapes[f].stride], y.WIDTH_MULTIPLIER) for f in y.IN_FEATURES]
    return YOLONeck(bottom_up, y.IN_FEATURES, out_channels, block_convs, y.NORM)


def _check_strides(cfg, bottom_up, kind):
    widths, _ = _NECK[kind]
    shapes = bottom_up.output_shape()
    features = list(cfg.MODEL.YOLO.IN_FEATURES)
    choices = ", ".join(n for n, s in shapes.items() if s.stride in widths)
    bad = [f for f in features if f not in shapes or shapes[f].stride not in widths]
    if bad:
        raise ConfigError(f"MODEL.YOLO.IN_FEATURES {features}: {', '.join(bad)} is not a level of the {kind} neck; "
                          f"fix: choose among {choices}")
    # The neck upsamples each level 2x onto the next finer one.
    strides = [shapes[f].stride for f in features]
    if any(coarse != 2 * fine for fine, coarse in zip(strides, strides[1:])):
        raise ConfigError(f"MODEL.YOLO.IN_FEATURES {features}: the neck joins adjacent levels, finest first "
                          f"(strides {strides}); fix: levels in that order without gaps, among {choices}")


def _anchor_level(level):
    """Whether ``level`` is a non-empty list of [w, h] anchors of positive sizes."""
    return (isinstance(level, (list, tuple)) and len(level) > 0 and all(
        isinstance(wh, (list, tuple)) and len(wh) == 2 and all(isinstance(v, (int, float)) and v > 0 for v in wh)
        for wh in level))


@BACKBONE_REGISTRY.register()
def build_darknet_backbone(cfg, input_shape=None):
    """Darknet-53 under YOLOv3's three-level neck (``MODEL.YOLO`` sizes it)."""
    y = cfg.MODEL.YOLO
    bottom_up = Darknet53(y.WIDTH_MULTIPLIER, y.DEPTH_MULTIPLIER, y.NORM, ("dark3", "dark4", "dark5"))
    _check_strides(cfg, bottom_up, "darknet53")
    return _neck(cfg, bottom_up, "darknet53")


@BACKBONE_REGISTRY.register()
def build_darknet_tiny_backbone(cfg, input_shape=None):
    """YOLOv3-tiny's backbone under a one-conv-per-level neck: two levels as YOLOv3-tiny
    (``MODEL.YOLO.IN_FEATURES`` dark4, dark5), or three (dark3 too)."""
    y = cfg.MODEL.YOLO
    bottom_up = DarknetTiny(y.WIDTH_MULTIPLIER, y.NORM, ("dark3", "dark4", "dark5"))
    _check_strides(cfg, bottom_up, "tiny")
    return _neck(cfg, bottom_up, "tiny")


class YOLOHead(nn.Module):
    """Per level: conv3x3 to twice the width, then the class, box and objectness 1x1 outputs;
    with ``class_conv`` the class output reads a second conv3x3 of its own."""

    def __init__(self, input_shapes, num_anchors, num_classes, prior_prob=0.01, norm="BN", class_conv=False):
        super().__init__()
        self.num_classes = num_classes
        self.convs = nn.ModuleList(conv_bn_leaky(s.channels, 2 * s.channels, 3, norm=norm) for s in input_shapes)
        self.cls_convs = nn.ModuleList(conv_bn_leaky(s.channels, 2 * s.channels, 3, norm=norm)
                                       for s in input_shapes) if class_conv else None
        self.cls_score = nn.ModuleList(nn.Conv2d(2 * s.channels, a * num_classes, 1)
                                       for s, a in zip(input_shapes, num_anchors))
        self.bbox_pred = nn.ModuleList(nn.Conv2d(2 * s.channels, a * 4, 1) for s, a in zip(input_shapes, num_anchors))
        self.objectness = nn.ModuleList(nn.Conv2d(2 * s.channels, a, 1) for s, a in zip(input_shapes, num_anchors))
        prior = -math.log((1 - prior_prob) / prior_prob)
        for layers in (self.cls_score, self.bbox_pred, self.objectness):
            for layer in layers:
                nn.init.normal_(layer.weight, std=0.01)
                nn.init.constant_(layer.bias, 0.0 if layers is self.bbox_pred else prior)

    def forward(self, features):
        hidden = [conv(x) for conv, x in zip(self.convs, features)]
        cls_hidden = [conv(x) for conv, x in zip(self.cls_convs, features)] if self.cls_convs is not None else hidden
        return ([layer(x) for layer, x in zip(self.cls_score, cls_hidden)],
                [layer(x) for layer, x in zip(self.bbox_pred, hidden)],
                [layer(x) for layer, x in zip(self.objectness, hidden)])


def level_anchor_boxes(size, stride, anchor_sizes, device=None):
    """The anchor boxes of a level of ``size`` (H, W) in detectron2's position-major order
    (index (i W + j) A + a): anchor a's (w, h) centred on cell (i, j), [H W A, 4] XYXY."""
    height, width = size
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) * stride
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) * stride
    cy, cx = torch.meshgrid(ys, xs, indexing="ij")
    wh = torch.as_tensor(anchor_sizes, dtype=torch.float32, device=device)  # [A, 2]
    centres = torch.stack([cx, cy], dim=-1).reshape(-1, 1, 2)
    return torch.cat([centres - wh / 2, centres + wh / 2], dim=-1).reshape(-1, 4)


def decode_boxes(deltas, anchors, stride, neighbour_reach=False):
    """YOLO's decoding (module docstring) of [P, 4] ``deltas`` at their [P, 4] anchor boxes;
    with ``neighbour_reach`` the centre offset spans -0.5 .. 1.5 cells instead of 0 .. 1."""
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    sizes = anchors[:, 2:] - anchors[:, :2]
    offset = deltas[:, :2].sigmoid()
    if neighbour_reach:
        offset = 2 * offset - 0.5
    # The cell's top-left corner is the anchor centre less half a stride.
    xy = centres - stride / 2 + offset * stride
    # Clamped as detectron2's Box2BoxTransform does: a wild t_w in early training stays finite.
    wh = sizes * deltas[:, 2:].clamp(max=math.log(1000.0 / 16)).exp()
    return torch.cat([xy - wh / 2, xy + wh / 2], dim=1)


def wh_iou(wh1, wh2):
    """[M, N] IoU of boxes of sizes ``wh1`` [M, 2] and ``wh2`` [N, 2] sharing one centre."""
    inter = torch.min(wh1[:, None], wh2[None]).prod(dim=2)
    return inter / (wh1.prod(dim=1)[:, None] + wh2.prod(dim=1)[None] - inter)


@META_ARCH_REGISTRY.register()
class YOLOV3(DenseDetector):
    """The YOLOv3-style detector (module docstring)."""

    # Its head's third output is objectness (distillation losses weigh by it).
    has_objectness = True

    @configurable
    def __init__(self, *, backbone, head, head_in_features, anchors, num_classes, match_iou_thresh=0.3,
                 neighbour_cells=False, ignore_thresh=0.5, loss_weights=(0.05, 0.5, 1.0), obj_level_weights=(4.0, 1.0, 0.4),
                 class_loss="bce", focal_alpha=0.25, focal_gamma=2.0,
                 test_score_thresh=0.05, test_topk_candidates=1000, test_nms_thresh=0.5,
                 max_detections_per_image=100, pixel_mean, pixel_std):
        super().__init__(backbone, head, head_in_features, pixel_mean=pixel_mean, pixel_std=pixel_std)
        self.anchors = [list(map(tuple, level)) for level in anchors]
        self.num_classes = num_classes
        self.match_iou_thresh = match_iou_thresh
        self.neighbour_cells = neighbour_cells
        self.ignore_thresh = ignore_thresh
        self.box_weight, self.cls_weight, self.obj_weight = loss_weights
        self.obj_level_weights = tuple(obj_level_weights)
        self.class_loss = check_choice("MODEL.YOLO.CLASS_LOSS", class_loss, CLASS_LOSSES)
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.test_score_thresh = test_score_thresh
        self.test_topk_candidates = test_topk_candidates
        self.test_nms_thresh = test_nms_thresh
        self.max_detections_per_image = max_detections_per_image
        shapes = backbone.output_shape()
        self.strides = [shapes[f].stride for f in self.head_in_features]
        # The anchors flattened over the levels, and each one's level and index in it: fixed,
        # so computed once here rather than every training step.
        per_level = [len(a) for a in self.anchors]
        self.register_buffer("_anchor_wh", torch.tensor([wh for level in self.anchors for wh in level],
                                                        dtype=torch.float32), False)
        self.register_buffer("_level_of", torch.repeat_interleave(torch.arange(len(per_level)),
                                                                  torch.tensor(per_level)), False)
        self.register_buffer("_anchor_in_level", torch.cat([torch.arange(n) for n in per_level]), False)
        self.register_buffer("_level_anchors", torch.tensor(per_level), False)
        self.register_buffer("_level_strides", torch.tensor(self.strides, dtype=torch.float32), False)

    @classmethod
    def from_config(cls, cfg):
        y = cfg.MODEL.YOLO
        backbone = BACKBONE_REGISTRY.get(cfg.MODEL.BACKBONE.NAME)(cfg, ShapeSpec(channels=len(cfg.MODEL.PIXEL_MEAN)))
        shapes = backbone.output_shape()
        levels = list(shapes)  # the neck's levels, finest first
        if not y.ANCHORS:
            raise ConfigError("MODEL.YOLO.ANCHORS is empty; fix: run through tools/train_*.py (which compute them "
                              "from the training boxes), or give them: tools/yolo_anchors.py prints them")
        if len(y.ANCHORS) != len(levels) or not all(_anchor_level(level) for level in y.ANCHORS):
            raise ConfigError(f"MODEL.YOLO.ANCHORS: {len(levels)} levels ({', '.join(levels)}) need a list of "
                              f"[w, h] anchors (w, h > 0) each, got {list(y.ANCHORS)}; fix: tools/yolo_anchors.py "
                              "prints them")
        if len(y.OBJ_LEVEL_WEIGHTS) != len(levels):
            raise ConfigError(f"MODEL.YOLO.OBJ_LEVEL_WEIGHTS {list(y.OBJ_LEVEL_WEIGHTS)}: give one weight per "
                              f"level ({', '.join(levels)})")
        head = YOLOHead([shapes[f] for f in levels], [len(a) for a in y.ANCHORS], y.NUM_CLASSES, y.PRIOR_PROB, y.NORM,
                        y.CLASS_CONV)
        return {
            "backbone": backbone,
            "head": head,
            "head_in_features": levels,
            "anchors": y.ANCHORS,
            "num_classes": y.NUM_CLASSES,
            "match_iou_thresh": y.MATCH_IOU_THRESH,
            "neighbour_cells": y.NEIGHBOUR_CELLS,
            "ignore_thresh": y.IGNORE_THRESH,
            "loss_weights": (y.BOX_WEIGHT, y.CLS_WEIGHT, y.OBJ_WEIGHT),
            "obj_level_weights": y.OBJ_LEVEL_WEIGHTS,
            "class_loss": y.CLASS_LOSS,
            "focal_alpha": y.FOCAL_LOSS_ALPHA,
            "focal_gamma": y.FOCAL_LOSS_GAMMA,
            "test_score_thresh": y.SCORE_THRESH_TEST,
            "test_topk_candidates": y.TOPK_CANDIDATES_TEST,
            "test_nms_thresh": y.NMS_THRESH_TEST,
            "max_detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
        }

    def level_anchors(self, features):
        """Per level, its anchor boxes [H W A, 4] at the map sizes of ``features``."""
        return [level_anchor_boxes(x.shape[-2:], s, a, x.device) for x, s, a in zip(features, self.strides, self.anchors)]

    def _flat(self, predictions):
        """(class logits [N, P, K], box deltas [N, P, 4], objectness [N, P]) over every level's P anchors."""
        logits, deltas, objectness = self._transpose_dense_predictions(predictions, [self.num_classes, 4, 1])
        return cat(logits, dim=1), cat(deltas, dim=1), cat(objectness, dim=1).squeeze(2)

    def _decoded(self, deltas, anchors):
        """[N, P, 4] boxes of all levels' ``deltas`` [N, P, 4]."""
        counts = [len(a) for a in anchors]
        return cat([decode_boxes(d.reshape(-1, 4), a.repeat(len(deltas), 1), s, self.neighbour_cells)
                    .reshape(len(deltas), -1, 4)
                    for d, a, s in zip(deltas.split(counts, dim=1), anchors, self.strides)], dim=1)

    def decode_head_boxes(self, box_levels):
        """[N, P, 4] boxes of the head's per-level box outputs [N, A 4, H, W] (distillation
        compares two heads' boxes decoded: ilmil/modeling/head_boxes.py)."""
        return self._decoded(flatten_levels(box_levels, 4), self.level_anchors(box_levels))

    def assign(self, gt_instances, anchors, sizes):
        """Per image, (anchor indices, GT indices) of the positive anchors (module docstring)."""
        offsets = torch.as_tensor([0] + [len(a) for a in anchors], device=self.device).cumsum(0)[:-1]
        widths = torch.as_tensor([w for _, w in sizes], device=self.device)
        heights = torch.as_tensor([h for h, _ in sizes], device=self.device)
        assignments = []
        for gt in gt_instances:
            boxes = gt.gt_boxes.tensor
            if len(boxes) == 0:
                empty = torch.zeros(0, dtype=torch.long, device=self.device)
                assignments.append((empty, empty))
                continue
            iou = wh_iou(boxes[:, 2:] - boxes[:, :2], self._anchor_wh)  # [B, all anchors]
            matched = iou > self.match_iou_thresh
            matched[torch.arange(len(boxes)), iou.argmax(dim=1)] = True
            gt_index, anchor_index = matched.nonzero(as_tuple=True)
            level = self._level_of[anchor_index]
            centres = (boxes[gt_index, :2] + boxes[gt_index, 2:]) / 2 / self._level_strides[level, None]
            cells = centres.floor().long()
            col = torch.minimum(cells[:, 0].clamp(min=0), widths[level] - 1)
            row = torch.minimum(cells[:, 1].clamp(min=0), heights[level] - 1)
            cols, rows, gts, anchor_ids = [col], [row], [gt_index], [anchor_index]
            if self.neighbour_cells:
                # The adjacent cell on the side of the centre, in x and in y, where it exists.
                near = centres - cells < 0.5
                for d_col, d_row, side in ((1, 0, near[:, 0]), (0, 1, near[:, 1])):
                    step = torch.where(side, -1, 1)
                    n_col, n_row = col + d_col * step, row + d_row * step
                    inside = (n_col >= 0) & (n_col < widths[level]) & (n_row >= 0) & (n_row < heights[level])
                    cols.append(n_col[inside])
                    rows.append(n_row[inside])
                    gts.append(gt_index[inside])
                    anchor_ids.append(anchor_index[inside])
            col, row, gt_index, anchor_index = cat(cols), cat(rows), cat(gts), cat(anchor_ids)
            level = self._level_of[anchor_index]
            slot = offsets[level] + (row * widths[level] + col) * self._level_anchors[level] \
                + self._anchor_in_level[anchor_index]
            assignments.append((slot, gt_index))
        return assignments

    def forward_training(self, images, features, predictions, gt_instances):
        anchors = self.level_anchors(features)
        sizes = [tuple(x.shape[-2:]) for x in features]
        logits, deltas, objectness = self._flat(predictions)
        boxes = self._decoded(deltas, anchors)
        counts = [len(a) for a in anchors]
        obj_target = torch.zeros_like(objectness)
        obj_weight = torch.ones_like(objectness)
        cls_target = torch.zeros_like(logits) if self.class_loss == "focal" else None
        pos_boxes, pos_gt, pos_logits, pos_classes = [], [], [], []
        for n, (gt, (slot, gt_index)) in enumerate(zip(gt_instances, self.assign(gt_instances, anchors, sizes))):
            if len(gt) > 0:
                with torch.no_grad():  # YOLOv3: a good prediction that is not the assigned anchor is no negative
                    ignored = pairwise_iou(Boxes(boxes[n].detach()), gt.gt_boxes).max(dim=1).values > self.ignore_thresh
                obj_weight[n, ignored] = 0.0
            obj_target[n, slot] = 1.0
            obj_weight[n, slot] = 1.0
            pos_boxes.append(boxes[n, slot])
            pos_gt.append(gt.gt_boxes.tensor[gt_index])
            pos_logits.append(logits[n, slot])
            pos_classes.append(gt.gt_classes[gt_index])
            if cls_target is not None:
                cls_target[n, slot, gt.gt_classes[gt_index]] = 1.0
        num_images = len(gt_instances)
        obj_bce = F.binary_cross_entropy_with_logits(objectness, obj_target, reduction="none") * obj_weight
        loss_obj = sum(w * part.sum() / part_weight.sum().clamp(min=1.0) for w, part, part_weight in
                       zip(self.obj_level_weights, obj_bce.split(counts, dim=1), obj_weight.split(counts, dim=1)))
        pos_logits = cat(pos_logits)
        if len(pos_logits) == 0:  # no GT in the batch: the box and class terms have nothing to learn
            zero = logits.sum() * 0.0 + deltas.sum() * 0.0
            loss_box = loss_cls = zero
        else:
            loss_box = giou_loss(cat(pos_boxes), cat(pos_gt), reduction="mean")
            if cls_target is None:
                onehot = F.one_hot(cat(pos_classes), self.num_classes).to(pos_logits.dtype)
                loss_cls = F.binary_cross_entropy_with_logits(pos_logits, onehot)
        if cls_target is not None:  # every anchor, negatives included, even with no GT in the batch
            loss_cls = sigmoid_focal_loss(logits, cls_target, self.focal_alpha, self.focal_gamma,
                                          reduction="sum") / max(1, len(pos_logits))
        return {
            "loss_yolo_box": self.box_weight * num_images * loss_box,
            "loss_yolo_cls": self.cls_weight * num_images * loss_cls,
            "loss_yolo_obj": self.obj_weight * num_images * loss_obj,
        }

    def forward_inference(self, images, features, predictions):
        anchors = self.level_anchors(features)
        logits, deltas, objectness = self._transpose_dense_predictions(predictions, [self.num_classes, 4, 1])
        results = []
        for n, image_size in enumerate(images.image_sizes):
            levels = []
            for z, t, o, a, s in zip(logits, deltas, objectness, anchors, self.strides):
                scores = (o[n].sigmoid() * z[n].sigmoid()).flatten()  # [P K]: anchor p, class k at p K + k
                keep = scores > self.test_score_thresh
                scores, index = scores[keep], keep.nonzero().squeeze(1)
                scores, order = scores.sort(descending=True)
                index = index[order[: self.test_topk_candidates]]
                scores = scores[: self.test_topk_candidates]
                anchor_index, classes = index // self.num_classes, index % self.num_classes
                boxes = decode_boxes(t[n, anchor_index], a[anchor_index], s, self.neighbour_cells)
                levels.append((boxes, scores, classes))
            boxes, scores, classes = (cat(list(parts)) for parts in zip(*levels))
            keep = batched_nms(boxes, scores, classes, self.test_nms_thresh)[: self.max_detections_per_image]
            result = Instances(image_size)
            result.pred_boxes = Boxes(boxes[keep])
            result.pred_boxes.clip(image_size)
            result.scores, result.pred_classes = scores[keep], classes[keep]
            results.append(result)
        return results
