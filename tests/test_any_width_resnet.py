"""ResNet-18 FPN backbones of any width: at detectron2's width they are detectron2's
networks (same parameters, same outputs), narrower they have the widths asked for."""
import os

import pytest
import torch

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY

from ilmil.config import CONFIGS_DIR, ConfigError, get_ilmil_cfg

FASTER_RCNN = os.path.join(CONFIGS_DIR, "shapes", "faster_rcnn_R18_FPN_cpu.yaml")
RETINANET = os.path.join(CONFIGS_DIR, "shapes", "retinanet_R18_FPN_cpu.yaml")
QUARTER = os.path.join(CONFIGS_DIR, "shapes", "kd", "faster_rcnn_R18_quarter_FPN32_student_cpu.yaml")
IMAGE = ShapeSpec(channels=3)


def _shapes(module):
    return {name: tuple(t.shape) for name, t in module.state_dict().items()}


@pytest.mark.parametrize("config, theirs, ours", [
    (FASTER_RCNN, "build_resnet_fpn_backbone", "build_any_width_resnet_fpn_backbone"),
    (RETINANET, "build_retinanet_resnet_fpn_backbone", "build_any_width_retinanet_resnet_fpn_backbone"),
])
def test_at_detectron2s_width_it_is_detectron2s_backbone(config, theirs, ours):
    cfg = get_ilmil_cfg(config)
    torch.manual_seed(0)
    reference = BACKBONE_REGISTRY.get(theirs)(cfg, IMAGE).eval()
    built = BACKBONE_REGISTRY.get(ours)(cfg, IMAGE).eval()
    assert _shapes(built) == _shapes(reference)
    built.load_state_dict(reference.state_dict())
    image = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        expected, got = reference(image), built(image)
    assert got.keys() == expected.keys()
    for level in expected:
        torch.testing.assert_close(got[level], expected[level])


def test_quarter_width_student_is_narrow_from_the_stem():
    cfg = get_ilmil_cfg(QUARTER)
    backbone = BACKBONE_REGISTRY.get(cfg.MODEL.BACKBONE.NAME)(cfg, IMAGE)
    bottom_up = backbone.bottom_up
    assert bottom_up.stem.conv1.weight.shape == (16, 3, 7, 7)
    assert {f: s.channels for f, s in bottom_up.output_shape().items()} == {
        "res2": 16, "res3": 32, "res4": 64, "res5": 128}
    assert bottom_up.res3[0].conv1.weight.shape == (32, 16, 3, 3)
    assert {s.channels for s in backbone.output_shape().values()} == {32}
    teacher = BACKBONE_REGISTRY.get("build_resnet_fpn_backbone")(get_ilmil_cfg(FASTER_RCNN), IMAGE)
    # Every convolution a quarter as wide in and out: about 1/16 of the teacher's ResNet.
    ratio = sum(p.numel() for p in bottom_up.parameters()) / sum(p.numel() for p in teacher.bottom_up.parameters())
    assert 1 / 17 < ratio < 1 / 15


def test_grouped_basic_blocks_are_refused():
    cfg = get_ilmil_cfg(QUARTER, ["MODEL.RESNETS.NUM_GROUPS", "2"])
    with pytest.raises(ConfigError, match="NUM_GROUPS 1"):
        BACKBONE_REGISTRY.get(cfg.MODEL.BACKBONE.NAME)(cfg, IMAGE)


def test_an_output_that_is_no_resnet_stage_is_refused():
    cfg = get_ilmil_cfg(QUARTER, ["MODEL.RESNETS.OUT_FEATURES", "['res4', 'res6']"])
    with pytest.raises(ConfigError, match=r"OUT_FEATURES: \['res6'\] are not ResNet outputs"):
        BACKBONE_REGISTRY.get(cfg.MODEL.BACKBONE.NAME)(cfg, IMAGE)
