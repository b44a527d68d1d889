"""ResNet-18/34 FPN backbones of any width, for small students.

detectron2 0.6 builds ResNet-18/34 at one width only (its ``build_resnet_backbone``
asserts ``MODEL.RESNETS.RES2_OUT_CHANNELS == 64``), so a student can narrow only the
inner convolution of each block (``ILMIL.PRUNING.CHANNELS``): the stem and the residual
stream keep the teacher's widths. These builders assemble the same network from
detectron2's own blocks with the widths of the config: the stem's from
``MODEL.RESNETS.STEM_OUT_CHANNELS``, res2's from ``RES2_OUT_CHANNELS``, each later stage
twice the one before. Deeper ResNets (bottleneck blocks) take any width in detectron2
already and are built by it.
"""
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone import FPN, build_resnet_backbone
from detectron2.modeling.backbone.fpn import LastLevelMaxPool, LastLevelP6P7
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, ResNet

from ..config import ConfigError

__all__ = ["build_any_width_resnet", "build_any_width_resnet_fpn_backbone",
           "build_any_width_retinanet_resnet_fpn_backbone"]

_BASIC_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


def build_any_width_resnet(cfg, input_shape):
    """The bottom-up ResNet of ``cfg.MODEL.RESNETS`` at the config's widths."""
    r = cfg.MODEL.RESNETS
    if r.DEPTH not in _BASIC_BLOCKS:
        return build_resnet_backbone(cfg, input_shape)
    if r.NUM_GROUPS != 1 or any(r.DEFORM_ON_PER_STAGE) or r.RES5_DILATION != 1:
        raise ConfigError(f"MODEL.RESNETS: ResNet-{r.DEPTH} has plain basic blocks (NUM_GROUPS 1, no deformable "
                          f"convs, RES5_DILATION 1); fix: drop those settings or use DEPTH 50")
    stage_numbers = {"stem": 1, "res2": 2, "res3": 3, "res4": 4, "res5": 5}
    unknown = [f for f in r.OUT_FEATURES if f not in stage_numbers]
    if unknown:
        raise ConfigError(f"MODEL.RESNETS.OUT_FEATURES: {unknown} are not ResNet outputs; fix: choose from "
                          f"{', '.join(stage_numbers)}")
    stem = BasicStem(input_shape.channels, r.STEM_OUT_CHANNELS, norm=r.NORM)
    last_stage = max(stage_numbers[f] for f in r.OUT_FEATURES)
    stages, in_channels = [], r.STEM_OUT_CHANNELS
    for index, num_blocks in enumerate(_BASIC_BLOCKS[r.DEPTH][: last_stage - 1]):
        out_channels = r.RES2_OUT_CHANNELS * 2**index
        stride = 1 if index == 0 else 2
        stages.append(ResNet.make_stage(BasicBlock, num_blocks, stride_per_block=[stride] + [1] * (num_blocks - 1),
                                        in_channels=in_channels, out_channels=out_channels, norm=r.NORM))
        in_channels = out_channels
    return ResNet(stem, stages, out_features=r.OUT_FEATURES).freeze(cfg.MODEL.BACKBONE.FREEZE_AT)


@BACKBONE_REGISTRY.register()
def build_any_width_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """Faster R-CNN's FPN (p2-p6) on the ResNet above."""
    return FPN(bottom_up=build_any_width_resnet(cfg, input_shape), in_features=cfg.MODEL.FPN.IN_FEATURES,
               out_channels=cfg.MODEL.FPN.OUT_CHANNELS, norm=cfg.MODEL.FPN.NORM, top_block=LastLevelMaxPool(),
               fuse_type=cfg.MODEL.FPN.FUSE_TYPE)


@BACKBONE_REGISTRY.register()
def build_any_width_retinanet_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """RetinaNet's and FCOS's FPN (p3-p7, p6 from res5, as detectron2's) on the ResNet above."""
    bottom_up = build_any_width_resnet(cfg, input_shape)
    shapes = bottom_up.output_shape()
    if "res5" not in shapes:
        raise ConfigError(f"MODEL.RESNETS.OUT_FEATURES {list(cfg.MODEL.RESNETS.OUT_FEATURES)}: this FPN makes p6 and "
                          "p7 from res5; fix: include res5")
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    return FPN(bottom_up=bottom_up, in_features=cfg.MODEL.FPN.IN_FEATURES, out_channels=out_channels,
               norm=cfg.MODEL.FPN.NORM, fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
               top_block=LastLevelP6P7(shapes["res5"].channels, out_channels))
