"""Structured L1-norm filter pruning (Li et al., "Pruning Filters for Efficient
ConvNets", 2017) of a detectron2 Faster R-CNN, RetinaNet or FCOS, and the channel
layout that lets a pruned checkpoint be rebuilt.

What is pruned, and why only that:

* the inner channels of every ResNet residual block (BasicBlock: conv1's outputs =
  conv2's inputs; BottleneckBlock: conv1's and conv2's outputs). A block's output
  width is tied to its shortcut and to every later block, its inner width to
  nothing else, so removing inner filters needs no dependency graph. (torch-pruning
  would trace one, but not through detectron2's ``Conv2d``, whose norm lives inside
  the conv module: a 30 % backbone prune raised a BatchNorm size error with it.)
* optionally the hidden units of Faster R-CNN's fully connected box head (fc1 ->
  fc2 -> box predictor), where most of a small detector's head parameters are.
  RetinaNet's and FCOS's convolutional heads are not pruned.

The widths of the stage outputs (res2..res5) and of the FPN maps never change, so
the MFRRK feature terms compare student and teacher maps of equal width: no
adapter is needed between a pruned student and its unpruned teacher.

The *layout* of a model is ``{module name: output width}`` of every prunable
layer. Checkpoints record it (``ilmil.channel_layout``) and
``apply_channel_layout`` reshapes a freshly built model to it before loading.
"""
import math

import torch
from torch import nn

from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling.backbone.resnet import BasicBlock, BottleneckBlock
from detectron2.modeling.roi_heads.box_head import FastRCNNConvFCHead

__all__ = ["PruningError", "prunable_layers", "channel_layout", "apply_channel_layout", "prune_l1"]


class PruningError(ValueError):
    """The model cannot be pruned or reshaped as asked."""


def prunable_layers(model):
    """``{name: (layer, consumers)}``: each prunable layer (a conv or a linear layer)
    with the layers that read its outputs, in model order."""
    layers = {}
    named = dict(model.named_modules())
    for name, module in named.items():
        if isinstance(module, BasicBlock):
            layers[f"{name}.conv1"] = (module.conv1, [module.conv2])
        elif isinstance(module, BottleneckBlock):
            layers[f"{name}.conv1"] = (module.conv1, [module.conv2])
            layers[f"{name}.conv2"] = (module.conv2, [module.conv3])
        elif isinstance(module, FastRCNNConvFCHead) and name.endswith("box_head"):
            fcs = [(n, m) for n, m in module.named_children() if isinstance(m, nn.Linear)]
            predictor = named.get(name[: -len("box_head")] + "box_predictor")
            for i, (fc_name, fc) in enumerate(fcs):
                if i + 1 < len(fcs):
                    consumers = [fcs[i + 1][1]]
                elif predictor is not None:
                    consumers = [predictor.cls_score, predictor.bbox_pred]
                else:
                    continue
                layers[f"{name}.{fc_name}"] = (fc, consumers)
    return layers


def channel_layout(model):
    """The output width of every prunable layer of ``model``."""
    return {name: _out_width(layer) for name, (layer, _) in prunable_layers(model).items()}


def apply_channel_layout(model, layout):
    """Reshape ``model`` (as built from its config) to ``layout``; the new weights are
    placeholders for a checkpoint's to be loaded. Returns ``model``."""
    layers = prunable_layers(model)
    unknown = sorted(set(layout) - set(layers))
    if unknown:
        raise PruningError(f"the channel layout names layers this model does not have: {', '.join(unknown[:5])}")
    for name, width in layout.items():
        layer, consumers = layers[name]
        if not 1 <= width <= _out_width(layer):  # a layout of a wider model of the same layers
            raise PruningError(f"the channel layout gives {name} {width} outputs, this model's has "
                               f"{_out_width(layer)}")
        if width != _out_width(layer):
            _keep(layer, consumers, torch.arange(int(width)))
    return model


def prune_l1(model, ratios):
    """Remove, in place, the filters of smallest L1 norm from each prunable layer.

    Args:
        ratios: callable ``name -> fraction of that layer's outputs to remove``
            (0 leaves the layer alone); at least one output is always kept.
    Returns:
        the new channel layout.
    """
    for name, (layer, consumers) in prunable_layers(model).items():
        ratio = float(ratios(name))
        if not 0.0 <= ratio < 1.0:
            raise PruningError(f"pruning ratio of {name} must be in [0, 1), got {ratio}")
        width = _out_width(layer)
        # The nearest count, a tie kept up (round() goes to the even one: 9 channels at 0.5 kept
        # 4, 11 kept 6); the product rounded first, as a float misses ties (45 x 0.7 = 31.4999...).
        keep_count = max(1, math.floor(round(width * (1.0 - ratio), 6) + 0.5))
        if keep_count == width:
            continue
        norms = layer.weight.detach().abs().flatten(1).sum(1)
        # The strongest filters, kept in their original order.
        keep = torch.sort(torch.topk(norms, keep_count).indices).values
        _keep(layer, consumers, keep)
    return channel_layout(model)


def _out_width(layer):
    return layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features


def _narrowed(parameter, index):
    """``parameter[index]`` as a parameter of its own, as trainable as it was (a frozen
    stage, FREEZE_AT, stays frozen)."""
    return nn.Parameter(parameter[index].clone(), requires_grad=parameter.requires_grad)


def _keep(layer, consumers, keep):
    """Keep outputs ``keep`` of ``layer`` (with its norm) and the matching inputs of its consumers."""
    with torch.no_grad():
        layer.weight = _narrowed(layer.weight, keep)
        if layer.bias is not None:
            layer.bias = _narrowed(layer.bias, keep)
        if isinstance(layer, nn.Conv2d):
            layer.out_channels = len(keep)
            if getattr(layer, "norm", None) is not None:
                _keep_norm(layer.norm, keep)
        else:
            layer.out_features = len(keep)
        for consumer in consumers:
            consumer.weight = _narrowed(consumer.weight, (slice(None), keep))
            if isinstance(consumer, nn.Conv2d):
                consumer.in_channels = len(keep)
            else:
                consumer.in_features = len(keep)


def _keep_norm(norm, keep):
    # detectron2's SyncBN is torch's SyncBatchNorm (not a BatchNorm2d); its naiveSyncBN is one.
    if isinstance(norm, (nn.BatchNorm2d, nn.SyncBatchNorm, FrozenBatchNorm2d)):
        for key in ("weight", "bias", "running_mean", "running_var"):
            value = getattr(norm, key)
            setattr(norm, key, _narrowed(value, keep) if isinstance(value, nn.Parameter) else value[keep].clone())
        norm.num_features = len(keep)
    else:
        # GroupNorm would also need its group count to divide every new width.
        raise PruningError(f"pruning supports BatchNorm / FrozenBN residual blocks, not {type(norm).__name__}: "
                           "set MODEL.RESNETS.NORM to BN, SyncBN or FrozenBN")
