"""The YOLOv3-style detector: its loss on a hand-built case, k-means anchors, class
expansion of its per-level classifiers, and the tools with it end to end (incremental
2+2 ilmil with anchors computed at start-up, a tiny-student compression run with the
information map, torchrun on two CPU processes)."""
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from conftest import REPO_ROOT
from ilmil.checkpoint import safe_load, state_dict_num_classes
from ilmil.config import CONFIGS_DIR, ConfigError, get_ilmil_cfg, set_num_classes
from ilmil.engine.compression import CompressionChain
from ilmil.data import load_dataset_source
from ilmil.modeling import YOLOV3, decode_head_boxes, kmeans_anchors, load_detector, yolo_anchors
from ilmil.modeling.yolo import decode_boxes, level_anchor_boxes
from ilmil.modeling.anchor_kmeans import training_box_sizes
from ilmil.modeling.expansion import expand_predictor_state_dict
from tool_runs import SHAPES_OPTS, TRAIN_OPTS, _env, read_json, run_tool, tail

TEACHER_CONFIG = os.path.join(CONFIGS_DIR, "shapes", "yolov3_cpu.yaml")
STUDENT_CONFIG = os.path.join(CONFIGS_DIR, "shapes", "kd", "yolov3_tiny_student_cpu.yaml")
# A narrow, shallow Darknet: the end-to-end runs test the plumbing, not the accuracy.
SMALL = ["MODEL.YOLO.WIDTH_MULTIPLIER", "0.25", "MODEL.YOLO.DEPTH_MULTIPLIER", "0.25"]


class _OneLevel(nn.Module):
    """A stand-in backbone: one level of stride 8."""

    size_divisibility = 8

    def output_shape(self):
        return {"p3": ShapeSpec(channels=8, stride=8)}


def _hand_built_model(**kwargs):
    head = nn.Module()  # the loss reads the predictions it is given, not the head
    return YOLOV3(backbone=_OneLevel(), head=head, head_in_features=["p3"], anchors=[[[16.0, 16.0]]],
                  num_classes=2, obj_level_weights=(1.0,), pixel_mean=[0, 0, 0], pixel_std=[1, 1, 1], **kwargs)


def test_the_loss_of_one_gt_box_equals_its_hand_computed_value():
    model = _hand_built_model()
    # One 32 x 32 image: a 4 x 4 map of stride 8, one 16 x 16 anchor per cell, every output 0.
    features = [torch.zeros(1, 8, 4, 4)]
    predictions = ([torch.zeros(1, 2, 4, 4)], [torch.zeros(1, 4, 4, 4)], [torch.zeros(1, 1, 4, 4)])
    gt = Instances((32, 32), gt_boxes=Boxes(torch.tensor([[2.0, 2.0, 22.0, 22.0]])), gt_classes=torch.tensor([1]))
    losses = model.forward_training(None, features, predictions, [gt])
    # The GT centre (12, 12) is in cell (1, 1); t = 0 decodes to a 16 x 16 box centred at
    # (8 + 0.5 * 8, 8 + 0.5 * 8) = (12, 12): [4, 4, 20, 20], inside the 20 x 20 GT box, so
    # GIoU = IoU = 256 / 400 and the enclosing box is the GT's.
    assert losses["loss_yolo_box"].item() == pytest.approx(0.05 * (1 - 256 / 400), rel=1e-5)
    # Class BCE of logit 0 against one-hot targets: log 2 for each of the 2 classes.
    assert losses["loss_yolo_cls"].item() == pytest.approx(0.5 * math.log(2), rel=1e-5)
    # Objectness BCE of logit 0: log 2 at each of the 16 cells (no other prediction
    # overlaps the GT at IoU > 0.5, so none is ignored).
    assert losses["loss_yolo_obj"].item() == pytest.approx(1.0 * math.log(2), rel=1e-5)


def test_the_focal_class_loss_counts_every_anchor_divided_by_the_positives():
    model = _hand_built_model(class_loss="focal")
    features = [torch.zeros(1, 8, 4, 4)]
    predictions = ([torch.zeros(1, 2, 4, 4)], [torch.zeros(1, 4, 4, 4)], [torch.zeros(1, 1, 4, 4)])
    gt = Instances((32, 32), gt_boxes=Boxes(torch.tensor([[2.0, 2.0, 22.0, 22.0]])), gt_classes=torch.tensor([1]))
    losses = model.forward_training(None, features, predictions, [gt])
    # Every logit 0 (p = 1/2): the positive's class 1 costs alpha (1 - p)^2 log 2 = 0.0625 log 2,
    # each of the other 31 (anchor, class) pairs (1 - alpha) p^2 log 2 = 0.1875 log 2; one positive.
    assert losses["loss_yolo_cls"].item() == pytest.approx(0.5 * (0.0625 + 31 * 0.1875) * math.log(2), rel=1e-5)
    # An image without objects still trains the class scores down.
    empty = Instances((32, 32), gt_boxes=Boxes(torch.zeros(0, 4)), gt_classes=torch.zeros(0, dtype=torch.long))
    assert model.forward_training(None, features, predictions, [empty])["loss_yolo_cls"].item() == pytest.approx(
        0.5 * 32 * 0.1875 * math.log(2), rel=1e-5)
    with pytest.raises(ConfigError, match="MODEL.YOLO.CLASS_LOSS 'ce': choose one of bce, focal"):
        _hand_built_model(class_loss="ce")


def test_neighbour_cells_train_the_two_adjacent_cells_nearest_the_gt_centre():
    # A 4 x 4 map of stride 8, one 16 x 16 anchor. The GT centre (10, 13) is in cell (row 1,
    # col 1), a quarter cell from its left side and 5/8 of a cell down: its neighbours are
    # the cell on the left (1, 0) and the one below (2, 1); slot = row x 4 + col.
    gt = Instances((32, 32), gt_boxes=Boxes(torch.tensor([[2.0, 5.0, 18.0, 21.0]])), gt_classes=torch.tensor([1]))
    anchors = [level_anchor_boxes((4, 4), 8, [(16.0, 16.0)])]
    assert _hand_built_model().assign([gt], anchors, [(4, 4)])[0][0].tolist() == [5]
    model = _hand_built_model(neighbour_cells=True)
    slots, gt_index = model.assign([gt], anchors, [(4, 4)])[0]
    assert slots.tolist() == [5, 4, 9] and gt_index.tolist() == [0, 0, 0]
    # In the corner cell, both nearer neighbours are off the map.
    corner = Instances((32, 32), gt_boxes=Boxes(torch.tensor([[0.0, 0.0, 6.0, 6.0]])), gt_classes=torch.tensor([0]))
    assert model.assign([corner], anchors, [(4, 4)])[0][0].tolist() == [0]
    # The loss averages the three boxes' 1 - GIoU; t = 0 decodes to the anchor at each cell's
    # centre: [4, 4, 20, 20], [-4, 4, 12, 20] and [4, 12, 20, 28] against the GT [2, 5, 18, 21]
    # (intersection / union, enclosing box).
    predictions = ([torch.zeros(1, 2, 4, 4)], [torch.zeros(1, 4, 4, 4)], [torch.zeros(1, 1, 4, 4)])
    losses = model.forward_training(None, [torch.zeros(1, 8, 4, 4)], predictions, [gt])
    gious = [210 / 302 - (306 - 302) / 306, 150 / 362 - (374 - 362) / 374, 126 / 386 - (414 - 386) / 414]
    assert losses["loss_yolo_box"].item() == pytest.approx(0.05 * sum(1 - g for g in gious) / 3, rel=1e-5)


def test_neighbour_cells_decode_centres_over_minus_half_to_one_and_a_half_cells():
    anchor = torch.tensor([[4.0, 4.0, 20.0, 20.0]])  # centred on cell (1, 1) of stride 8: corner (8, 8)
    for t, reach, centre in ((0.0, False, 12.0), (0.0, True, 12.0), (20.0, False, 16.0), (20.0, True, 20.0),
                             (-20.0, False, 8.0), (-20.0, True, 4.0)):
        box = decode_boxes(torch.tensor([[t, t, 0.0, 0.0]]), anchor, 8, neighbour_reach=reach)
        assert ((box[0, :2] + box[0, 2:]) / 2).tolist() == pytest.approx([centre, centre], abs=1e-4), (t, reach)


def test_predictions_that_overlap_a_gt_box_are_not_objectness_negatives():
    model = _hand_built_model(ignore_thresh=0.1)
    features = [torch.zeros(1, 8, 4, 4)]
    objectness = torch.full((1, 1, 4, 4), 3.0)  # confident everywhere: every negative costs BCE(3, 0)
    predictions = ([torch.zeros(1, 2, 4, 4)], [torch.zeros(1, 4, 4, 4)], [objectness])
    gt = Instances((32, 32), gt_boxes=Boxes(torch.tensor([[2.0, 2.0, 22.0, 22.0]])), gt_classes=torch.tensor([1]))
    loss = model.forward_training(None, features, predictions, [gt])["loss_yolo_obj"].item()
    # Decoded boxes of the 16 cells: IoU with the GT > 0.1 for the 3 x 3 cells around it
    # (the positive among them), none elsewhere: 7 negatives and the positive count.
    iou = _cell_ious(torch.tensor([2.0, 2.0, 22.0, 22.0]))
    ignored = int(((iou > 0.1).sum() - 1).item())
    negatives = 16 - 1 - ignored
    expected = (negatives * -math.log(1 - torch.sigmoid(torch.tensor(3.0)).item()) + math.log(1 + math.exp(-3.0)))
    assert loss == pytest.approx(expected / (negatives + 1), rel=1e-5)
    assert ignored > 0


def _cell_ious(gt):
    centres = (torch.arange(4.0) + 0.5) * 8
    cy, cx = torch.meshgrid(centres, centres, indexing="ij")
    boxes = torch.stack([cx - 8, cy - 8, cx + 8, cy + 8], dim=-1).reshape(-1, 4)
    from detectron2.structures import pairwise_iou
    return pairwise_iou(Boxes(boxes), Boxes(gt[None]))[:, 0]


def test_kmeans_recovers_planted_anchor_clusters():
    rng = np.random.default_rng(3)
    planted = np.array([[10.0, 10.0], [30.0, 60.0], [80.0, 40.0]])
    wh = np.concatenate([c * rng.uniform(0.95, 1.05, size=(200, 2)) for c in planted])
    found = kmeans_anchors(wh, 3, seed=1)
    np.testing.assert_allclose(found, planted, rtol=0.03)
    # The same seed gives the same anchors.
    np.testing.assert_array_equal(kmeans_anchors(wh, 3, seed=1), found)


@pytest.mark.parametrize("wh, message", [
    (np.ones((2, 2)), "2 training boxes of 1 distinct sizes"),
    # Many boxes of fewer sizes than anchors (one class of fixed-size objects), boxes of no area.
    ([[10, 10]] * 20, "20 training boxes of 1 distinct sizes"),
    ([[10, 10], [20, 20]] * 5 + [[0, 5], [0, 0]], "10 training boxes of 2 distinct sizes"),
])  # fmt: skip
def test_too_few_box_sizes_for_the_anchors_are_refused_with_the_fix(wh, message):
    with pytest.raises(ConfigError, match=f"{message} cannot give 3 anchors; fix: fewer MODEL.YOLO.NUM_ANCHORS"):
        kmeans_anchors(wh, 3)


def test_box_sizes_are_scaled_as_the_training_resize_scales_the_images():
    record = {"height": 100, "width": 200, "annotations": [{"bbox": [0.0, 0.0, 40.0, 20.0]}]}
    # The shorter side to 50 px; then the longer capped at 80 px; 0: detectron2 does not resize.
    for min_size, max_size, scale in ((50, 1000, 0.5), (50, 80, 0.4), (0, 1000, 1.0)):
        np.testing.assert_allclose(training_box_sizes([record], min_size, max_size), [[40 * scale, 20 * scale]])


def test_head_boxes_decode_yolo_cell_offsets_and_anchor_multiples():
    # One 16 px anchor on a level of stride 8, a 2 x 3 map: cell (1, 2) at index (1 x 3 + 2) = 5
    # with t = (0, 0, log 2, 0) decodes to centre ((2 + 0.5) 8, (1 + 0.5) 8), size 32 x 16.
    deltas = torch.zeros(1, 4, 2, 3)
    deltas[0, :, 1, 2] = torch.tensor([0.0, 0.0, math.log(2.0), 0.0])
    boxes = decode_head_boxes(_hand_built_model(), [deltas])
    assert boxes.shape == (1, 6, 4)
    assert boxes[0, 5].tolist() == pytest.approx([20 - 16, 12 - 8, 20 + 16, 12 + 8])
    assert boxes[0, 0].tolist() == pytest.approx([4 - 8, 4 - 8, 4 + 8, 4 + 8])


def _model(num_classes, seed, opts=()):
    cfg = set_num_classes(get_ilmil_cfg(TEACHER_CONFIG, SMALL + list(opts)), num_classes)
    torch.manual_seed(seed)
    return build_model(cfg).eval()


@pytest.mark.parametrize("opts", [(), ("MODEL.YOLO.CLASS_CONV", "True")], ids=["shared conv", "class conv"])
def test_class_expansion_keeps_every_old_output_exactly(opts):
    old, new = _model(3, seed=0, opts=opts), _model(5, seed=1, opts=opts)
    merged = expand_predictor_state_dict(old.state_dict(), new.state_dict(), 3)
    new.load_state_dict(merged)
    assert state_dict_num_classes(merged) == 5
    image = torch.rand(1, 3, 96, 128) * 255
    with torch.no_grad():
        before = old.head([old.backbone(image)[f] for f in old.head_in_features])
        after = new.head([new.backbone(image)[f] for f in new.head_in_features])
    for level, (z_old, z_new) in enumerate(zip(before[0], after[0])):
        anchors = len(old.anchors[level])
        z_old = z_old.view(1, anchors, 3, *z_old.shape[-2:])
        z_new = z_new.view(1, anchors, 5, *z_new.shape[-2:])
        assert torch.equal(z_new[:, :, :3], z_old)
        # New classes start at the prior probability.
        assert torch.allclose(z_new[:, :, 3:].sigmoid().mean(), torch.tensor(0.01), atol=2e-3)
    for old_level, new_level in zip(before[1] + before[2], after[1] + after[2]):
        assert torch.equal(old_level, new_level)


def test_a_class_conv_of_its_own_feeds_the_class_logits_only():
    model = _model(3, seed=0, opts=("MODEL.YOLO.CLASS_CONV", "True"))
    features = [torch.rand(1, s.channels, 4, 4) for s in model.backbone.output_shape().values()]
    before = model.head(features)
    with torch.no_grad():
        for conv in model.head.cls_convs:
            conv.weight.add_(1.0)  # the class conv's 3x3 weights moved
    after = model.head(features)
    assert all(not torch.allclose(z0, z1) for z0, z1 in zip(before[0], after[0]))
    for outputs_before, outputs_after in zip(before[1:], after[1:]):  # boxes and objectness unchanged
        assert all(torch.equal(x0, x1) for x0, x1 in zip(outputs_before, outputs_after))
    # Without it, the class logits read the conv the box and objectness outputs read.
    assert _model(3, seed=0).head.cls_convs is None


@pytest.mark.parametrize("anchors", [
    "[[[10.0, 10.0]]]",  # one level of three
    "[[10, 13], [16, 30], [33, 23]]",  # three pairs, not three levels of pairs
    "[[], [], [[30, 30]]]",  # a level without anchors
    "[[[10, 10]], [[20, 20]], [[-5, 40]]]",  # a negative size
])  # fmt: skip
def test_wrong_anchors_are_refused_with_the_fix(anchors):
    cfg = get_ilmil_cfg(TEACHER_CONFIG, SMALL + ["MODEL.YOLO.ANCHORS", anchors])
    with pytest.raises(ConfigError, match=r"MODEL.YOLO.ANCHORS: 3 levels .* need a list of \[w, h\] anchors "
                                          r"\(w, h > 0\) each, .*fix: tools/yolo_anchors.py"):
        build_model(cfg)


@pytest.mark.parametrize("features", [["dark3", "dark5"], ["dark5", "dark4", "dark3"]])
def test_neck_levels_out_of_order_or_with_gaps_are_refused(features):
    cfg = get_ilmil_cfg(TEACHER_CONFIG, SMALL + ["MODEL.YOLO.IN_FEATURES", str(features)])
    with pytest.raises(ConfigError, match=r"the neck joins adjacent levels, finest first \(strides \[.*\]\); fix"):
        build_model(cfg)


def test_the_yolo_anchor_tool_prints_anchors_of_the_training_boxes(tiny_datasets_root, monkeypatch):
    proc = run_tool("yolo_anchors.py", ["--config-file", TEACHER_CONFIG, *SHAPES_OPTS, *TRAIN_OPTS],
                    tiny_datasets_root)
    assert proc.returncode == 0, tail(proc)
    levels = re.findall(r"\[(\[[\d.]+, [\d.]+\](?:, \[[\d.]+, [\d.]+\])*)\]", proc.stdout)
    printed = [json.loads(f"[{level}]") for level in levels]
    # What a run of that config computes from the same training boxes.
    monkeypatch.setenv("ILMIL_DATASETS", str(tiny_datasets_root))
    cfg = get_ilmil_cfg(TEACHER_CONFIG, [*SHAPES_OPTS, *TRAIN_OPTS])
    expected = yolo_anchors(cfg, load_dataset_source(cfg).train)
    assert len(printed) == len(expected) == 3
    assert np.asarray(printed) == pytest.approx(np.asarray(expected), abs=0.01)


@pytest.fixture(scope="module")
def incremental(tiny_datasets_root, tmp_path_factory):
    """2+2 ilmil on the tiny set, anchors left to the run (k-means at start-up over the 6
    boxes of stage 0: one anchor per level)."""
    out = tmp_path_factory.mktemp("yolo") / "run"
    proc = run_tool("train_incremental.py", [
        "--config-file", TEACHER_CONFIG, "--stages", "2+2", "--method", "ilmil", "--output-dir", str(out),
        *SHAPES_OPTS, *TRAIN_OPTS, *SMALL, "MODEL.YOLO.ANCHORS", "[]", "MODEL.YOLO.NUM_ANCHORS", "1",
        "MODEL.YOLO.SCORE_THRESH_TEST", "0.001", "ILMIL.DISTILL.FEAT.ENABLED", "True",  # YOLO's alignment
    ], tiny_datasets_root, timeout=300)
    assert proc.returncode == 0, tail(proc)
    return out


def test_an_incremental_yolo_run_trains_both_stages_with_distillation(incremental):
    results = read_json(incremental / "results.json")
    assert [len(s["old_classes"]) + len(s["new_classes"]) for s in results["stages"]] == [2, 4]
    assert all(0.0 <= s["AP50"] <= 100.0 for s in results["stages"])
    assert [state_dict_num_classes(safe_load(str(incremental / f"stage_{k}" / "model_final.pth"))["model"])
            for k in (0, 1)] == [2, 4]
    log = (incremental / "log.txt").read_text()
    assert "loss_distill_feat" in log and "loss_distill_dense" in log


def test_anchors_computed_at_start_up_are_recorded_in_the_run_config(incremental):
    anchors = get_ilmil_cfg(str(incremental / "config.yaml")).MODEL.YOLO.ANCHORS
    assert len(anchors) == 3 and all(len(level) == 1 for level in anchors)
    areas = [w * h for level in anchors for w, h in level]
    assert areas == sorted(areas)


def test_a_checkpoint_carries_its_anchors_to_every_loader(incremental):
    weights = str(incremental / "stage_0" / "model_final.pth")
    anchors = get_ilmil_cfg(str(incremental / "config.yaml")).MODEL.YOLO.ANCHORS
    assert safe_load(weights)["ilmil"]["anchors"] == [[list(wh) for wh in level] for level in anchors]
    # A config of other anchors (the shapes config's three per level) builds the model with the
    # checkpoint's one per level: its boxes are decoded as they were trained.
    cfg = get_ilmil_cfg(TEACHER_CONFIG, SMALL)
    set_num_classes(cfg, 2)
    assert [len(level) for level in cfg.MODEL.YOLO.ANCHORS] == [3, 3, 3]
    model = load_detector(cfg, weights)
    assert [[list(wh) for wh in level] for level in model.anchors] == [[list(wh) for wh in level] for level in anchors]


def test_a_start_stage_run_computes_its_anchors_before_checking_its_given_model(incremental, tiny_datasets_root,
                                                                                tmp_path):
    out = tmp_path / "from_stage_1"
    proc = run_tool("train_incremental.py", [
        "--config-file", TEACHER_CONFIG, "--stages", "2+2", "--method", "finetune", "--output-dir", str(out),
        "--start-stage", "1", "--teacher-weights", str(incremental / "stage_0" / "model_final.pth"),
        *SHAPES_OPTS, *TRAIN_OPTS, *SMALL, "MODEL.YOLO.ANCHORS", "[]", "MODEL.YOLO.NUM_ANCHORS", "1",
    ], tiny_datasets_root, timeout=300)
    assert proc.returncode == 0, tail(proc)
    assert [s["stage"] for s in read_json(out / "results.json")["stages"]] == [0, 1]


def test_a_chain_checks_a_yolo_student_with_anchors_left_to_the_run(incremental, tiny_datasets_root, tmp_path,
                                                                    monkeypatch):
    # Teacher and assistant: the run's model (one anchor per level); the student's anchors: k-means at start-up.
    monkeypatch.setenv("ILMIL_DATASETS", str(tiny_datasets_root))
    teacher_config = str(incremental / "config.yaml")
    cfg = get_ilmil_cfg(STUDENT_CONFIG, [*SHAPES_OPTS, *TRAIN_OPTS, "MODEL.YOLO.WIDTH_MULTIPLIER", "0.25",
                                         "MODEL.YOLO.ANCHORS", "[]", "MODEL.YOLO.NUM_ANCHORS", "1",
                                         "ILMIL.STAGES", "2", "OUTPUT_DIR", str(tmp_path / "chain"),
                                         "ILMIL.DISTILL.DENSE.ENABLED", "True",
                                         "ILMIL.TEACHER.CONFIG_FILE", teacher_config,
                                         "ILMIL.TEACHER.ASSISTANT_CONFIG_FILE", teacher_config], method="finetune")
    chain = CompressionChain(cfg, str(incremental / "stage_0" / "model_final.pth"))
    # The student's run, checked before the assistant trains, computed them once (one per level).
    anchors = chain.student.cfg.MODEL.YOLO.ANCHORS
    assert len(anchors) == len(chain.student.cfg.MODEL.YOLO.IN_FEATURES) and all(len(a) == 1 for a in anchors)


def test_a_tiny_student_is_distilled_with_the_information_map_and_m_kds_terms(incremental, tiny_datasets_root,
                                                                              tmp_path):
    out = tmp_path / "student"
    # The student keeps its teacher's anchors, so the output term compares anchor with anchor.
    anchors = get_ilmil_cfg(str(incremental / "config.yaml")).MODEL.YOLO.ANCHORS
    proc = run_tool("train_compression.py", [
        "--config-file", STUDENT_CONFIG, "--teacher-config", str(incremental / "config.yaml"),
        "--teacher-weights", str(incremental / "stage_0" / "model_final.pth"), "--stages", "2",
        "--output-dir", str(out), *SHAPES_OPTS, *TRAIN_OPTS, "MODEL.YOLO.WIDTH_MULTIPLIER", "0.25",
        "ILMIL.DISTILL.INFOMAP.ENABLED", "True", "MODEL.YOLO.SCORE_THRESH_TEST", "0.001",
        # M-KD's attention and layer relations on the neck's levels the student config names.
        "ILMIL.DISTILL.AT.ENABLED", "True", "ILMIL.DISTILL.FSP.ENABLED", "True",
        "MODEL.YOLO.ANCHORS", str(anchors), "MODEL.YOLO.NUM_ANCHORS", "1",
    ], tiny_datasets_root, timeout=300)
    assert proc.returncode == 0, tail(proc)
    results = read_json(out / "results.json")
    assert "teacher" in results and results["stages"][0]["AP50"] is not None
    log = (out / "log.txt").read_text()
    for term in ("loss_distill_feat", "loss_distill_dense", "loss_distill_infomap", "loss_distill_at",
                 "loss_distill_fsp"):
        assert term in log


def test_yolo_trains_under_torchrun_on_two_cpu_processes(tiny_datasets_root, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(REPO_ROOT, "tools", "train_incremental.py"), "--config-file", TEACHER_CONFIG,
           "--stages", "2", "--output-dir", str(out), *SHAPES_OPTS, *TRAIN_OPTS, *SMALL]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=_env(tiny_datasets_root), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    # Each rank logs the digest of its weights after the stage (rank 1 in log.txt.rank1).
    digests = [re.findall(r"Stage 0: weights digest (\w+) \(rank (\d)\)", (out / log).read_text())
               for log in ("log.txt", "log.txt.rank1")]
    assert [[rank for _, rank in found] for found in digests] == [["0"], ["1"]]
    assert digests[0][0][0] == digests[1][0][0]
    assert len(read_json(out / "results.json")["stages"]) == 1
