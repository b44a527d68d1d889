#!/usr/bin/env python
"""Run a trained model on your own images: each image written with its boxes, class
names and scores drawn, and every detection in one COCO-format json.

    python tools/predict.py --weights OUT/stage_1/model_final.pth --input photos/ --output-dir preds/
    python tools/predict.py --weights P/model_pruned.pth --config-file OUT/config.yaml \\
        --input street.jpg --output-dir preds/ --score-thresh 0.5 --max-detections 20

The detector, its classes and its channel layout (pruned or not) come from the
checkpoint and the config.yaml of its run folder (--config-file when it has none).
A .onnx file of tools/export.py runs through ONNX Runtime, as on the device, with
the score threshold and detections per image it was exported with (the flags can
only tighten them).
PREDS/detections.json holds ``images``, ``categories`` and ``annotations`` (boxes
[x, y, w, h] in the original image's pixels, with ``score``); pycocotools' COCO()
loads it. Trailing KEY VALUE pairs override config keys (e.g. MODEL.DEVICE cuda).
"""
import argparse
import sys

import ilmil  # noqa: F401  (detectron2 compatibility adjustments come first)
from ilmil.checkpoint import is_onnx_file
from ilmil.deploy import input_images, load_onnx_model, load_trained_model, predict_images
from ilmil.engine import require_output_dir, run_tool_main, tool_parser


def main(argv=None):
    parser = tool_parser(__doc__)
    parser.add_argument("--weights", required=True,
                        help="a checkpoint written by ilmil's tools, or a .onnx file of tools/export.py")
    parser.add_argument("--input", required=True, help="an image, or a folder of images")
    parser.add_argument("--output-dir", required=True, help="where the drawn images and detections.json go")
    parser.add_argument("--config-file", help="the config the model was trained with (default: its run's config.yaml)")
    parser.add_argument("--score-thresh", type=float,
                        help="detections below this score are dropped (default 0.3, or the detector's "
                             "SCORE_THRESH_TEST key given as KEY VALUE; a .onnx file: its own)")
    parser.add_argument("--max-detections", type=int,
                        help="detections kept per image (default 100, or TEST.DETECTIONS_PER_IMAGE given "
                             "as KEY VALUE; a .onnx file: its own)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    if args.score_thresh is not None and not 0 <= args.score_thresh < 1:
        parser.error(f"--score-thresh {args.score_thresh}: give a score in [0, 1)")
    if args.max_detections is not None and args.max_detections < 1:
        parser.error(f"--max-detections {args.max_detections}: give 1 or more")
    onnx = is_onnx_file(args.weights)
    if onnx and args.config_file:
        parser.error("--config-file: a .onnx file holds the config it was exported with; give none")
    paths = input_images(args.input)
    require_output_dir(args.output_dir)
    if onnx:  # an exported model, run by ONNX Runtime as on the device
        trained = load_onnx_model(args.weights, args.opts, args.score_thresh, args.max_detections)
    else:
        # The flags' defaults apply unless the detector's own keys are given as KEY VALUE.
        trained = load_trained_model(args.weights, args.config_file, args.opts, args.score_thresh,
                                     args.max_detections, default_limits=(0.3, 100))
    path = predict_images(trained, paths, args.output_dir, progress=not args.quiet)
    print(f"{len(paths)} image(s) with their detections drawn and {path} written")


if __name__ == "__main__":
    sys.exit(run_tool_main(main))
