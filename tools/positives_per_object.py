#!/usr/bin/env python
"""How many positives a one-stage detector's assignment (RetinaNet, FCOS, YOLO) gives
each training object: feature locations and anchors per object, over the first
training images of its dataset (ilmil/modeling/assignment_stats.py).

    python tools/positives_per_object.py --config-file configs/shapes/yolov3_cpu.yaml [--images 200] [KEY VALUE ...]

Few locations per object (RetinaNet's IoU assignment on 9 anchors: 1.7 on shapes)
mean a slowly learning classifier; compare assigners with KEY VALUE overrides, e.g.
``MODEL.RETINANET.ASSIGNER atss`` or ``MODEL.YOLO.NEIGHBOUR_CELLS True``.
"""
import argparse
import sys

import ilmil  # noqa: F401  (detectron2 compatibility adjustments come first)
from detectron2.modeling import build_model
from ilmil.config import get_ilmil_cfg, set_num_classes
from ilmil.data import load_dataset_source
from ilmil.engine import run_tool_main, tool_parser
from ilmil.modeling import positives_per_object, with_yolo_anchors


def main(argv=None):
    parser = tool_parser(__doc__)
    parser.add_argument("--config-file", required=True, help="a RetinaNet, FCOS or YOLO yaml config")
    parser.add_argument("--images", type=int, default=200, help="training images counted (default 200)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    if args.images < 1:
        parser.error(f"--images {args.images}: count at least 1 image")
    cfg = get_ilmil_cfg(args.config_file, ["MODEL.DEVICE", "cpu", *args.opts])
    source = load_dataset_source(cfg, splits=("train",))
    cfg = with_yolo_anchors(set_num_classes(cfg, len(source.class_names)), source.train)
    images = source.train[: args.images]
    stats = positives_per_object(build_model(cfg).eval(), images, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    print(f"{args.config_file} on {source.name}: {stats}")


if __name__ == "__main__":
    sys.exit(run_tool_main(main))
