#!/usr/bin/env python
"""Compression: a student trained on all its classes with a teacher of the same classes.

    # a teacher, trained by the toolkit (any config), then a student distilled from it
    python tools/train_incremental.py --stages 20 --output-dir OUT/teacher
    python tools/train_compression.py --stages 20 --output-dir OUT/student \\
        --config-file configs/shapes/kd/faster_rcnn_R18_FPN32_student_cpu.yaml \\
        --teacher-config configs/shapes/faster_rcnn_R18_FPN_cpu.yaml \\
        --teacher-weights OUT/teacher/stage_0/model_final.pth
    # the same through a teacher assistant (OUT/student_ta/assistant/, then the student)
    python tools/train_compression.py --stages 20 --output-dir OUT/student_ta \\
        --config-file configs/shapes/kd/faster_rcnn_R18_FPN32_student_cpu.yaml \\
        --assistant-config configs/shapes/kd/faster_rcnn_R18_FPN_assistant_cpu.yaml \\
        --teacher-weights OUT/teacher/stage_0/model_final.pth

The student's config (``--config-file``, default the shapes CPU config) names its
distillation terms (``ILMIL.DISTILL``); trailing ``KEY VALUE`` pairs override any key.
"""
import sys

import ilmil  # noqa: F401  (detectron2 compatibility adjustments come first)
from detectron2.engine import default_setup
from detectron2.utils import comm

from ilmil.engine import add_run_arguments, compression_run, run_tool_main, setup_run, tool_parser
from ilmil.evaluation import format_results_table


def parse_args(argv=None):
    parser = tool_parser(__doc__)
    parser.add_argument("--teacher-weights", help="the trained teacher's checkpoint (required)")
    parser.add_argument("--teacher-config", help="the teacher's yaml config (ILMIL.TEACHER.CONFIG_FILE; "
                                                 "default: the student's)")
    parser.add_argument("--assistant-config",
                        help="a teacher assistant's yaml config (ILMIL.TEACHER.ASSISTANT_CONFIG_FILE): distilled "
                             "from the teacher first (OUT/assistant), it then teaches the student")
    add_run_arguments(parser, "the number of classes, one stage, e.g. 20 (default: the config's)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cfg = setup_run(args, method="finetune", required=("--teacher-weights",),
                    tool_flags={"--teacher-config": ("ILMIL.TEACHER.CONFIG_FILE", args.teacher_config),
                                "--assistant-config": ("ILMIL.TEACHER.ASSISTANT_CONFIG_FILE", args.assistant_config)})
    run = compression_run(cfg, args.teacher_weights, args.resume, args.force)
    default_setup(cfg, args)
    results = run.run()
    if comm.is_main_process():
        teacher = results["teacher"]
        print(format_results_table(results))
        print(f"teacher: AP50 {teacher['AP50']:.1f}, AP {teacher['AP']:.1f}")
        if "assistant" in results:
            assistant = results["assistant"]
            print(f"assistant: AP50 {assistant['AP50']:.1f}, AP {assistant['AP']:.1f}")


if __name__ == "__main__":
    sys.exit(run_tool_main(main))
