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

from ilmil.engine import CompressionRun, add_run_arguments, run_tool_main, setup_run
from ilmil.evaluation import format_results_table


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher-weights", required=True, help="the trained teacher's checkpoint")
    parser.add_argument("--teacher-config", help="the teacher's yaml config (ILMIL.TEACHER.CONFIG_FILE; "
                                                 "default: the student's)")
    add_run_arguments(parser, "the number of classes, one stage, e.g. 20 (default: the config's)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cfg = setup_run(args, method="finetune", **{"ILMIL.TEACHER.CONFIG_FILE": args.teacher_config})
    run = CompressionRun(cfg, args.teacher_weights, args.resume, args.force)
    default_setup(cfg, args)
    results = run.run()
    if comm.is_main_process():
        teacher = results["teacher"]
        print(format_results_table(results))
        print(f"teacher: AP50 {teacher['AP50']:.1f}, AP {teacher['AP']:.1f}")


if __name__ == "__main__":
    sys.exit(run_tool_main(main))
