"""Positives per object of a one-stage assignment: hand-counted cases for YOLO (with and
without neighbour cells) and RetinaNet's IoU rule, the refusal of a two-stage detector,
and the tool end to end."""
import re

import pytest

from detectron2.modeling import build_model

from ilmil.config import CONFIGS_DIR, ConfigError, get_ilmil_cfg, set_num_classes
from ilmil.modeling import positives_per_object
from test_yolo import _hand_built_model
from tool_runs import SHAPES_OPTS, run_tool, tail


def _record(size, boxes, bbox_mode=0):
    return {"height": size, "width": size,
            "annotations": [{"bbox": box, "bbox_mode": bbox_mode, "category_id": 0} for box in boxes]}


def test_yolo_positives_are_one_cell_or_three_with_neighbour_cells():
    # A 32 px image, one 16 x 16 anchor on a level of stride 8: the GT centre (10, 13) is in
    # cell (1, 1); its nearer neighbours (1, 0) and (2, 1) are on the map.
    records = [_record(32, [[2.0, 5.0, 18.0, 21.0]])]
    plain = positives_per_object(_hand_built_model().eval(), records, 32, 32)
    assert (plain.objects, plain.locations, plain.anchors, plain.without) == (1, 1.0, 1.0, 0)
    neighbours = positives_per_object(_hand_built_model(neighbour_cells=True).eval(), records, 32, 32)
    assert (neighbours.locations, neighbours.anchors) == (3.0, 3.0)
    # The same box as XYWH, on a 16 px image resized to 32: the same count.
    half = [_record(16, [[1.0, 2.5, 8.0, 8.0]], bbox_mode=1)]
    assert positives_per_object(_hand_built_model(neighbour_cells=True).eval(), half, 32, 32).locations == 3.0


def _retinanet(*opts):
    cfg = get_ilmil_cfg(f"{CONFIGS_DIR}/shapes/retinanet_R18_FPN_cpu.yaml", ["MODEL.DEVICE", "cpu", *opts])
    return build_model(set_num_classes(cfg, 3)).eval()


def test_retinanet_iou_positives_of_a_box_equal_to_an_anchor():
    # One 32 px anchor per location, stride 8 on p3, centred on the cell corners. The box
    # [32, 32, 64, 64] is the anchor at (48, 48) (IoU 1); shifted by one stride (8 px) an
    # anchor keeps IoU 24 x 32 / (2 x 1024 - 768) = 0.6 >= 0.5 in each of 4 directions;
    # diagonally 576 / 1472 = 0.39 and two strides away 0.33 are below 0.4; on p4 the 64 px
    # anchor holding it has IoU 0.25. So 5 locations.
    model = _retinanet("MODEL.RETINANET.ASSIGNER", "iou")
    stats = positives_per_object(model, [_record(256, [[32.0, 32.0, 64.0, 64.0]])], 256, 256)
    assert (stats.locations, stats.anchors, stats.without) == (5.0, 5.0, 0)


def test_a_two_stage_detector_has_no_assignment_to_count():
    cfg = get_ilmil_cfg(f"{CONFIGS_DIR}/shapes/faster_rcnn_R18_FPN_cpu.yaml", ["MODEL.DEVICE", "cpu"])
    with pytest.raises(ConfigError, match="counted for RetinaNet, FCOS and YOLO"):
        positives_per_object(build_model(cfg), [_record(32, [[0.0, 0.0, 8.0, 8.0]])], 32, 32)


def test_the_tool_prints_the_positives_per_object_of_a_config(tiny_datasets_root):
    config = f"{CONFIGS_DIR}/shapes/fcos_R18_FPN_cpu.yaml"
    result = run_tool("positives_per_object.py", ["--config-file", config, "--images", "4", *SHAPES_OPTS],
                      tiny_datasets_root)
    assert result.returncode == 0, tail(result.log)
    found = re.search(r"on shapes: ([\d.]+) feature locations, ([\d.]+) anchors per object \((\d+) objects of 4 "
                      r"images; (\d+) with no positive\)", result.stdout)
    assert found, tail(result.log)
    locations, anchors, objects, _ = (float(x) for x in found.groups())
    assert objects > 0 and locations == anchors > 1  # FCOS: one anchor point per location
    refused = run_tool("positives_per_object.py", ["--config-file", config, "--images", "0"], tiny_datasets_root)
    assert refused.returncode != 0 and "--images 0" in refused.log
