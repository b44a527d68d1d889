#!/usr/bin/env python
"""Class-incremental training: every stage of a schedule in order, evaluated after each.

    python tools/train_incremental.py --stages 10+10 --method finetune --output-dir OUT
    python tools/train_incremental.py --dataset voc_07_12 --stages 15+1x5 \\
        --config-file configs/voc/faster_rcnn_R50_FPN.yaml --output-dir OUT SOLVER.MAX_ITER 9000

Flags set the ILMIL config keys; trailing ``KEY VALUE`` pairs override any key.
"""
import sys

import ilmil  # noqa: F401  (detectron2 compatibility adjustments come first)
from detectron2.engine import default_setup

from ilmil.engine import IncrementalRun, add_run_arguments, run_tool_main, setup_run, tool_parser
from ilmil.evaluation import format_results_table


def parse_args(argv=None):
    parser = tool_parser(__doc__)
    parser.add_argument("--method", help="finetune | joint | pseudo | faster-ilod | mma | ilmil (default: finetune)")
    parser.add_argument("--teacher-weights", help="model of the classes before --start-stage (your own base detector)")
    parser.add_argument("--start-stage", type=int, default=0, help="first stage to train (needs --teacher-weights)")
    parser.add_argument("--prune", type=float, metavar="RATIO",
                        help="prune this fraction of the residual blocks' inner channels after stage "
                             "ILMIL.PRUNING.AFTER_STAGE (0); the next student starts pruned, its teacher does not")
    add_run_arguments(parser, "classes per stage, e.g. 10+10, 15+5, 19+1, 10+5+5, 15+1x5, 40+40")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cfg = setup_run(args, method=args.method, tool_flags={"--prune": ("ILMIL.PRUNING.RATIO", args.prune),
                                                          "--method": ("ILMIL.METHOD", args.method)})
    # Checked before detectron2's setup, so that a refused run leaves an existing folder's config.yaml as it was.
    run = IncrementalRun(cfg, args.start_stage, args.teacher_weights, args.resume, args.force)
    default_setup(cfg, args)
    print(format_results_table(run.run()))


if __name__ == "__main__":
    sys.exit(run_tool_main(main))
