#!/usr/bin/env python
"""Export a trained model to ONNX and check it against PyTorch in ONNX Runtime.

    python tools/export.py --weights OUT/stage_0/model_final.pth --format onnx --output model.onnx
    python tools/export.py --weights P/model_pruned.pth --config-file OUT/config.yaml --output small.onnx \\
        --dynamic --check-images 16

The whole detector goes into the file, post-processing (NMS) included: input a
float32 [3, H, W] image in the config's INPUT.FORMAT, resized as at test time;
outputs boxes, scores, classes (README, Deploying a model). Fixed input size by default
(--input-size H W; default the test-time maximum, rounded up to 32), any size with
--dynamic. A pruned model is exported at its real widths. Before it replaces --output,
the file runs in ONNX Runtime on --check-images test images of the model's dataset:
each PyTorch detection is matched by an ONNX one of the same class whose box is within
--tolerance (relative) and a score within 1e-3; every detection of score >= 0.5 and
99 % of all must be matched, and every ONNX detection of score >= 0.5 must match a
PyTorch one. The figures are printed and written to model.check.json. A file that fails
the check stays beside it as model.unchecked.onnx (with model.unchecked.check.json),
and a model.onnx of before is left as it was.
"""
import argparse
import os
import sys

import ilmil  # noqa: F401  (detectron2 compatibility adjustments come first)
from ilmil.checkpoint import is_onnx_file
from ilmil.config import derived_cfg
from ilmil.data import load_dataset_source
from ilmil.deploy import (DeployError, OnnxDetector, check_export, check_file, export_onnx, load_trained_model,
                          preprocess, write_check)
from ilmil.deploy.onnx_export import export_size
from ilmil.deploy.predict import read_image
from ilmil.engine import require_output_dir, run_tool_main, tool_parser


def main(argv=None):
    parser = tool_parser(__doc__)
    parser.add_argument("--weights", required=True, help="a checkpoint written by ilmil's tools")
    parser.add_argument("--format", default="onnx", choices=["onnx"], help="the export format")
    parser.add_argument("--output", required=True, help="the .onnx file to write")
    parser.add_argument("--config-file", help="the config the model was trained with (default: its run's config.yaml)")
    parser.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"), help="fixed input size")
    parser.add_argument("--dynamic", action="store_true", help="any input size instead of a fixed one")
    parser.add_argument("--check-images", type=int, default=8, help="test images of the check")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="largest relative box difference of the check")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    if args.dynamic and args.input_size:
        parser.error("--dynamic and --input-size exclude each other")
    if args.input_size and min(args.input_size) < 1:
        parser.error(f"--input-size {' '.join(map(str, args.input_size))}: give a height and width of 1 px or more")
    if args.check_images < 1:
        parser.error(f"--check-images {args.check_images}: the check needs 1 image or more")
    if not is_onnx_file(args.output):
        raise DeployError(f"--output {args.output}: give a .onnx file name")
    if os.path.isdir(args.output):
        raise DeployError(f"--output {args.output} is a folder; fix: give a .onnx file name")
    require_output_dir(os.path.dirname(os.path.abspath(args.output)), flag="--output")
    trained = load_trained_model(args.weights, args.config_file, args.opts)
    # The check's images (a few test images: the whole-dataset image check of a training run is skipped)
    # and their fit in a fixed size, before the export.
    source = load_dataset_source(derived_cfg(trained.cfg, {"ILMIL.DATA.CHECK_IMAGES": False}), splits=("test",))
    images = [preprocess(trained.cfg, read_image(r["file_name"], trained.cfg.INPUT.FORMAT))
              for r in source.test[: args.check_images]]
    if not args.dynamic:
        height, width = export_size(trained.cfg, args.input_size)
        largest = (max(i.shape[1] for i in images), max(i.shape[2] for i in images))
        if largest[0] > height or largest[1] > width:
            raise DeployError(f"--input-size {height} {width}: the model's test-time resize (INPUT.MIN_SIZE_TEST "
                              f"{trained.cfg.INPUT.MIN_SIZE_TEST}, MAX_SIZE_TEST {trained.cfg.INPUT.MAX_SIZE_TEST}) "
                              f"gives inputs up to {largest[0]} x {largest[1]} px; fix: a larger --input-size, "
                              "or --dynamic")
    unchecked = args.output[: -len(".onnx")] + ".unchecked.onnx"
    metadata = export_onnx(trained, unchecked, args.input_size, args.dynamic)
    size = "dynamic" if args.dynamic else "x".join(map(str, metadata["input_size"]))
    print(f"exported {args.weights} ({trained.cfg.MODEL.META_ARCHITECTURE}, {len(trained.class_names)} classes, "
          f"input {size}) to {unchecked} ({os.path.getsize(unchecked) / 2**20:.1f} MiB)")
    figures = check_export(trained, OnnxDetector(unchecked), images, args.tolerance)
    if figures["passed"]:
        # The model first, then its figures: a crash between the two leaves no figures beside another file.
        os.replace(unchecked, args.output)
        stale = check_file(unchecked)  # of a failed export before, whose file is gone
        if os.path.isfile(stale):
            os.remove(stale)
    path = write_check(args.output if figures["passed"] else unchecked, figures)
    print(f"check on {figures['images']} {source.name} test images: {figures['detections_matched']} of "
          f"{figures['detections_compared']} PyTorch detections matched by class (of score >= 0.5: "
          f"{figures['confident_detections_matched']} of {figures['confident_detections_compared']}; ONNX "
          f"detections of score >= 0.5 with no PyTorch match: {figures['confident_onnx_detections_unmatched']}), "
          f"largest relative box difference "
          f"{figures['max_relative_box_difference']:.2e} (tolerance {args.tolerance:g}), largest score difference "
          f"{figures['max_score_difference']:.2e}; written to {path}")
    if not figures["detections_compared"]:
        print(f"warning: the model detected nothing on these {figures['images']} images, so the check compared no "
              "boxes; check it on more images (--check-images N) or train the model further", file=sys.stderr)
    if not figures["passed"]:
        padded = not args.dynamic and any(tuple(i.shape[1:]) != tuple(metadata["input_size"]) for i in images)
        if padded:
            fix = "export with --dynamic: the fixed size pads these images, and the padding changes the detections"
        elif args.dynamic:
            fix = "export with a fixed --input-size, or report the detector with the check's figures"
        else:
            fix = "report the detector with the check's figures"
        raise DeployError(f"{unchecked}: ONNX Runtime does not reproduce the PyTorch model ({path}); the file is "
                          f"kept for inspection, {args.output} is left as it was; fix: {fix}")
    print(f"{args.output} written")


if __name__ == "__main__":
    sys.exit(run_tool_main(main))
