"""Deployment: tools/export.py (ONNX, checked in ONNX Runtime against PyTorch) for each
detector, a pruned model at its real widths, evaluation through ONNX Runtime, and
tools/predict.py on a folder of images; each bad input is one error line."""
import json
import math
import os
import re
import shutil
from collections import Counter
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
import yaml
from PIL import Image
from pycocotools.coco import COCO

from detectron2.structures import Boxes, Instances

from ilmil import deploy
from ilmil.config import CONFIGS_DIR, ConfigError, default_cfg, derived_cfg, get_ilmil_cfg
from ilmil.deploy import load_trained_model
from ilmil.engine import IncrementalRun
from tool_runs import SHAPES_OPTS, TRAIN_OPTS, _tool_module, read_json, run_tool, run_tool_here, tail

CONFIGS = {
    "faster_rcnn": "faster_rcnn_R18_FPN_cpu.yaml",
    "retinanet": "retinanet_R18_FPN_cpu.yaml",
    "fcos": "fcos_R18_FPN_cpu.yaml",
    "yolov3": "yolov3_cpu.yaml",
}
# Six iterations leave every score near its prior: a low threshold gives the check detections to compare.
LOW_THRESH = ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.01", "MODEL.RETINANET.SCORE_THRESH_TEST", "0.01",
              "MODEL.FCOS.SCORE_THRESH_TEST", "0.01", "MODEL.YOLO.SCORE_THRESH_TEST", "0.00001"]
# A small YOLO whose outputs start at a higher prior: after six iterations its scores then
# still differ from place to place (at 0.01, every one is ~1e-4).
SMALL_YOLO = ["MODEL.YOLO.WIDTH_MULTIPLIER", "0.25", "MODEL.YOLO.DEPTH_MULTIPLIER", "0.25",
              "MODEL.YOLO.PRIOR_PROB", "0.3"]


@pytest.fixture(scope="module")
def trained(tiny_datasets_root, tmp_path_factory):
    """detector -> the run folder of a tiny model of 4 classes (trained on first use)."""
    runs = {}

    def get(detector):
        if detector not in runs:
            out = tmp_path_factory.mktemp(detector) / "run"
            proc = run_tool("train_incremental.py", [
                "--config-file", os.path.join(CONFIGS_DIR, "shapes", CONFIGS[detector]), "--stages", "4",
                "--output-dir", str(out), *SHAPES_OPTS, *TRAIN_OPTS, *LOW_THRESH, *SMALL_YOLO,
            ], tiny_datasets_root, timeout=300)
            assert proc.returncode == 0, tail(proc)
            runs[detector] = out
        return runs[detector]

    return get


def _export(run, tiny_datasets_root, output, *args):
    return run_tool("export.py", ["--weights", str(run / "stage_0" / "model_final.pth"), "--output", str(output),
                                  *args, *SHAPES_OPTS, *TRAIN_OPTS], tiny_datasets_root, timeout=300)


@pytest.mark.parametrize("detector", list(CONFIGS))
def test_each_detector_exports_and_onnx_runtime_reproduces_it(detector, trained, tiny_datasets_root, tmp_path):
    output = tmp_path / "model.onnx"
    proc = _export(trained(detector), tiny_datasets_root, output, "--check-images", "2")
    assert proc.returncode == 0, tail(proc)
    check = read_json(tmp_path / "model.check.json")
    assert check["passed"] and check["images"] == 2
    assert check["detections_compared"] > 0 and check["max_relative_box_difference"] <= 1e-3
    assert f"{check['detections_matched']} of {check['detections_compared']}" in proc.stdout
    metadata = {p.key: p.value for p in onnx.load(str(output)).metadata_props}
    info = json.loads(metadata["ilmil"])
    assert len(info["class_names"]) == 4 and info["input_size"] == [128, 128]
    assert "META_ARCHITECTURE" in metadata["ilmil.config"]
    assert not (tmp_path / "model.unchecked.onnx").exists()  # checked, it replaced --output


def test_an_export_that_fails_its_check_leaves_the_file_of_before(trained, tiny_datasets_root, tmp_path, monkeypatch,
                                                                  capsys):
    output = tmp_path / "model.onnx"
    output.write_bytes(b"the model of before")
    # The tool's own name of the check (run_tool_here loads each tool once; the patch is undone after this test).
    tool = _tool_module("export.py")
    check = tool.check_export
    monkeypatch.setattr(tool, "check_export", lambda *args, **kwargs: {**check(*args, **kwargs), "passed": False})
    weights = str(trained("retinanet") / "stage_0" / "model_final.pth")
    args = ["--weights", weights, "--output", str(output)]
    opts = [*SHAPES_OPTS, *TRAIN_OPTS]
    line = _error_line(run_tool_here("export.py", [*args, "--check-images", "1", *opts], tiny_datasets_root,
                                     monkeypatch, capsys))
    assert f"{tmp_path / 'model.unchecked.onnx'}: ONNX Runtime does not reproduce" in line and "left as it was" in line
    # A fixed size that pads nothing: no size to suggest.
    assert line.endswith("fix: report the detector with the check's figures")
    assert output.read_bytes() == b"the model of before"
    assert read_json(tmp_path / "model.unchecked.check.json")["passed"] is False
    # Exported again with a passing check: the failed attempt's figures go with its file.
    monkeypatch.setattr(tool, "check_export", check)
    proc = run_tool_here("export.py", [*args, "--check-images", "1", *opts], tiny_datasets_root, monkeypatch, capsys)
    assert not proc.returncode, proc.log[-2000:]
    assert read_json(tmp_path / "model.check.json")["passed"] and output.read_bytes() != b"the model of before"
    assert not list(tmp_path.glob("model.unchecked.*"))
    for flags, message in ((["--check-images", "0"], "--check-images 0: the check needs 1 image or more"),
                           (["--input-size", "0", "64"], "--input-size 0 64: give a height and width")):
        proc = run_tool_here("export.py", [*args, *flags, *opts], tiny_datasets_root, monkeypatch, capsys)
        # One line, no usage text, exit status 1: argparse's refusal as the tools' own.
        assert proc.returncode == 1 and proc.stderr.startswith(f"error: {message}") and len(proc.stderr.splitlines()) == 1
        assert proc.stderr.rstrip().endswith(" --help")


def test_an_export_check_that_compared_nothing_says_so(trained, tiny_datasets_root, tmp_path, monkeypatch, capsys):
    weights = str(trained("retinanet") / "stage_0" / "model_final.pth")
    proc = run_tool_here("export.py", ["--weights", weights, "--output", str(tmp_path / "model.onnx"),
                                       "--check-images", "1", *SHAPES_OPTS, *TRAIN_OPTS,
                                       "MODEL.RETINANET.SCORE_THRESH_TEST", "1.0"],  # no score reaches it
                         tiny_datasets_root, monkeypatch, capsys)
    assert not proc.returncode, proc.log[-2000:]
    assert "0 of 0 PyTorch detections matched" in proc.stdout
    assert "warning: the model detected nothing on these 1 images, so the check compared no boxes" in proc.stderr


def test_an_exported_model_is_evaluated_and_predicts_through_onnx_runtime_as_pytorch(trained, tiny_datasets_root,
                                                                                       tiny_shapes_dir, tmp_path):
    run = trained("faster_rcnn")
    assert _export(run, tiny_datasets_root, tmp_path / "model.onnx").returncode == 0
    aps = []
    for weights in (tmp_path / "model.onnx", run / "stage_0" / "model_final.pth"):
        out = tmp_path / weights.suffix[1:]
        proc = run_tool("eval_incremental.py", ["--weights", str(weights), "--output-dir", str(out), "--quiet",
                                                *([] if weights.suffix == ".onnx" else ["--config-file",
                                                                                        str(run / "config.yaml")]),
                                                *SHAPES_OPTS, *TRAIN_OPTS], tiny_datasets_root, timeout=300)
        assert proc.returncode == 0, tail(proc)
        aps.append(read_json(out / "results.json")["stages"][0]["AP50"])
    assert aps[0] == pytest.approx(aps[1], abs=0.5)
    # On one's own images too: predict.py runs the file through ONNX Runtime, with the same detections.
    images = tmp_path / "images"
    images.mkdir()
    for name in sorted(os.listdir(os.path.join(tiny_shapes_dir, "JPEGImages")))[:2]:
        shutil.copy(os.path.join(tiny_shapes_dir, "JPEGImages", name), images / name)
    found = []
    for weights in (tmp_path / "model.onnx", run / "stage_0" / "model_final.pth"):
        out = tmp_path / f"preds_{weights.suffix[1:]}"
        proc = run_tool("predict.py", ["--weights", str(weights), "--input", str(images), "--output-dir", str(out),
                                       "--score-thresh", "0.05", "--max-detections", "5", "--quiet"],
                        tiny_datasets_root)
        assert proc.returncode == 0, tail(proc)
        found.append(sorted((a["image_id"], a["category_id"], round(a["score"], 3))
                            for a in read_json(out / "detections.json")["annotations"]))
    assert found[0] and found[0] == found[1] and max(Counter(i for i, _, _ in found[0]).values()) <= 5
    # An image of another shape is padded to the file's fixed 128 x 128 input, which is said; the extension's
    # case does not matter.
    Image.open(images / sorted(os.listdir(images))[0]).crop((0, 0, 128, 96)).save(images / "wide.png")
    shutil.copy(tmp_path / "model.onnx", tmp_path / "MODEL.ONNX")
    proc = run_tool("predict.py", ["--weights", str(tmp_path / "MODEL.ONNX"), "--input", str(images), "--output-dir",
                                   str(tmp_path / "preds_wide"), "--quiet"], tiny_datasets_root)
    assert proc.returncode == 0, tail(proc)
    assert (f"1 of 3 image(s) (the first: {images / 'wide.png'}, 128 x 96 px after the test-time resize) were padded "
            "to the model's fixed input of 128 x 128 px" in proc.stderr and "export with --dynamic" in proc.stderr)
    # The file keeps scores of 0.01 or more (its run's LOW_THRESH), 100 per image: looser limits cannot be had.
    for limits, message in (((0.001, None), "--score-thresh 0.001: {} was exported with "
                                            "MODEL.ROI_HEADS.SCORE_THRESH_TEST 0.01, which"),
                            ((None, 200), "--max-detections 200: {} was exported with TEST.DETECTIONS_PER_IMAGE 100")):
        with pytest.raises(deploy.DeployError, match=re.escape(message.format(tmp_path / "model.onnx"))):
            deploy.load_onnx_model(str(tmp_path / "model.onnx"), (), *limits)
    with pytest.raises(deploy.DeployError, match="MODEL.ROI_HEADS.NUM_CLASSES: .* would change nothing"):
        deploy.load_onnx_model(str(tmp_path / "model.onnx"), ["--", "MODEL.ROI_HEADS.NUM_CLASSES", "3"])


def test_a_pruned_model_exports_at_its_real_widths(trained, tiny_datasets_root, tmp_path):
    run = trained("faster_rcnn")
    # No --config-file and no input sizes: the tool takes the run's config.yaml (128-pixel inputs).
    proc = run_tool("prune.py", ["--weights", str(run / "stage_0" / "model_final.pth"), "--ratio", "0.5",
                                 "--output-dir", str(tmp_path / "pruned"), *SHAPES_OPTS], tiny_datasets_root,
                    timeout=300)
    assert proc.returncode == 0, tail(proc)
    assert read_json(tmp_path / "pruned" / "pruning.json")["image_size"] == [128, 128]
    sizes = {}
    for name, weights in (("full", run / "stage_0" / "model_final.pth"),
                          ("pruned", tmp_path / "pruned" / "model_pruned.pth")):
        proc = run_tool("export.py", ["--weights", str(weights), "--config-file", str(run / "config.yaml"),
                                      "--output", str(tmp_path / f"{name}.onnx"), "--check-images", "2",
                                      *SHAPES_OPTS, *TRAIN_OPTS], tiny_datasets_root, timeout=300)
        assert proc.returncode == 0, tail(proc)
        graph = onnx.load(str(tmp_path / f"{name}.onnx")).graph
        sizes[name] = sum(math.prod(i.dims) for i in graph.initializer)
    pruning = read_json(tmp_path / "pruned" / "pruning.json")
    # The file shrinks by the parameters pruning removed (its BatchNorms are folded into the convs).
    removed = pruning["before"]["params"] - pruning["after"]["params"]
    assert removed > 0 and sizes["full"] - sizes["pruned"] == pytest.approx(removed, rel=0.05)


def test_predict_draws_each_image_and_writes_a_coco_json(trained, tiny_datasets_root, tiny_shapes_dir, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    names = sorted(os.listdir(os.path.join(tiny_shapes_dir, "JPEGImages")))[:3]
    for name in names[:2]:
        shutil.copy(os.path.join(tiny_shapes_dir, "JPEGImages", name), images / name)
    Image.open(os.path.join(tiny_shapes_dir, "JPEGImages", names[2])).save(images / "photo.bmp")
    out = tmp_path / "preds"
    run = trained("retinanet")
    proc = run_tool("predict.py", ["--weights", str(run / "stage_0" / "model_final.pth"), "--input", str(images),
                                   "--output-dir", str(out), "--score-thresh", "0.01", "--max-detections", "5",
                                   "--quiet"], tiny_datasets_root)
    assert proc.returncode == 0, tail(proc)
    assert sorted(os.listdir(out)) == sorted([*names[:2], "detections.json", "photo.bmp.png"])
    coco = COCO(str(out / "detections.json"))
    assert len(coco.getImgIds()) == 3 and len(coco.getCatIds()) == 4
    per_image = [len(coco.getAnnIds(imgIds=[i])) for i in coco.getImgIds()]
    assert 0 < sum(per_image) and max(per_image) <= 5
    assert all(0.01 <= a["score"] <= 1 and len(a["bbox"]) == 4 for a in coco.dataset["annotations"])


def _error_line(proc):
    assert proc.returncode == 1 and "Traceback" not in proc.log, tail(proc)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1
    return lines[0]


def test_bad_inputs_end_in_one_error_line(trained, tiny_datasets_root, tmp_path, monkeypatch, capsys):
    run = trained("retinanet")
    weights = str(run / "stage_0" / "model_final.pth")
    (tmp_path / "empty").mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "photo.jpg").write_text("not an image")
    orphan = tmp_path / "orphan" / "model.pth"
    orphan.parent.mkdir()
    shutil.copy(weights, orphan)
    cases = [
        (["--weights", weights, "--input", str(tmp_path / "empty")], "holds no image"),
        (["--weights", weights, "--input", str(broken)], "photo.jpg cannot be read"),
        (["--weights", str(orphan), "--input", str(broken)], "--config-file"),
        (["--weights", weights, "--input", str(tmp_path / "missing")], "no such file or folder"),
    ]
    for i, (args, message) in enumerate(cases):
        args = [*args, "--output-dir", str(tmp_path / "out")]
        # The first as a real process (its exit status, nothing else on stderr), the others in this one.
        proc = (run_tool("predict.py", args, tiny_datasets_root) if i == 0 else
                run_tool_here("predict.py", args, tiny_datasets_root, monkeypatch, capsys))
        assert message in _error_line(proc)
    proc = run_tool_here("eval_incremental.py", ["--weights", str(broken / "photo.onnx")], tiny_datasets_root,
                         monkeypatch, capsys)
    assert "no such ONNX file" in _error_line(proc)
    # An exported model holds its score threshold: a key that would change nothing is refused.
    proc = run_tool_here("eval_incremental.py", ["--weights", str(broken / "photo.onnx"),
                                                 "MODEL.RETINANET.SCORE_THRESH_TEST", "0.3"],
                         tiny_datasets_root, monkeypatch, capsys)
    assert "MODEL.RETINANET.SCORE_THRESH_TEST: " in _error_line(proc) and "export the checkpoint again" in proc.stderr
    proc = run_tool_here("predict.py", ["--weights", str(broken / "photo.onnx"), "--input", str(broken),
                                        "--output-dir", str(tmp_path / "out")], tiny_datasets_root, monkeypatch, capsys)
    assert "no such ONNX file" in _error_line(proc)
    proc = run_tool_here("prune.py", ["--weights", str(broken / "photo.onnx"), "--ratio", "0.5", "--output-dir",
                                      str(tmp_path / "pruned")], tiny_datasets_root, monkeypatch, capsys)
    assert "photo.onnx: an exported ONNX model, and this takes a .pth checkpoint" in _error_line(proc)
    # Drawn copies into the images' own folder would overwrite them: refused, the images kept.
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (64, 64)).save(images / "photo.jpg")
    before = (images / "photo.jpg").read_bytes()
    proc = run_tool_here("predict.py", ["--weights", weights, "--input", str(images), "--output-dir", str(images)],
                         tiny_datasets_root, monkeypatch, capsys)
    assert "holds the input image" in _error_line(proc) and (images / "photo.jpg").read_bytes() == before


def test_an_unreadable_image_is_skipped_and_the_others_detections_are_kept(trained, tiny_datasets_root,
                                                                           tiny_shapes_dir, tmp_path, monkeypatch,
                                                                           capsys):
    images = tmp_path / "images"
    images.mkdir()
    name = sorted(os.listdir(os.path.join(tiny_shapes_dir, "JPEGImages")))[0]
    shutil.copy(os.path.join(tiny_shapes_dir, "JPEGImages", name), images / "a.jpg")
    (images / "b.jpg").write_text("not an image")
    Image.new("I;16", (32, 32), 60000).save(images / "c.png")  # read as 8 bits, it would be white
    Image.new("RGB", (4000, 10)).save(images / "d.png")  # resized at test time to 128 x 0 px
    out = tmp_path / "preds"
    weights = str(trained("retinanet") / "stage_0" / "model_final.pth")
    proc = run_tool_here("predict.py", ["--weights", weights, "--input", str(images), "--output-dir", str(out),
                                        "--quiet"], tiny_datasets_root, monkeypatch, capsys)
    line = _error_line(proc)
    assert f"3 of 4 image(s) skipped (the detections of the other 1 are in {out / 'detections.json'}); the first: " \
           f"image {images / 'b.jpg'} cannot be read" in line
    cfg = get_ilmil_cfg(None, ["INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "128"])
    with pytest.raises(deploy.DeployError, match=r"a 4000 x 10 px image resizes to 128 x 0 px at test time "
                                                 r"\(INPUT.MIN_SIZE_TEST 128, MAX_SIZE_TEST 128\); fix: crop it"):
        deploy.preprocess(cfg, np.zeros((10, 4000, 3), dtype=np.uint8))
    no_resize = get_ilmil_cfg(None, ["INPUT.MIN_SIZE_TEST", "0"])  # detectron2's "no resize at test time"
    assert deploy.preprocess(no_resize, np.zeros((50, 70, 3), dtype=np.uint8)).shape == (3, 50, 70)
    assert [i["file_name"] for i in read_json(out / "detections.json")["images"]] == ["a.jpg"]
    with pytest.raises(deploy.DeployError, match=r"c.png has I;16 pixels \(16-bit or float\), which would be read as "
                                                 r"white; fix: convert it to 8 bits per channel"):
        deploy.predict.read_image(str(images / "c.png"), "BGR")


def test_predict_refuses_flags_out_of_range_and_two_images_drawn_to_one_file(trained, tiny_datasets_root, tmp_path,
                                                                             monkeypatch, capsys):
    weights = str(trained("retinanet") / "stage_0" / "model_final.pth")
    images = tmp_path / "images"
    (images / "sub.jpg").mkdir(parents=True)  # a folder, not an image: passed over
    Image.new("RGB", (64, 64)).save(images / "x.bmp")
    Image.new("RGB", (64, 64)).save(images / "x.bmp.png")
    args = ["--weights", weights, "--input", str(images), "--output-dir", str(tmp_path / "out")]
    for flags, message in ((["--score-thresh", "1.5"], "--score-thresh 1.5: give a score in [0, 1)"),
                           (["--max-detections", "0"], "--max-detections 0: give 1 or more")):
        proc = run_tool_here("predict.py", [*args, *flags], tiny_datasets_root, monkeypatch, capsys)
        # One line, no usage text, exit status 1: argparse's refusal as the tools' own.
        assert proc.returncode == 1 and proc.stderr.startswith(f"error: {message}") and len(proc.stderr.splitlines()) == 1
        assert proc.stderr.rstrip().endswith(" --help")
    proc = run_tool_here("predict.py", args, tiny_datasets_root, monkeypatch, capsys)
    assert (f"{images / 'x.bmp'} and {images / 'x.bmp.png'} would both be drawn to {tmp_path / 'out' / 'x.bmp.png'}"
            in _error_line(proc))
    assert deploy.input_images(str(images)) == [str(images / "x.bmp"), str(images / "x.bmp.png")]


def test_predict_takes_the_limits_given_as_config_keys(trained, tiny_datasets_root, tiny_shapes_dir, tmp_path,
                                                      monkeypatch, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for name in sorted(os.listdir(os.path.join(tiny_shapes_dir, "JPEGImages")))[:2]:
        shutil.copy(os.path.join(tiny_shapes_dir, "JPEGImages", name), images / name)
    args = ["--weights", str(trained("retinanet") / "stage_0" / "model_final.pth"), "--input", str(images),
            "--output-dir", str(tmp_path / "out"), "--quiet"]
    keys = ["MODEL.RETINANET.SCORE_THRESH_TEST", "0.01", "TEST.DETECTIONS_PER_IMAGE", "3"]
    proc = run_tool_here("predict.py", [*args, *keys], tiny_datasets_root, monkeypatch, capsys)
    assert not proc.returncode, proc.log[-2000:]
    annotations = read_json(tmp_path / "out" / "detections.json")["annotations"]
    # Six iterations leave every score near its prior, below the flags' default 0.3: these are the keys' limits.
    assert Counter(a["image_id"] for a in annotations) == {1: 3, 2: 3} and min(a["score"] for a in annotations) >= 0.01
    for flag, key in ((["--score-thresh", "0.5"], keys[:2]), (["--max-detections", "5"], keys[2:])):
        proc = run_tool_here("predict.py", [*args, *flag, *key], tiny_datasets_root, monkeypatch, capsys)
        assert f"{' '.join(flag)} and {key[0]} set the same limit; fix: give one of them" in _error_line(proc)
    # Another detector's key is not this one's limit: the default 0.3 holds, which no score reaches here.
    proc = run_tool_here("predict.py", [*args, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.01"], tiny_datasets_root,
                         monkeypatch, capsys)
    assert not proc.returncode and not read_json(tmp_path / "out" / "detections.json")["annotations"]


def test_export_refuses_a_bad_output_or_input_size_before_exporting(trained, tiny_datasets_root, tmp_path,
                                                                    monkeypatch, capsys):
    weights = str(trained("retinanet") / "stage_0" / "model_final.pth")
    (tmp_path / "folder.onnx").mkdir()
    cases = [(["--output", str(tmp_path / "folder.onnx")], "is a folder; fix: give a .onnx file name"),
             (["--output", str(tmp_path / "small.onnx"), "--input-size", "96", "96"],
              "--input-size 96 96: the model's test-time resize (INPUT.MIN_SIZE_TEST 128, MAX_SIZE_TEST 128) gives "
              "inputs up to 128 x 128 px; fix: a larger --input-size, or --dynamic")]
    for args, message in cases:
        proc = run_tool_here("export.py", ["--weights", weights, *args, *SHAPES_OPTS, *TRAIN_OPTS],
                             tiny_datasets_root, monkeypatch, capsys)
        assert message in _error_line(proc)
    assert not list(tmp_path.glob("*.unchecked.onnx"))  # nothing exported


def test_the_export_check_compares_with_pytorch_on_the_unpadded_image(tmp_path):
    # PyTorch is given the image (40 x 56) and clips its box to it; the fixed-size graph is
    # given it padded (64 x 64) and clips to that: the check compares boxes clipped alike.
    seen = []

    def model(inputs):
        seen.append(tuple(inputs[0]["image"].shape))
        return [{"instances": Instances((40, 56), pred_boxes=Boxes(torch.tensor([[10.0, 10.0, 56.0, 30.0]])),
                                        scores=torch.tensor([0.9]), pred_classes=torch.tensor([0]))}]

    detector = SimpleNamespace(
        graph_input=lambda image: deploy.pad_to(image, (64, 64), [0.0, 0.0, 0.0]),
        run=lambda image: (np.array([[10.0, 10.0, 60.0, 30.0]]), np.array([0.9]), np.array([0])))
    trained = SimpleNamespace(cfg=get_ilmil_cfg(None), model=model)
    figures = deploy.check_export(trained, detector, [torch.zeros(3, 40, 56)])
    assert seen == [(3, 40, 56)]
    assert figures["passed"] and figures["detections_matched"] == 1 and figures["max_relative_box_difference"] == 0


def test_an_exported_models_config_loads_without_the_plugins_of_its_run():
    cfg = get_ilmil_cfg(None)
    # The run's plugin (not on this machine) and a key it added.
    cfg.ILMIL.PLUGINS = ["/nowhere/my_losses.py"]
    cfg.ILMIL.DISTILL.FEAT_L1 = type(cfg)({"ENABLED": True, "WEIGHT": 0.5})
    detector = deploy.OnnxDetector.__new__(deploy.OnnxDetector)  # the file's metadata alone
    detector.config_text = cfg.dump()
    loaded = detector.config(["SOLVER.MAX_ITER", "7", "ILMIL.DISTILL.FEAT_L1.WEIGHT", "0.25"])
    assert isinstance(loaded.SOLVER.STEPS, tuple)  # the defaults' types, as a config file merged into them
    assert loaded.SOLVER.MAX_ITER == 7 and loaded.ILMIL.DISTILL.FEAT_L1.WEIGHT == 0.25
    expected = derived_cfg(cfg, {"SOLVER.MAX_ITER": 7, "ILMIL.DISTILL.FEAT_L1.WEIGHT": 0.25})
    assert yaml.safe_load(loaded.dump()) == yaml.safe_load(expected.dump())
    with pytest.raises(ConfigError, match="config override SOLVER.MAX_ITERS: no such config key"):
        detector.config(["SOLVER.MAX_ITERS", "7"])
    # A file of an older version lacks the keys added since: they keep their defaults.
    older = yaml.safe_load(cfg.dump())
    del older["ILMIL"]["PSEUDO_LABELS"]["CROSS_CLASS_IOU"]
    detector.config_text = yaml.safe_dump(older)
    assert detector.config().ILMIL.PSEUDO_LABELS.CROSS_CLASS_IOU == default_cfg().ILMIL.PSEUDO_LABELS.CROSS_CLASS_IOU


def test_the_export_check_fails_on_added_detections_and_on_other_scores():
    tf32_during_reference = []

    def model(inputs):
        # The reference runs in full float32 (TF32 on a GPU would move scores by more than the tolerance).
        tf32_during_reference.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
        return [{"instances": Instances((64, 64), pred_boxes=Boxes(torch.tensor([[10.0, 10.0, 40.0, 30.0]])),
                                        scores=torch.tensor([0.8]), pred_classes=torch.tensor([1]))}]

    trained = SimpleNamespace(cfg=get_ilmil_cfg(None), model=model)
    same = (np.array([[10.0, 10.0, 40.0, 30.0]]), np.array([0.8]), np.array([1]))
    added = tuple(np.concatenate([a, b]) for a, b in zip(same, (np.array([[0.0, 0.0, 20.0, 20.0]]), np.array([0.99]),
                                                                np.array([2]))))
    other_score = (same[0], np.array([0.9]), same[2])
    moved_box = (np.array([[10.0, 10.0, 44.0, 30.0]]), same[1], same[2])  # 4 px off a box of largest coordinate 40
    figures = {name: deploy.check_export(trained, SimpleNamespace(run=lambda image, out=out: out),
                                         [torch.zeros(3, 64, 64)])
               for name, out in (("same", same), ("added", added), ("other_score", other_score),
                                 ("moved_box", moved_box))}
    assert figures["same"]["passed"] and figures["same"]["confident_onnx_detections"] == 1
    # A confident box the PyTorch model does not give: every PyTorch detection is matched, yet it fails.
    assert figures["added"]["detections_matched"] == 1 and figures["added"]["confident_onnx_detections_unmatched"] == 1
    assert not figures["added"]["passed"]
    # The same box at another score is no match.
    assert figures["other_score"]["detections_matched"] == 0 and not figures["other_score"]["passed"]
    assert figures["other_score"]["max_score_difference"] == pytest.approx(0.1)
    # A box out of tolerance fails the check, and the largest difference reported is that box's.
    assert figures["moved_box"]["detections_matched"] == 0 and not figures["moved_box"]["passed"]
    assert figures["moved_box"]["max_relative_box_difference"] == pytest.approx(4 / 40)
    assert set(tf32_during_reference) == {(False, False)} and torch.backends.cudnn.allow_tf32  # restored after


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_a_model_trained_on_a_gpu_runs_here_on_the_cpu_and_an_explicit_cuda_is_refused(trained, tmp_path):
    run = trained("retinanet")
    shutil.copytree(run / "stage_0", tmp_path / "stage_0")
    config = (run / "config.yaml").read_text()
    assert "DEVICE: cpu" in config
    (tmp_path / "config.yaml").write_text(config.replace("DEVICE: cpu", "DEVICE: cuda"))
    weights = str(tmp_path / "stage_0" / "model_final.pth")
    assert load_trained_model(weights).cfg.MODEL.DEVICE == "cpu"
    with pytest.raises(ConfigError, match="MODEL.DEVICE cuda: this machine has no CUDA device; fix: MODEL.DEVICE cpu"):
        load_trained_model(weights, opts=["MODEL.DEVICE", "cuda"])
    with pytest.raises(ConfigError, match="no CUDA device"):  # also after the "--" of "... -- KEY VALUE"
        load_trained_model(weights, opts=["--", "MODEL.DEVICE", "cuda"])
    with pytest.raises(ConfigError, match="no CUDA device"):  # training is refused before it starts
        IncrementalRun(derived_cfg(load_trained_model(weights).cfg, {"MODEL.DEVICE": "cuda",
                                                                   "OUTPUT_DIR": str(tmp_path / "train")}))


def test_a_checkpoint_is_evaluated_with_its_runs_config_by_default(trained, tiny_datasets_root, monkeypatch, capsys):
    weights = str(trained("retinanet") / "stage_0" / "model_final.pth")  # not the default config's detector
    proc = run_tool_here("eval_incremental.py", ["--weights", weights, "--quiet", *SHAPES_OPTS, *TRAIN_OPTS],
                         tiny_datasets_root, monkeypatch, capsys)
    assert not proc.returncode and "error" not in proc.stderr, proc.log[-2000:]
    assert "finetune on shapes 4" in proc.stdout  # the stage table
