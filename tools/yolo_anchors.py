#!/usr/bin/env python
"""Compute a YOLO config's anchors from its dataset's training boxes (k-means with the
1 - IoU distance, ilmil/modeling/anchor_kmeans.py) and print them as yaml.

    python tools/yolo_anchors.py --config-file configs/shapes/yolov3_cpu.yaml [--dataset NAME] [KEY VALUE ...]

Paste the printed ``MODEL.YOLO.ANCHORS`` into the config, or leave the key empty:
a run then computes them itself from its first stage's training images and records
them in its config.yaml.
"""
import argparse
import sys

import ilmil  # noqa: F401  (detectron2 compatibility adjustments come first)
from ilmil.config import ConfigError, get_ilmil_cfg
from ilmil.data import load_dataset_source
from ilmil.engine import run_tool_main, tool_parser
from ilmil.modeling import is_yolo_config, yolo_anchors


def main(argv=None):
    parser = tool_parser(__doc__)
    parser.add_argument("--config-file", required=True, help="a YOLO yaml config")
    parser.add_argument("--dataset", help="dataset name (default: the config's ILMIL.DATASET)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    cfg = get_ilmil_cfg(args.config_file, args.opts)
    if not is_yolo_config(cfg):
        raise ConfigError(f"--config-file {args.config_file}: MODEL.META_ARCHITECTURE {cfg.MODEL.META_ARCHITECTURE} "
                          "has no YOLO anchors; fix: a YOLO config, e.g. configs/shapes/yolov3_cpu.yaml")
    cfg.defrost()
    if args.dataset:
        cfg.ILMIL.DATASET = args.dataset
    source = load_dataset_source(cfg, splits=("train",))
    anchors = yolo_anchors(cfg, source.train)
    boxes = sum(len(record.get("annotations", [])) for record in source.train)
    print(f"# k-means anchors of {boxes} training boxes of {source.name}, at the test-time input size "
          f"({cfg.INPUT.MIN_SIZE_TEST} px)")
    levels = ",\n".join(f"               {level}" for level in anchors)
    print(f"MODEL:\n  YOLO:\n    ANCHORS: [\n{levels}]")


if __name__ == "__main__":
    sys.exit(run_tool_main(main))
