#!/usr/bin/env python
"""Evaluate a class-incremental run's saved models, or one checkpoint, and print the per-stage table.

    # every stage of a run (its config.yaml, stages.json and stage_K/model_final.pth)
    python tools/eval_incremental.py --run-dir OUT [--stages 0,1] [--output-dir EVAL]
    # one checkpoint on the test set of its classes (the first --num-old count as old)
    python tools/eval_incremental.py --weights W.pth [--num-old 2] [--classes a,b,c] \\
        [--config-file CFG] [--dataset NAME] [--output-dir EVAL]    # CFG: default its run's config.yaml
    # an exported model through ONNX Runtime, on the test set of the data it was trained on
    python tools/eval_incremental.py --weights model.onnx [--output-dir EVAL]

With --output-dir, EVAL gets what a run folder has: results.json (with forgetting),
stage_K/detections.json, per_class_ap*.csv, the plots and report.md. Trailing
``KEY VALUE`` pairs override config keys (e.g. MODEL.DEVICE cuda).
"""
import argparse
import sys

import ilmil  # noqa: F401  (detectron2 compatibility adjustments come first)
from ilmil.checkpoint import is_onnx_file
from ilmil.config import class_names_flag, get_ilmil_cfg
from ilmil.deploy import OnnxDetector, check_default_config_fits, check_onnx_opts, run_config_of
from ilmil.engine import RUN_RECORDS, require_output_dir, run_tool_main, tool_parser
from ilmil.evaluation import evaluate_checkpoint, evaluate_run, format_results_table


def parse_args(argv=None):
    parser = tool_parser(__doc__)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--run-dir", help="run folder of tools/train_incremental.py: evaluate its stages")
    target.add_argument("--weights", help="one checkpoint, or a .onnx file of tools/export.py, to evaluate")
    parser.add_argument("--stages", help="with --run-dir: comma-separated stage indices (default: every trained stage)")
    parser.add_argument("--classes", help="with --weights: comma-separated classes in the model's order, for a "
                                          "checkpoint that does not record them (default: those it records)")
    parser.add_argument("--num-old", type=int, default=0, help="with --weights: how many of the classes are old")
    parser.add_argument("--config-file", default="", help="with --weights: yaml config, e.g. a run's config.yaml "
                                                          "(default: the config.yaml of the checkpoint's run, else "
                                                          "the shapes CPU config)")
    parser.add_argument("--dataset", help="with --weights: dataset name (default: the config's ILMIL.DATASET)")
    parser.add_argument("--output-dir", help="write results.json, detections, CSVs, plots and report.md here")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    run_only = {"--stages": args.stages}
    checkpoint_only = {"--classes": args.classes, "--config-file": args.config_file, "--dataset": args.dataset,
                       "--num-old": args.num_old or None}
    misplaced = [flag for flag, value in (run_only if args.weights else checkpoint_only).items() if value]
    if misplaced:
        parser.error(f"{', '.join(misplaced)} cannot be used with {'--weights' if args.weights else '--run-dir'}")
    try:
        args.stages = [int(k) for k in args.stages.split(",")] if args.stages else None
    except ValueError:
        parser.error(f"--stages {args.stages}: give comma-separated stage indices, e.g. 0,1")
    return args


def main(argv=None):
    args = parse_args(argv)
    progress = not args.quiet
    if args.output_dir:
        # Any training run's folder, the evaluated one's too (an evaluation's own is re-used).
        require_output_dir(args.output_dir, refuse_records=RUN_RECORDS)
    if args.run_dir:
        results = evaluate_run(args.run_dir, args.output_dir, args.stages, args.opts, progress)
    else:
        if is_onnx_file(args.weights):
            check_onnx_opts(args.weights, args.opts)
        if is_onnx_file(args.weights) and not args.config_file:
            cfg = OnnxDetector(args.weights).config(args.opts)  # the config it was exported with
            config_file = args.weights  # its metadata holds the config: not the default one
        else:
            config_file = args.config_file or run_config_of(args.weights)
            cfg = get_ilmil_cfg(config_file, args.opts)
        cfg.defrost()
        if args.dataset:
            cfg.ILMIL.DATASET = args.dataset
        if not config_file:
            check_default_config_fits(args.weights, cfg)
        classes = class_names_flag("--classes", args.classes) if args.classes else None
        results = evaluate_checkpoint(cfg, args.weights, classes, args.num_old, args.output_dir, progress)
    print(format_results_table(results))
    if args.output_dir:
        print(f"results, detections, plots and report.md written to {args.output_dir}")


if __name__ == "__main__":
    sys.exit(run_tool_main(main))
