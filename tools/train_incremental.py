#!/usr/bin/env python
"""Class-incremental training: every stage of a schedule in order, evaluated after each.

    python tools/train_incremental.py --stages 10+10 --method finetune --output-dir OUT
    python tools/train_incremental.py --dataset voc_07_12 --stages 15+1x5 \\
        --config-file configs/voc/faster_rcnn_R50_FPN.yaml --output-dir OUT SOLVER.MAX_ITER 9000

Flags set the ILMIL config keys; trailing ``KEY VALUE`` pairs override any key.
"""
import argparse
import sys

import ilmil  # noqa: F401  (detectron2 compatibility adjustments come first)
from detectron2.engine import default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ilmil.config import get_ilmil_cfg
from ilmil.engine import IncrementalRun, init_distributed, require_output_dir, run_tool_main
from ilmil.evaluation import format_results_table


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", default="", help="yaml config (default: the shapes CPU config)")
    parser.add_argument("--dataset", help="shapes | voc_2007 | voc_2012 | voc_07_12 | coco_2017 | voc_folder | coco_json")
    parser.add_argument("--stages", help="classes per stage, e.g. 10+10, 15+5, 19+1, 10+5+5, 15+1x5, 40+40")
    parser.add_argument("--method", help="finetune | joint | pseudo | faster-ilod | mma | ilmil (default: finetune)")
    parser.add_argument("--class-order", help="comma-separated class names (default: the dataset's order)")
    parser.add_argument("--output-dir", required=True, help="run folder; a re-run skips finished stages")
    parser.add_argument("--resume", action="store_true",
                        help="continue the stage in progress from its last checkpoint (after a crash or a kill)")
    parser.add_argument("--force", action="store_true",
                        help="start over in a folder that holds another run (removes that run's outputs)")
    parser.add_argument("--teacher-weights", help="model of the classes before --start-stage (your own base detector)")
    parser.add_argument("--start-stage", type=int, default=0, help="first stage to train (needs --teacher-weights)")
    parser.add_argument("--seed", type=int, help="training seed (default: the config's SEED)")
    parser.add_argument("--prune", type=float, metavar="RATIO",
                        help="prune this fraction of the residual blocks' inner channels after stage "
                             "ILMIL.PRUNING.AFTER_STAGE (0); the next student starts pruned, its teacher does not")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return parser.parse_args(argv)


def setup(args):
    """The run's config, the output folder checked and the loggers set up; detectron2's
    own setup (which writes OUT/config.yaml) waits until the run has passed its checks."""
    cfg = get_ilmil_cfg(args.config_file or None, args.opts, method=args.method)
    # Set directly: yacs would parse a spec such as "20" as an int.
    if args.dataset is not None:
        cfg.ILMIL.DATASET = args.dataset
    if args.stages is not None:
        cfg.ILMIL.STAGES = args.stages
    if args.class_order:
        cfg.ILMIL.CLASS_ORDER = args.class_order.split(",")
    if args.seed is not None:
        cfg.SEED = args.seed
    if args.prune is not None:
        cfg.ILMIL.PRUNING.RATIO = args.prune
    cfg.OUTPUT_DIR = args.output_dir
    cfg.freeze()
    require_output_dir(cfg.OUTPUT_DIR)
    init_distributed(cfg.MODEL.DEVICE)  # under torchrun: join its process group
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="ilmil", abbrev_name="ilmil")
    return cfg


def main(argv=None):
    args = parse_args(argv)
    cfg = setup(args)
    # Checked before detectron2's setup, so that a refused run leaves an existing folder's config.yaml as it was.
    run = IncrementalRun(cfg, args.start_stage, args.teacher_weights, args.resume, args.force)
    default_setup(cfg, args)
    print(format_results_table(run.run()))


if __name__ == "__main__":
    sys.exit(run_tool_main(main))
