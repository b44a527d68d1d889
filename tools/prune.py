#!/usr/bin/env python
"""Structured L1-norm pruning of a trained detector, with a before / after report.

    python tools/prune.py --weights OUT/stage_0/model_final.pth --ratio 0.3 --output-dir OUT/pruned
    python tools/prune.py --weights W --stage-ratios 0.2,0.3,0.4,0.5 --box-head-ratio 0.5 \\
        --finetune-iters 300 --output-dir P
    python tools/prune.py --weights W --ratio 0.3 --finetune-iters 400 --finetune-teacher \\
        --output-dir P                                     # distilled from its unpruned self

Writes OUT/model_pruned.pth (its channel layout recorded: every tool rebuilds it
from the checkpoint alone) and OUT/pruning.json (parameters, GFLOPs, latency on the
model's device and AP50 on the test data of the model's classes, before and after). The config is
the one the model was trained with: the config.yaml of the run folder holding
--weights, or --config-file; its dataset is the test data; trailing KEY VALUE pairs
override any config key.
"""
import argparse
import sys

import ilmil  # noqa: F401  (detectron2 compatibility adjustments come first)
from detectron2.utils.logger import setup_logger

from ilmil.checkpoint import checkpoint_class_names, safe_load
from ilmil.config import get_ilmil_cfg, set_num_classes
from ilmil.data import DatasetError, load_dataset_source, register_stage_datasets
from ilmil.data.stages import Stage
from ilmil.deploy import check_default_config_fits, run_config_of
from ilmil.engine import require_output_dir, run_tool_main, tool_parser
from ilmil.engine.pruning_stage import check_pruning_config, prune_checkpoint, pruning_enabled
from ilmil.pruning import PruningError, format_pruning_table


def _ratios(text):
    try:
        return [float(r) for r in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated fractions, e.g. 0.2,0.3,0.4,0.5") from None


def parse_args(argv=None):
    parser = tool_parser(__doc__)
    parser.add_argument("--weights", required=True, help="an ilmil checkpoint (it records its class names)")
    # Each flag sets its ILMIL.PRUNING key when given; the config's value (or a KEY VALUE override) stays otherwise.
    parser.add_argument("--ratio", type=float, help="fraction of residual-block inner channels removed "
                                                    "(ILMIL.PRUNING.RATIO, default 0)")
    parser.add_argument("--stage-ratios", type=_ratios, help="per ResNet stage res2,res3,res4,res5 (overrides --ratio)")
    parser.add_argument("--box-head-ratio", type=float, help="fraction of box-head hidden units removed "
                                                             "(ILMIL.PRUNING.BOX_HEAD_RATIO, default 0)")
    parser.add_argument("--finetune-iters", type=int, help="fine-tuning iterations after pruning "
                                                           "(ILMIL.PRUNING.FINETUNE_ITERS, default 0)")
    parser.add_argument("--finetune-teacher", action="store_true", default=None,
                        help="fine-tune with the unpruned model as teacher: the feature term, and the RPN / RCN "
                             "terms if the config enables them")
    parser.add_argument("--output-dir", required=True, help="where model_pruned.pth and pruning.json go")
    parser.add_argument("--config-file", default="", help="the config the model was trained with (default: the "
                                                          "config.yaml of the run folder holding --weights, else "
                                                          "the shapes config)")
    parser.add_argument("--dataset", help="dataset of the model's classes (default: the config's ILMIL.DATASET)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the fine-tuning from its last checkpoint in --output-dir (after a kill)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    config_file = args.config_file or run_config_of(args.weights)
    cfg = get_ilmil_cfg(config_file, args.opts)
    if args.dataset is not None:
        cfg.ILMIL.DATASET = args.dataset
    if not config_file:
        check_default_config_fits(args.weights, cfg)
    given = {"RATIO": args.ratio, "STAGE_RATIOS": args.stage_ratios, "BOX_HEAD_RATIO": args.box_head_ratio,
             "FINETUNE_ITERS": args.finetune_iters, "FINETUNE_TEACHER": args.finetune_teacher}
    for key, value in given.items():
        if value is not None:
            cfg.ILMIL.PRUNING[key] = value
    cfg.OUTPUT_DIR = args.output_dir
    check_pruning_config(cfg)
    if not pruning_enabled(cfg):
        raise PruningError("--ratio, --stage-ratios and --box-head-ratio prune nothing (all 0, or --stage-ratios "
                           "0 replacing --ratio); fix: give a ratio above 0, e.g. --ratio 0.3")
    classes = checkpoint_class_names(safe_load(args.weights))
    if not classes:
        raise DatasetError(f"{args.weights} records no class names: give a checkpoint written by ilmil's tools")
    source = load_dataset_source(cfg)
    unknown = [c for c in classes if c not in source.class_names]
    if unknown:
        raise DatasetError(f"{args.weights} holds classes the {source.name} data lacks: {', '.join(unknown)}; "
                           "fix: --dataset / --config-file of the data the model was trained on")
    require_output_dir(args.output_dir)
    setup_logger(args.output_dir, name="ilmil", abbrev_name="ilmil")
    setup_logger(args.output_dir)
    train_name, test_name = register_stage_datasets("ilmil_prune", source, Stage(0, (), tuple(classes)))
    set_num_classes(cfg, len(classes))
    cfg.freeze()
    summary = prune_checkpoint(cfg, args.weights, args.output_dir, classes, train_name, test_name, args.resume)
    print(format_pruning_table(summary))


if __name__ == "__main__":
    sys.exit(run_tool_main(main))
