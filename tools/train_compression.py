#!/usr/bin/env python
"""Compression: a student trained on all its classes with a teacher of the same classes.

    # a teacher, trained by the toolkit (any config), then a student distilled from it
    python tools/train_incremental.py --stages 20 --output-dir OUT/teacher \\
        --config-file configs/shapes/faster_rcnn_R50_FPN_cpu.yaml
    python tools/train_compression.py --stages 20 --output-dir OUT/student \\
        --teacher-config configs/shapes/faster_rcnn_R50_FPN_cpu.yaml \\
        --teacher-weights OUT/teacher/stage_0/model_final.pth \\
        ILMIL.DISTILL.FEAT.ENABLED True

The student's config (``--config-file``, default the shapes CPU config) names its
distillation terms (``ILMIL.DISTILL``); trailing ``KEY VALUE`` pairs override any key.
"""
import argparse
import sys

import ilmil  # noqa: F401  (detectron2 compatibility adjustments come first)
from detectron2.engine import default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ilmil.config import get_ilmil_cfg
from ilmil.engine import CompressionRun, init_distributed, require_output_dir, run_tool_main
from ilmil.evaluation import format_results_table


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default="", help="the student's yaml config (default: the shapes CPU config)")
    parser.add_argument("--teacher-weights", required=True, help="the trained teacher's checkpoint")
    parser.add_argument("--teacher-config", help="the teacher's yaml config (ILMIL.TEACHER.CONFIG_FILE; "
                                                 "default: the student's)")
    parser.add_argument("--dataset", help="shapes | voc_2007 | voc_2012 | voc_07_12 | coco_2017 | voc_folder | coco_json")
    parser.add_argument("--stages", help="the number of classes, one stage, e.g. 20 (default: the config's)")
    parser.add_argument("--class-order", help="comma-separated class names (default: the dataset's order)")
    parser.add_argument("--output-dir", required=True, help="run folder; a re-run reuses what is finished")
    parser.add_argument("--resume", action="store_true", help="continue training from the last checkpoint")
    parser.add_argument("--force", action="store_true",
                        help="start over in a folder that holds another run (removes that run's outputs)")
    parser.add_argument("--seed", type=int, help="training seed (default: the config's SEED)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return parser.parse_args(argv)


def setup(args):
    cfg = get_ilmil_cfg(args.config_file or None, args.opts, method="finetune")
    if args.dataset is not None:
        cfg.ILMIL.DATASET = args.dataset
    if args.stages is not None:
        cfg.ILMIL.STAGES = args.stages
    if args.class_order:
        cfg.ILMIL.CLASS_ORDER = args.class_order.split(",")
    if args.seed is not None:
        cfg.SEED = args.seed
    if args.teacher_config is not None:
        cfg.ILMIL.TEACHER.CONFIG_FILE = args.teacher_config
    cfg.OUTPUT_DIR = args.output_dir
    cfg.freeze()
    require_output_dir(cfg.OUTPUT_DIR)
    init_distributed(cfg.MODEL.DEVICE)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="ilmil", abbrev_name="ilmil")
    return cfg


def main(argv=None):
    args = parse_args(argv)
    cfg = setup(args)
    run = CompressionRun(cfg, args.teacher_weights, args.resume, args.force)
    default_setup(cfg, args)
    results = run.run()
    if comm.is_main_process():
        teacher = results["teacher"]
        print(format_results_table(results))
        print(f"teacher: AP50 {teacher['AP50']:.1f}, AP {teacher['AP']:.1f}")


if __name__ == "__main__":
    sys.exit(run_tool_main(main))
