"""Every mistake in a tool's input ends in one line: ``error: <what, where>; <fix>`` on
stderr, exit status 1, no traceback, nothing trained and no file overwritten.

Each case builds its bad input under ``tmp_path`` and runs the tool's entry in this
process; a few, one per tool and kind of check, run it as a real subprocess, so that the
process's own output (exit status, a warning at import, a traceback) is held to the same
line. All of them fail in the checks before any training.
"""
import json
import logging
import os
import signal
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.utils import comm

from conftest import TINY_SHAPES
from ilmil.config import CONFIGS_DIR, ConfigError, get_ilmil_cfg
from ilmil.data.shapes import shape_class_names
from ilmil.engine import IncrementalRun
from ilmil.modeling import build_detector
from ilmil.pruning import channel_layout
from tool_runs import (SHAPES_OPTS, TRAIN_OPTS, checkpoint_iteration, kill_when_exists, run_tool, run_tool_here, start_tool,
                       tail)
from voc_coco_files import write_coco_json, write_voc_folder

SHAPES = shape_class_names(TINY_SHAPES["num_classes"])
# Files that a refused run must leave as they were, wherever it points.
OUTPUTS = ("model_final.pth", "results.json", "stages.json", "run.json", "config.yaml")


@dataclass
class Bad:
    """A case's command line, what the error line must name, and files it must not change."""

    args: list
    names: str
    kept: tuple = ()


@dataclass
class Case:
    tool: str
    build: Callable  # (tmp_path, checkpoints) -> Bad


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """Detector checkpoints of the tiny shapes' first two classes, written as the tools
    write them (a state dict and the class names), without training: a good one, one
    of two other classes, one of another architecture, and a truncated one."""
    folder = tmp_path_factory.mktemp("checkpoints")

    def save(name, classes, *opts):
        cfg = get_ilmil_cfg(opts=["MODEL.ROI_HEADS.NUM_CLASSES", len(classes), *opts])
        path = folder / name
        torch.save({"model": build_detector(cfg).state_dict(), "ilmil": {"class_names": list(classes)}}, path)
        return path

    good = save("good.pth", SHAPES[:2])
    # As the tools write it, with its channel layout: a Faster R-CNN's names its box head's layers.
    cfg = get_ilmil_cfg(opts=["MODEL.ROI_HEADS.NUM_CLASSES", 2])
    model = build_detector(cfg)
    recorded = folder / "faster_rcnn_with_layout.pth"
    torch.save({"model": model.state_dict(), "ilmil": {"class_names": list(SHAPES[:2]),
                                                       "channel_layout": channel_layout(model)}}, recorded)
    truncated = folder / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    return {
        "good": good,
        "other_classes": save("other_classes.pth", SHAPES[2:4]),
        "other_architecture": save("other_architecture.pth", SHAPES[:2], "MODEL.FPN.OUT_CHANNELS", 32),
        "truncated": truncated,
        "faster_rcnn_with_layout": recorded,
        "missing": folder / "missing.pth",
    }


# ------------------------------------------------------------ train_incremental.py


def _train(tmp_path, *args):
    return ["--stages", "2+2", "--output-dir", str(tmp_path / "out"), *args, *SHAPES_OPTS, *TRAIN_OPTS]


def _choice(*args, names):
    return Case("train_incremental.py", lambda tmp_path, _: Bad(_train(tmp_path, *args), names))


def _shapes_key(key, value, names):  # after the tiny set's own values (ILMIL.SHAPES, SOLVER), so it wins
    return Case("train_incremental.py", lambda tmp_path, _: Bad([*_train(tmp_path), key, value], names))


def _written(path, text):
    path.write_text(text)
    return path


def _config_file(text, names):
    def build(tmp_path, _):
        config = tmp_path / "config.yaml"
        config.write_text(text)
        return Bad(_train(tmp_path, "--config-file", str(config)), f"--config-file {config}{names}")
    return Case("train_incremental.py", build)


def _output_dir_is_a_file(tmp_path, _):
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    return Bad(["--stages", "2+2", "--output-dir", str(taken), *SHAPES_OPTS], f"--output-dir {taken} is a file",
               kept=(taken,))


def _output_dir_in_a_file(tmp_path, _):
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    out = taken / "out"
    return Bad(["--stages", "2+2", "--output-dir", str(out), *SHAPES_OPTS], f"--output-dir {out} is not writable",
               kept=(taken,))


def _existing_run_kept(tmp_path, _):
    """A bad option aimed at a folder with a run in it leaves the run's files alone."""
    out = tmp_path / "out"
    out.mkdir()
    kept = []
    for name in ("results.json", "config.yaml", "run.json"):
        (out / name).write_text("{}")
        kept.append(out / name)
    return Bad(_train(tmp_path, "ILMIL.DISTILL.FEAT.DISTANCE", "cosine"), "ILMIL.DISTILL.FEAT.DISTANCE 'cosine'",
               kept=tuple(kept))


def _other_run_kept(tmp_path, _):
    """A good command aimed at another run's folder leaves its files alone (its config.yaml too)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"identity": {"dataset": "voc_2007"}, "created": "2026-12-01"}))
    (out / "config.yaml").write_text("the other run's config")
    return Bad(_train(tmp_path), "this folder holds another run (dataset: 'voc_2007' there",
               kept=(out / "run.json", out / "config.yaml"))


COCO_CLASSES = {1: "cat", 2: "dog"}


def _coco_images(root, name):
    boxes = [{"category_id": 1, "bbox": [2, 2, 20, 20]}, {"category_id": 2, "bbox": [30, 10, 20, 20]}]
    return [(1, f"{name}_a.jpg", 64, 48, boxes), (2, f"{name}_b.jpg", 64, 48, boxes)]


def _coco(tmp_path, corrupt):
    """A coco_json run whose training json ``corrupt(path, images folder)`` spoils; returns
    the arguments and the spoiled file."""
    images = tmp_path / "images"
    train = write_coco_json(tmp_path / "train.json", images, _coco_images(images, "train"), COCO_CLASSES)
    test = write_coco_json(tmp_path / "test.json", images, _coco_images(images, "test"), COCO_CLASSES)
    corrupt(train, images)
    args = ["--dataset", "coco_json", "--stages", "1+1", "--output-dir", str(tmp_path / "out"),
            "ILMIL.DATA.TRAIN_JSON", train, "ILMIL.DATA.TRAIN_IMAGES", str(images),
            "ILMIL.DATA.TEST_JSON", test, "ILMIL.DATA.TEST_IMAGES", str(images), *TRAIN_OPTS]
    return args, train


def _coco_case(corrupt, names):
    def build(tmp_path, _):
        args, train = _coco(tmp_path, corrupt)
        return Bad(args, f"{train}: {names}")
    return Case("train_incremental.py", build)


def _rewrite_json(change):
    def corrupt(path, _):
        with open(path) as f:
            data = json.load(f)
        change(data)
        with open(path, "w") as f:
            json.dump(data, f)
    return corrupt


def _truncate(path, _):
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(text[: len(text) // 2])


def _empty(path, _):
    open(path, "w").close()


def _write(text):
    def corrupt(path, _):
        with open(path, "w") as f:
            f.write(text)
    return corrupt


def _duplicate_name(data):
    data["categories"][1]["name"] = "cat"


def _duplicate_id(data):
    data["categories"][1]["id"] = 1


def _truncate_image(path, images):
    image = os.path.join(images, "train_b.jpg")
    with open(image, "rb") as f:
        data = f.read()
    with open(image, "wb") as f:
        f.write(data[: len(data) // 2])


def _undecodable_image(tmp_path, _):
    args, train = _coco(tmp_path, _truncate_image)
    return Bad(args, f"{train}: image file {tmp_path / 'images' / 'train_b.jpg'} does not decode")


def _voc_case(text, names):
    def build(tmp_path, _):
        images = {"a": (64, 48, [{"name": "cat", "box": (3, 3, 20, 20)}, {"name": "dog", "box": (30, 10, 50, 30)}]),
                  "b": (64, 48, [{"name": "cat", "box": (3, 3, 20, 20)}, {"name": "dog", "box": (30, 10, 50, 30)}])}
        root = write_voc_folder(tmp_path / "voc", images, {"trainval": ["a", "b"], "test": ["a", "b"]})
        xml = tmp_path / "voc" / "Annotations" / "b.xml"
        xml.write_text(text(xml.read_text()))
        args = ["--dataset", "voc_folder", "--stages", "1+1", "--output-dir", str(tmp_path / "out"),
                "ILMIL.DATA.ROOT", root, *TRAIN_OPTS]
        return Bad(args, f"{xml}: {names}")
    return Case("train_incremental.py", build)


def _no_test_image(tmp_path, _):
    args, _ = _coco(tmp_path, lambda path, images: None)
    test = tmp_path / "test.json"
    write_coco_json(test, tmp_path / "images", [], COCO_CLASSES)
    return Bad(args, f"{test}: no test image; fix: list the test images in its 'images'")


def _voc_split_repeats_an_id(tmp_path, _):
    images = {file_id: (64, 48, [{"name": name, "box": (3, 3, 20, 20)}]) for file_id, name in (("a", "cat"), ("b", "dog"))}
    root = write_voc_folder(tmp_path / "voc", images, {"trainval": ["a", "b"], "test": ["a", "b", "a"]})
    split = tmp_path / "voc" / "ImageSets" / "Main" / "test.txt"
    return Bad(["--dataset", "voc_folder", "--stages", "1+1", "--output-dir", str(tmp_path / "out"),
                "ILMIL.DATA.ROOT", root, *TRAIN_OPTS], f"{split}: lines 1 and 3 both list 'a'")


def _teacher(kind, names, *args):
    def build(tmp_path, checkpoints):
        weights = checkpoints[kind]
        args_ = _train(tmp_path, "--start-stage", "1", "--teacher-weights", str(weights), *args)
        return Bad(args_, f"{weights}{names}", kept=(checkpoints["good"],))
    return Case("train_incremental.py", build)


# ------------------------------------------------------------ eval_incremental.py


def _eval_weights(kind, names, *args):
    def build(tmp_path, checkpoints):
        weights = checkpoints[kind]
        return Bad(["--weights", str(weights), "--quiet", *args, *SHAPES_OPTS, *TRAIN_OPTS], f"{weights}{names}")
    return Case("eval_incremental.py", build)


def _not_a_run(tmp_path, _):
    folder = tmp_path / "not_a_run"
    folder.mkdir()
    return Bad(["--run-dir", str(folder)], f"--run-dir {folder}: stages.json not found")


def _bad_schedule(tmp_path, _):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "config.yaml").write_text("ILMIL:\n  DATASET: shapes\n")
    (folder / "stages.json").write_text('{"stages": [')
    return Bad(["--run-dir", str(folder)], f"{folder / 'stages.json'} is not a run's schedule")


def _eval_output_dir_is_a_file(tmp_path, checkpoints):
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    args = ["--weights", str(checkpoints["good"]), "--output-dir", str(taken), *SHAPES_OPTS]
    return Bad(args, f"--output-dir {taken} is a file", kept=(taken,))


# ------------------------------------------------------------ prune.py


def _prune(names, *args, kind="good"):
    def build(tmp_path, checkpoints):
        out = tmp_path / "pruned"
        argv = ["--weights", str(checkpoints[kind]), "--output-dir", str(out), *args, *SHAPES_OPTS, *TRAIN_OPTS]
        return Bad(argv, names.format(weights=checkpoints[kind], out=out))
    return Case("prune.py", build)


def _prune_output_dir_is_a_file(tmp_path, checkpoints):
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    args = ["--weights", str(checkpoints["good"]), "--ratio", "0.3", "--output-dir", str(taken), *SHAPES_OPTS]
    return Bad(args, f"--output-dir {taken} is a file", kept=(taken,))


# ------------------------------------------------------------ plot_forgetting.py


def _plot(write, names):
    def build(tmp_path, _):
        run = tmp_path / "run"
        run.mkdir()
        if write is not None:
            (run / "results.json").write_text(write)
        return Bad([str(run), "--out", str(tmp_path / "plots")], names.format(results=run / "results.json"))
    return Case("plot_forgetting.py", build)


def _plot_out_is_a_file(tmp_path, _):
    run = tmp_path / "run"
    run.mkdir()
    stage = {"stage": 0, "old_classes": [], "new_classes": ["cat"], "per_class": {"cat": {"AP50": 50.0}}, "AP50": 50.0}
    (run / "results.json").write_text(json.dumps(
        {"method": "finetune", "dataset": "shapes", "stages_spec": "1", "stages": [stage]}))
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    return Bad([str(run), "--out", str(taken)], f"--out {taken} is a file", kept=(taken,))


CASES = {
    # unknown choices
    "method": _choice("--method", "nope", names="--method 'nope'"),
    # argparse's own refusals: one line too, no usage text.
    "seed_not_a_number": _choice("--seed", "abc", names="argument --seed: invalid int value: 'abc'; fix: see "),
    "dataset": _choice("--dataset", "nope", names="unknown dataset 'nope'"),
    "distance": _choice("ILMIL.DISTILL.FEAT.DISTANCE", "cosine", names="ILMIL.DISTILL.FEAT.DISTANCE 'cosine'"),
    "optimizer": _choice("SOLVER.OPTIMIZER", "Adam", names="SOLVER.OPTIMIZER 'Adam'"),
    "precision": _choice("ILMIL.TEACHER.PRECISION", "half", names="ILMIL.TEACHER.PRECISION 'half'"),
    "shapes_image_size": _shapes_key("ILMIL.SHAPES.IMAGE_SIZE", "32", "ILMIL.SHAPES.IMAGE_SIZE 32: the shapes are "
                                                                     "drawn on images of 64 px or more; fix: e.g. 256"),
    "shapes_num_train": _shapes_key("ILMIL.SHAPES.NUM_TRAIN", "-5", "ILMIL.SHAPES.NUM_TRAIN -5: a count or seed"),
    "device_name": _choice("MODEL.DEVICE", "gpu", names="MODEL.DEVICE 'gpu' is not a device name; fix: cpu, cuda"),
    "amp_on_cpu": _choice("SOLVER.AMP.ENABLED", "True", names="SOLVER.AMP.ENABLED True needs a CUDA device, got "
                                                              "MODEL.DEVICE 'cpu'"),
    "stage_images": _choice("ILMIL.STAGE_IMAGES", "disjoint", names="ILMIL.STAGE_IMAGES 'disjoint'"),
    "prune_ratio": _choice("--prune", "1.5", names="ILMIL.PRUNING.RATIO (--ratio, --prune) 1.5"),
    # Pruning that would never happen: after the last stage, before the run's first, in a one-stage run.
    "prune_after_last_stage": _choice("--prune", "0.3", "ILMIL.PRUNING.AFTER_STAGE", "1",
                                      names="ILMIL.PRUNING.AFTER_STAGE 1: this run's stages a later stage starts "
                                            "from are 0..0; fix: one of those"),
    "prune_after_negative_stage": _choice("--prune", "0.3", "ILMIL.PRUNING.AFTER_STAGE", "-1",
                                          names="ILMIL.PRUNING.AFTER_STAGE -1"),
    "prune_joint": _choice("--prune", "0.3", "--method", "joint", names="this run has one stage (--method joint"),
    # Pruning that cannot happen: a backbone without ResNet blocks, GroupNorm in the blocks.
    "prune_darknet": _choice("--prune", "0.3", "--config-file", os.path.join(CONFIGS_DIR, "shapes", "yolov3_cpu.yaml"),
                             names="MODEL.BACKBONE.NAME build_darknet_backbone has no ResNet residual blocks"),
    "prune_groupnorm": _choice("--prune", "0.3", "MODEL.RESNETS.NORM", "GN",
                               names="MODEL.RESNETS.NORM GN cannot be narrowed"),
    # config files and overrides
    "config_missing": Case("train_incremental.py", lambda tmp_path, _: Bad(
        _train(tmp_path, "--config-file", str(tmp_path / "nope.yaml")), f"--config-file {tmp_path / 'nope.yaml'}")),
    "config_not_yaml": _config_file("MODEL:\n  DEVICE: [cpu\n", " is not valid YAML"),
    "config_empty": _config_file("", " holds nothing, not a mapping"),
    "config_unknown_key": _config_file("VERSION: 2\nSOLVER:\n  MAX_ITERS: 5\n",
                                       ": Non-existent config key: SOLVER.MAX_ITERS"),
    "lr_step_at_max_iter": _shapes_key("SOLVER.STEPS", "(6,)", "SOLVER.STEPS (6,) with SOLVER.MAX_ITER 6: the "
                                                                "learning-rate steps must increase and lie between 0"),
    "lr_step_at_0": _shapes_key("SOLVER.STEPS", "(0,)", "SOLVER.STEPS (0,) with SOLVER.MAX_ITER 6"),
    "lr_steps_not_increasing": _shapes_key("SOLVER.STEPS", "(4, 3)", "SOLVER.STEPS (4, 3) with SOLVER.MAX_ITER 6"),
    "override_unknown_key": _choice("SOLVER.MAX_ITERS", "5", names="config override SOLVER.MAX_ITERS"),
    "override_without_value": Case("train_incremental.py", lambda tmp_path, _: Bad(
        ["--stages", "2+2", "--output-dir", str(tmp_path / "out"), "SOLVER.MAX_ITER"], "SOLVER.MAX_ITER")),
    "override_wrong_type": _choice("SOLVER.MAX_ITER", "many", names="for config key: SOLVER.MAX_ITER"),
    # Values of the right type that torch, fvcore or detectron2 refuse with a traceback (some at
    # the first checkpoint or the first evaluation).
    "base_lr_negative": _shapes_key("SOLVER.BASE_LR", "-1", "SOLVER.BASE_LR -1.0: must be 0 or above; fix: e.g."),
    "max_iter_zero": _shapes_key("SOLVER.MAX_ITER", "0", "SOLVER.MAX_ITER 0: must be at least 1"),
    "checkpoint_period_zero": _shapes_key("SOLVER.CHECKPOINT_PERIOD", "0", "SOLVER.CHECKPOINT_PERIOD 0: must be"),
    "num_workers_negative": _shapes_key("DATALOADER.NUM_WORKERS", "-1", "DATALOADER.NUM_WORKERS -1: must be"),
    "input_format": _shapes_key("INPUT.FORMAT", "XYZ", "INPUT.FORMAT 'XYZ': choose one of BGR, RGB"),
    "min_size_test_negative": _shapes_key("INPUT.MIN_SIZE_TEST", "-5", "INPUT.MIN_SIZE_TEST -5: must be"),
    "yolo_no_anchors_per_level": Case("train_incremental.py", lambda tmp_path, _: Bad([
        *_train(tmp_path, "--config-file", os.path.join(CONFIGS_DIR, "shapes", "yolov3_cpu.yaml")),
        "MODEL.YOLO.ANCHORS", "[]", "MODEL.YOLO.NUM_ANCHORS", "0"], "MODEL.YOLO.NUM_ANCHORS 0: must be at least 1")),
    # MODEL keys detectron2 asserts on (or looks up in a table) when it builds the model.
    "anchor_sizes_per_level": _shapes_key("MODEL.ANCHOR_GENERATOR.SIZES", "[[12], [24]]",
                                          "cannot be built from the config's MODEL keys (AssertionError: Got sizes "
                                          "of length 2 in anchor generator"),
    "resnet_depth": _shapes_key("MODEL.RESNETS.DEPTH", "19", "MODEL keys (KeyError: 19)"),
    # Contradicting flags, or a flag and the key it sets (the flag would silently win).
    "resume_and_force": _choice("--resume", "--force", names="--resume and --force together"),
    "stages_flag_and_key": _choice("ILMIL.STAGES", "3", names="--stages and ILMIL.STAGES both given"),
    "prune_flag_and_key": _choice("--prune", "0.3", "ILMIL.PRUNING.RATIO", "0.5",
                                  names="--prune and ILMIL.PRUNING.RATIO both given"),
    "output_dir_flag_and_key": _choice("OUTPUT_DIR", "elsewhere", names="--output-dir and OUTPUT_DIR both given"),
    "stage_ratios_replace_prune": _choice("--prune", "0.3", "ILMIL.PRUNING.STAGE_RATIOS", "[0, 0, 0, 0]",
                                          names="replace ILMIL.PRUNING.RATIO (--ratio, --prune) 0.3: nothing would"),
    "stages_beyond_class_order": _choice("--class-order", ",".join(SHAPES[:2]), names="stage spec '2+2' needs 4 "
                                         "classes but ILMIL.CLASS_ORDER (--class-order) has 2; fix: lower the counts"),
    # argparse hands the overrides every argument after the first KEY, a flag too.
    "flag_after_overrides": Case("train_incremental.py", lambda tmp_path, _: Bad(
        [*_train(tmp_path), "--resume", "--force"], "--resume --force after the KEY VALUE config overrides is "
                                                    "read as one of them; fix: put the flags before the overrides")),
    # A required flag after the overrides is named as misplaced, not as missing.
    "output_dir_after_overrides": Case("train_incremental.py", lambda tmp_path, _: Bad(
        ["--stages", "2+2", *SHAPES_OPTS, "--output-dir", tmp_path / "out"], "--output-dir after the KEY VALUE config "
                                                                              "overrides is read as one of them")),
    "output_dir_missing": Case("train_incremental.py", lambda tmp_path, _: Bad(
        ["--stages", "2+2", *SHAPES_OPTS], "--output-dir not given; fix: add --output-dir ...")),
    "class_order_empty_name": _choice("--class-order", f"{SHAPES[0]},", names=f"--class-order '{SHAPES[0]},': an "
                                                                              "empty class name"),
    "compression_teacher_missing": Case("train_compression.py", lambda tmp_path, _: Bad(
        ["--stages", "2", "--output-dir", tmp_path / "out", *SHAPES_OPTS], "--teacher-weights not given")),
    "compression_teacher_config_empty": Case("train_compression.py", lambda tmp_path, checkpoints: Bad(
        ["--stages", "2", "--output-dir", tmp_path / "out", "--teacher-weights", checkpoints["good"],
         "--teacher-config", _written(tmp_path / "empty.yaml", ""), *SHAPES_OPTS, *TRAIN_OPTS],
        f"ILMIL.TEACHER.CONFIG_FILE (--teacher-config) {tmp_path / 'empty.yaml'} holds nothing")),
    # output folders
    "output_dir_is_a_file": Case("train_incremental.py", _output_dir_is_a_file),
    "output_dir_not_writable": Case("train_incremental.py", _output_dir_in_a_file),
    "existing_run_untouched": Case("train_incremental.py", _existing_run_kept),
    "other_run_untouched": Case("train_incremental.py", _other_run_kept),
    # annotation files
    "coco_truncated": _coco_case(_truncate, "not valid JSON"),
    "coco_empty": _coco_case(_empty, "empty file"),
    "coco_top_level_list": _coco_case(_write("[]"), "the top level is a list"),
    "coco_category_without_name": _coco_case(_rewrite_json(lambda d: d["categories"][1].pop("name")),
                                             "categories[1] lacks field(s) 'name'"),
    "coco_duplicate_names": _coco_case(_rewrite_json(_duplicate_name),
                                       "categories with ids 1 and 2 share the name 'cat'"),
    "coco_duplicate_ids": _coco_case(_rewrite_json(_duplicate_id),
                                     "categories with names 'cat' and 'dog' share the id 1"),
    "no_test_image": Case("train_incremental.py", _no_test_image),
    "voc_split_repeats_an_id": Case("train_incremental.py", _voc_split_repeats_an_id),
    "voc_truncated": _voc_case(lambda xml: xml[: len(xml) // 2], "not valid XML"),
    "voc_wrong_top_level": _voc_case(lambda xml: xml.replace("annotation>", "image>"),
                                     "top-level element <image>, not <annotation>"),
    "voc_size_not_a_number": _voc_case(lambda xml: xml.replace("<width>64<", "<width>wide<"),
                                       "field <width> 'wide' is not a number"),
    "image_undecodable": Case("train_incremental.py", _undecodable_image),
    # teacher weights
    "teacher_missing": _teacher("missing", " not found"),
    "teacher_truncated": _teacher("truncated", " ("),
    "teacher_other_classes": _teacher("other_classes", f" holds {SHAPES[2:4]}, but the schedule expects"),
    "teacher_other_architecture": _teacher("other_architecture", " does not fit the config's model"),
    "teacher_other_detector": _teacher("faster_rcnn_with_layout", " does not fit the config's model: the channel "
                                       "layout names layers this model does not have",
                                       "--config-file", os.path.join(CONFIGS_DIR, "shapes", "fcos_R18_FPN_cpu.yaml")),
    # eval_incremental.py
    "eval_weights_missing": _eval_weights("missing", " not found"),
    "eval_weights_a_folder": Case("eval_incremental.py", lambda tmp_path, checkpoints: Bad(
        ["--weights", str(tmp_path), "--quiet", *SHAPES_OPTS, *TRAIN_OPTS], f"{tmp_path} is a folder, not a file")),
    "teacher_without_start_stage": Case("train_incremental.py", lambda tmp_path, checkpoints: Bad(
        _train(tmp_path, "--teacher-weights", str(checkpoints["good"])),
        f"--teacher-weights {checkpoints['good']} without --start-stage: stage 0 learns from no teacher; fix: add "
        "--start-stage K")),
    "method_flag_and_key": _choice("--method", "ilmil", "ILMIL.METHOD", "finetune",
                                   names="--method and ILMIL.METHOD both given"),
    # A run's config.yaml holds its method's preset: another --method's would be overridden by it.
    "method_other_than_the_config_files": Case("train_incremental.py", lambda tmp_path, _: Bad(
        _train(tmp_path, "--method", "finetune", "--config-file",
               str(_written(tmp_path / "run_config.yaml", 'ILMIL:\n  METHOD: "ilmil"\n'))),
        f"--config-file {tmp_path / 'run_config.yaml'} is a config of method ilmil (its ILMIL.METHOD), whose keys "
        "would override those of finetune")),
    "config_base_missing": _config_file('_BASE_: "nope.yaml"\n', ": its _BASE_ cannot be read ("),
    "lr_scheduler_unknown": _shapes_key("SOLVER.LR_SCHEDULER_NAME", "WarmupCosine", "SOLVER.LR_SCHEDULER_NAME "
                                        "'WarmupCosine': choose one of WarmupMultiStepLR, WarmupCosineLR"),
    "config_a_folder": Case("train_incremental.py", lambda tmp_path, _: Bad(
        _train(tmp_path, "--config-file", str(tmp_path)), f"--config-file {tmp_path}: a folder, not a file")),
    "eval_weights_other_classes": _eval_weights("good", f" holds {SHAPES[:2]}, but it is evaluated on",
                                                "--classes", ",".join(SHAPES[2:4])),
    "eval_weights_other_architecture": _eval_weights("other_architecture", " does not fit the config's model"),
    "eval_config_missing": Case("eval_incremental.py", lambda tmp_path, checkpoints: Bad(
        ["--weights", str(checkpoints["good"]), "--config-file", str(tmp_path / "nope.yaml")],
        f"--config-file {tmp_path / 'nope.yaml'}: no such file")),
    "eval_not_a_run": Case("eval_incremental.py", _not_a_run),
    "eval_bad_schedule": Case("eval_incremental.py", _bad_schedule),
    "eval_output_dir_is_a_file": Case("eval_incremental.py", _eval_output_dir_is_a_file),
    "eval_min_size_test_negative": Case("eval_incremental.py", lambda tmp_path, checkpoints: Bad(
        ["--weights", str(checkpoints["good"]), "--quiet", *SHAPES_OPTS, *TRAIN_OPTS, "INPUT.MIN_SIZE_TEST", "-5"],
        "INPUT.MIN_SIZE_TEST -5: must be")),
    # prune.py
    "prune_weights_missing": _prune("{weights} not found", kind="missing"),
    "prune_three_stage_ratios": _prune("--stage-ratios) [0.1, 0.2, 0.3]: needs 4 values", "--stage-ratios",
                                       "0.1,0.2,0.3"),
    "prune_output_dir_is_a_file": Case("prune.py", _prune_output_dir_is_a_file),
    "prune_finetune_iters_negative": _prune("ILMIL.PRUNING.FINETUNE_ITERS -5: must be", "--ratio", "0.3",
                                            "--finetune-iters", "-5"),
    # A KEY VALUE override of a key a flag also sets reaches the check when the flag is not given.
    "prune_ratio_override": _prune("ILMIL.PRUNING.RATIO (--ratio, --prune) 1.5", "ILMIL.PRUNING.RATIO", "1.5"),
    # yolo_anchors.py
    "anchors_of_a_faster_rcnn": Case("yolo_anchors.py", lambda tmp_path, _: Bad(
        ["--config-file", os.path.join(CONFIGS_DIR, "shapes", "faster_rcnn_R18_FPN_cpu.yaml"), *SHAPES_OPTS],
        "MODEL.META_ARCHITECTURE IncrementalRCNN has no YOLO anchors")),
    # plot_forgetting.py
    "plot_no_results": _plot(None, "{results} not found"),
    "plot_results_a_list": _plot("[]", "{results} is not a run's results"),
    "plot_out_is_a_file": Case("plot_forgetting.py", _plot_out_is_a_file),
}


def _snapshot(paths):
    return {path: path.read_bytes() for path in paths if path.is_file()}


# The cases run as real subprocesses: each tool, an argument, a config, a dataset and a checkpoint check.
IN_A_SUBPROCESS = ("config_missing", "seed_not_a_number", "override_unknown_key", "coco_truncated", "teacher_truncated",
                   "eval_weights_missing", "prune_weights_missing", "plot_no_results")
# A misspelt name would quietly run its case in-process.
assert set(IN_A_SUBPROCESS) <= set(CASES), set(IN_A_SUBPROCESS) - set(CASES)


@pytest.mark.parametrize("name", CASES)
def test_a_bad_input_ends_in_one_error_line(name, tmp_path, tiny_datasets_root, checkpoints, monkeypatch, capsys):
    case = CASES[name]
    bad = case.build(tmp_path, checkpoints)
    before = _snapshot(bad.kept)
    before_files = {p for p in tmp_path.rglob("*")}
    args = [str(a) for a in bad.args]
    ilmil_logger = logging.getLogger("ilmil")
    logger_before = (ilmil_logger.propagate, ilmil_logger.level, list(ilmil_logger.handlers))
    if name in IN_A_SUBPROCESS:
        proc = run_tool(case.tool, args, tiny_datasets_root, timeout=90)
    else:
        proc = run_tool_here(case.tool, args, tiny_datasets_root, monkeypatch, capsys)
    # A tool run in this process leaves the loggers as they were (later tests read their records).
    assert (ilmil_logger.propagate, ilmil_logger.level, list(ilmil_logger.handlers)) == logger_before
    assert proc.returncode == 1, tail(proc)
    assert "Traceback" not in proc.log, tail(proc)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), tail(proc)
    assert bad.names in lines[0], f"{bad.names!r} not in {lines[0]!r}"
    assert "fix" in lines[0] or "choose one of" in lines[0], lines[0]
    assert _snapshot(bad.kept) == before
    written = {p for p in tmp_path.rglob("*") if p not in before_files and p.is_file()}
    assert not [p for p in written if p.name in OUTPUTS or p.suffix == ".pth" or p.suffix == ".png"], written


def test_an_error_of_ilmils_own_code_while_building_is_not_called_a_config_problem(monkeypatch):
    # A ValueError raised inside the package (here by the shapes' class names, called from
    # YOLO's backbone builder) is a bug: its traceback, not "check the MODEL keys".
    monkeypatch.setitem(BACKBONE_REGISTRY._obj_map, "build_darknet_backbone",
                        lambda cfg, input_shape=None: shape_class_names(0))
    with pytest.raises(ValueError, match="num_classes must be an integer") as raised:
        build_detector(get_ilmil_cfg(os.path.join(CONFIGS_DIR, "shapes", "yolov3_cpu.yaml")))
    assert not isinstance(raised.value, ConfigError)


def test_ctrl_c_ends_in_one_line_and_the_run_resumes(tmp_path, tiny_datasets_root):
    out = tmp_path / "out"
    # 12 iterations a stage: a loaded machine may save a later checkpoint before the Ctrl-C lands.
    args = [*_train(tmp_path, "SOLVER.CHECKPOINT_PERIOD", "2"), "SOLVER.MAX_ITER", "12", "SOLVER.STEPS", "(10,)"]
    log = tmp_path / "interrupted.log"
    status = kill_when_exists(start_tool("train_incremental.py", args, tiny_datasets_root, log),
                              out / "stage_0" / "model_0000001.pth", sig=signal.SIGINT)
    text = log.read_text()
    assert status == 130 and "Traceback" not in text, text[-3000:]
    assert text.strip().splitlines()[-1].startswith("error: interrupted; what was saved is kept"), text[-3000:]
    assert not (out / "stage_0" / "model_final.pth").exists(), "the Ctrl-C came too late: stage 0 had finished"
    interrupted_at = checkpoint_iteration(out / "stage_0")
    proc = run_tool("train_incremental.py", ["--resume", *args], tiny_datasets_root)
    assert proc.returncode == 0, tail(proc)
    assert f"Stage 0: resuming at iteration {interrupted_at + 1}" in proc.log and (out / "results.json").is_file()



def test_a_batch_the_processes_cannot_share_is_refused_before_training(tiny_datasets_root, tmp_path, monkeypatch):
    monkeypatch.setenv("ILMIL_DATASETS", str(tiny_datasets_root))
    monkeypatch.setattr(comm, "get_world_size", lambda: 2)  # as under torchrun with two processes
    cfg = get_ilmil_cfg(None, [*SHAPES_OPTS, *TRAIN_OPTS, "ILMIL.STAGES", "2+2", "OUTPUT_DIR", str(tmp_path / "out"),
                               "SOLVER.IMS_PER_BATCH", 3])
    with pytest.raises(ConfigError, match=r"^SOLVER.IMS_PER_BATCH 3: the batch is split over the 2 processes, so a "
                                          r"multiple of 2; fix: e.g. SOLVER.IMS_PER_BATCH 2$"):
        IncrementalRun(cfg)
