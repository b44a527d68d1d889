"""RetinaNet and FCOS as detectors of the toolkit: FCOS built from a yacs config,
class expansion of their sigmoid classifiers (docs/methods.md, section 3), the class
count of each detector's checkpoint, and ``tools/train_incremental.py`` runs with
each on the tiny shapes set (24 train / 8 test images of 128 px, 6 iterations)."""
import inspect
import math
import os
from types import SimpleNamespace

import pytest
import torch

from detectron2.modeling import build_model
from detectron2.modeling.meta_arch import fcos as d2_fcos
from detectron2.modeling.meta_arch.dense_detector import permute_to_N_HWA_K
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from ilmil.checkpoint import CheckpointError, safe_load
from ilmil.config import CONFIGS_DIR, ConfigError, get_ilmil_cfg, set_num_classes
from ilmil.data import shape_class_names
from ilmil.engine import IncrementalRun
from ilmil.evaluation import evaluate_run
from ilmil.checkpoint import TeacherMismatchError, load_checked_checkpoint, state_dict_num_classes
from ilmil.engine.pruning_stage import check_pruning_config
from ilmil.modeling import FCOS, load_expanded
from ilmil.pruning import PruningError
from tool_runs import SHAPES_OPTS, TRAIN_OPTS, metrics_lines, read_json, run_tool, tail

CONFIGS = {
    "IncrementalRCNN": "faster_rcnn_R18_FPN_cpu.yaml",
    "RetinaNet": "retinanet_R18_FPN_cpu.yaml",
    "FCOS": "fcos_R18_FPN_cpu.yaml",
}
DENSE = ("RetinaNet", "FCOS")
NUM_OLD, NUM_NEW = 3, 2
PRIOR = 0.01  # MODEL.RETINANET.PRIOR_PROB and MODEL.FCOS.PRIOR_PROB at their defaults
CLASSES = shape_class_names(20)[:4]
# RetinaNet's classic layout, 3 scales x 3 aspect ratios per location (the shapes config has
# one anchor): with several anchors per location a misplaced class row in the expansion shows.
NINE_ANCHORS = {"RetinaNet": ("MODEL.ANCHOR_GENERATOR.SIZES", [[12, 15, 19], [24, 30, 38], [48, 60, 76],
                                                               [96, 121, 152], [192, 242, 305]],
                              "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS", [[0.5, 1.0, 2.0]])}


def _config_file(arch):
    return os.path.join(CONFIGS_DIR, "shapes", CONFIGS[arch])


def _cfg(arch, num_classes, *opts, method=None):
    cfg = get_ilmil_cfg(_config_file(arch), ["MODEL.DEVICE", "cpu", *opts], method=method)
    return set_num_classes(cfg, num_classes)


def _model(arch, num_classes, seed, *opts):
    torch.manual_seed(seed)
    return build_model(_cfg(arch, num_classes, *opts)).eval()


@pytest.fixture(scope="module")
def image():
    gen = torch.Generator().manual_seed(7)
    return (torch.rand(3, 96, 128, generator=gen) * 255).float()


# ------------------------------------------------------------------ FCOS from yacs


def test_fcos_is_registered_and_built_from_the_fcos_keys():
    cfg = _cfg("FCOS", 7, "MODEL.FCOS.NUM_CONVS", 2, "MODEL.FCOS.NORM", "", "MODEL.FCOS.PRIOR_PROB", 0.05,
               "MODEL.FCOS.IN_FEATURES", ["p3", "p4", "p5"], "MODEL.FCOS.CENTER_SAMPLING_RADIUS", 2.5,
               "MODEL.FCOS.FOCAL_LOSS_ALPHA", 0.3, "MODEL.FCOS.FOCAL_LOSS_GAMMA", 1.5,
               "MODEL.FCOS.SCORE_THRESH_TEST", 0.3, "MODEL.FCOS.TOPK_CANDIDATES_TEST", 50,
               "MODEL.FCOS.NMS_THRESH_TEST", 0.45, "TEST.DETECTIONS_PER_IMAGE", 9)
    model = build_model(cfg)
    assert isinstance(model, FCOS) and isinstance(model, d2_fcos.FCOS)  # the student class IncrementalFCOS
    assert type(model.head) is d2_fcos.FCOSHead
    assert model.head_in_features == ["p3", "p4", "p5"] and model.num_classes == 7
    # One anchor point per location: K class channels, 4 box channels, 1 centerness channel.
    assert (model.head.cls_score.out_channels, model.head.bbox_pred.out_channels,
            model.head.ctrness.out_channels) == (7, 4, 1)
    convs = [m for m in model.head.cls_subnet if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 2 and len(model.head.cls_subnet) == 4  # conv + ReLU twice, no norm
    torch.testing.assert_close(model.head.cls_score.bias, torch.full((7,), -math.log(0.95 / 0.05)))
    assert (model.center_sampling_radius, model.focal_loss_alpha, model.focal_loss_gamma) == (2.5, 0.3, 1.5)
    assert (model.test_score_thresh, model.test_topk_candidates, model.test_nms_thresh,
            model.max_detections_per_image) == (0.3, 50, 0.45, 9)
    # The anchor points are one per stride of each level the head reads (p3, p4, p5: 8, 16, 32).
    assert model.anchor_generator.strides == [8, 16, 32]


def test_fcos_defaults_are_detectron2s():
    cfg = get_ilmil_cfg(None, ["MODEL.META_ARCHITECTURE", "FCOS", "MODEL.BACKBONE.NAME",
                               "build_retinanet_resnet_fpn_backbone", "MODEL.RESNETS.OUT_FEATURES",
                               ["res3", "res4", "res5"], "MODEL.FPN.IN_FEATURES", ["res3", "res4", "res5"]])
    model = build_model(cfg)
    defaults = {name: p.default for name, p in inspect.signature(d2_fcos.FCOS.__init__).parameters.items()}
    assert model.num_classes == 80 and model.head_in_features == ["p3", "p4", "p5", "p6", "p7"]
    for attr, name in (("center_sampling_radius", "center_sampling_radius"), ("focal_loss_alpha", "focal_loss_alpha"),
                       ("focal_loss_gamma", "focal_loss_gamma"), ("test_score_thresh", "test_score_thresh"),
                       ("test_topk_candidates", "test_topk_candidates"), ("test_nms_thresh", "test_nms_thresh")):
        assert getattr(model, attr) == defaults[name], attr
    # GroupNorm towers (detectron2's FCOS model), buildable on detectron2 0.6 (ilmil.compat).
    assert isinstance(model.head.cls_subnet[1], torch.nn.GroupNorm)


def test_fcos_in_features_the_backbone_lacks_are_refused_with_the_fix():
    cfg = _cfg("FCOS", 3, "MODEL.FCOS.IN_FEATURES", ["p2", "p3"])
    with pytest.raises(ConfigError, match=r"MODEL.FCOS.IN_FEATURES names p2, which the backbone "
                                          r"build_retinanet_resnet_fpn_backbone does not output .*; fix:"):
        build_model(cfg)


def _batch(image):
    instances = Instances(tuple(image.shape[1:]))
    instances.gt_boxes = Boxes(torch.tensor([[10.0, 12.0, 40.0, 44.0], [60.0, 30.0, 118.0, 90.0]]))
    instances.gt_classes = torch.tensor([0, 2])
    return [{"image": image, "instances": instances}, {"image": image.flip(2), "instances": instances}]


def test_fcos_trains_and_then_detects(image):
    model = _model("FCOS", NUM_OLD, 0).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    history = []
    with EventStorage():
        for _ in range(8):
            losses = model(_batch(image))
            assert set(losses) == {"loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr"}
            assert all(torch.isfinite(v) for v in losses.values()), losses
            history.append({k: v.item() for k, v in losses.items()})
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()
    assert history[-1]["loss_fcos_cls"] < 0.5 * history[0]["loss_fcos_cls"], history
    model.eval()
    with torch.no_grad():
        (output,) = model([{"image": image, "height": 48, "width": 64}])
    found = output["instances"]
    assert 0 < len(found) <= 100 and found.image_size == (48, 64)  # rescaled to the requested size
    assert torch.all(found.scores >= 0.05) and set(found.pred_classes.tolist()) <= {0, 1, 2}


# ------------------------------------------------------------------ expansion


@torch.no_grad()
def _make_distinctive(model, seed=123):
    """O(1) logits with distinct rows in the classifier (a misplaced row shows) and
    BatchNorm statistics unlike a fresh model's (the copy must reach them)."""
    gen = torch.Generator().manual_seed(seed)
    cls = model.head.cls_score
    cls.weight.copy_(torch.randn(cls.weight.shape, generator=gen) * 0.1)
    cls.bias.copy_(torch.randn(cls.bias.shape, generator=gen) - 1.0)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=gen) * 0.1)
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen) + 0.5)
    return model


@torch.no_grad()
def _class_scores(model, image):
    """Sigmoid class scores (R anchors, K classes) of every anchor of every level."""
    images = model.preprocess_image([{"image": image}])
    features = model.backbone(images.tensor)
    logits = model.head([features[f] for f in model.head_in_features])[0]
    return torch.cat([permute_to_N_HWA_K(x, model.num_classes) for x in logits], 1)[0].sigmoid()


@pytest.fixture(scope="module", params=DENSE)
def expanded(request, image):
    arch = request.param
    opts = NINE_ANCHORS.get(arch, ())
    teacher = _make_distinctive(_model(arch, NUM_OLD, 0, *opts))
    student = load_expanded(_model(arch, NUM_OLD + NUM_NEW, 1, *opts), teacher.state_dict(), NUM_OLD).eval()
    fresh = _model(arch, NUM_OLD + NUM_NEW, 1, *opts)  # the student before the old weights came in
    return SimpleNamespace(arch=arch, teacher=teacher, student=student, fresh=fresh,
                           t_scores=_class_scores(teacher, image), s_scores=_class_scores(student, image))


def test_expanded_classifier_has_k_plus_n_channels_per_anchor(expanded):
    anchors = {"RetinaNet": 9, "FCOS": 1}[expanded.arch]  # 3 sizes x 3 aspect ratios; one point
    assert expanded.teacher.head.cls_score.out_channels == anchors * NUM_OLD
    assert expanded.student.head.cls_score.out_channels == anchors * (NUM_OLD + NUM_NEW)
    assert expanded.student.head.bbox_pred.out_channels == anchors * 4


def test_old_class_scores_of_the_expanded_model_are_the_old_models(expanded):
    t, s = expanded.t_scores, expanded.s_scores
    assert t.shape[1] == NUM_OLD and s.shape == (t.shape[0], NUM_OLD + NUM_NEW)
    assert t.min() < 0.05 and t.max() > 0.5  # varied: a row of another anchor or class would show
    # Equal up to float32 rounding (a convolution with more output channels sums in another order).
    torch.testing.assert_close(s[:, :NUM_OLD], t, rtol=0, atol=1e-6)


def test_new_class_scores_start_at_the_prior(expanded):
    # The fresh rows' weights (std 0.01) spread the logits a little around the prior's.
    new = expanded.s_scores[:, NUM_OLD:]
    assert abs(new.mean().item() - PRIOR) < 0.1 * PRIOR
    assert new.min() > PRIOR / 3 and new.max() < 3 * PRIOR


def test_new_class_rows_keep_the_students_fresh_initialisation(expanded):
    anchors = expanded.student.head.bbox_pred.out_channels // 4
    per_anchor = NUM_OLD + NUM_NEW
    new_rows = torch.tensor([a * per_anchor + k for a in range(anchors) for k in range(NUM_OLD, per_anchor)])
    s_state, fresh_state = expanded.student.state_dict(), expanded.fresh.state_dict()
    for suffix in ("weight", "bias"):
        key = f"head.cls_score.{suffix}"
        assert torch.equal(s_state[key][new_rows], fresh_state[key][new_rows])
    torch.testing.assert_close(s_state["head.cls_score.bias"][new_rows],
                               torch.full((len(new_rows),), -math.log((1 - PRIOR) / PRIOR)))
    # Old anchor a, class k: row a*K + k of the teacher is row a*(K+N) + k of the student.
    t_weight = expanded.teacher.state_dict()["head.cls_score.weight"]
    for a in range(anchors):
        for k in range(NUM_OLD):
            assert torch.equal(s_state["head.cls_score.weight"][a * per_anchor + k], t_weight[a * NUM_OLD + k])


def test_everything_but_the_classifier_is_copied(expanded):
    t_state, s_state = expanded.teacher.state_dict(), expanded.student.state_dict()
    assert set(t_state) == set(s_state)
    for key, value in t_state.items():
        if not key.startswith("head.cls_score."):
            assert torch.equal(s_state[key], value), key


def test_a_wrong_old_class_count_is_refused(expanded):
    with pytest.raises(ValueError, match=f"old model has {NUM_OLD} classes, the schedule says 2"):
        load_expanded(_model(expanded.arch, 4, 2, *NINE_ANCHORS.get(expanded.arch, ())), expanded.teacher.state_dict(), 2)


# ------------------------------------------------------------------ class count of a checkpoint


@pytest.mark.parametrize("arch, classifier_rows", [
    ("IncrementalRCNN", NUM_OLD + 1),  # + the background row
    ("RetinaNet", 9 * NUM_OLD),        # 9 anchors per location
    ("FCOS", NUM_OLD),
])  # fmt: skip
def test_the_class_count_is_read_from_each_detectors_checkpoint(arch, classifier_rows, tmp_path):
    state = _model(arch, NUM_OLD, 0, *NINE_ANCHORS.get(arch, ())).state_dict()
    key = "roi_heads.box_predictor.cls_score.weight" if arch == "IncrementalRCNN" else "head.cls_score.weight"
    assert state[key].shape[0] == classifier_rows
    assert state_dict_num_classes(state) == NUM_OLD
    path = tmp_path / "model.pth"
    torch.save({"model": state, "ilmil": {"class_names": CLASSES[:NUM_OLD]}}, path)
    checkpoint, num_classes = load_checked_checkpoint(str(path), CLASSES[:NUM_OLD])
    assert num_classes == NUM_OLD and checkpoint["ilmil"]["class_names"] == CLASSES[:NUM_OLD]
    with pytest.raises(TeacherMismatchError, match=r"holds \[.*\], but the schedule expects the 2 old classes"):
        load_checked_checkpoint(str(path), CLASSES[:2])


def test_a_checkpoint_without_a_classifier_is_refused(tmp_path):
    path = tmp_path / "backbone.pth"
    torch.save({"model": {"backbone.bottom_up.stem.conv1.weight": torch.zeros(64, 3, 7, 7)}}, path)
    with pytest.raises(CheckpointError, match="holds no classifier .* not a Faster R-CNN, RetinaNet, FCOS or YOLO detector"):
        load_checked_checkpoint(str(path))


# ------------------------------------------------------------------ what the toolkit refuses


@pytest.mark.parametrize("arch", DENSE)
def test_teacher_methods_are_refused_for_a_plain_dense_detector_with_the_fix(arch):
    # detectron2's own RetinaNet / FCOS cannot hold a teacher; the configs name the student classes.
    cfg = _cfg(arch, 20, "MODEL.META_ARCHITECTURE", arch, method="ilmil")
    with pytest.raises(ConfigError, match=f"method ilmil needs a student MODEL.META_ARCHITECTURE to hold its "
                                          f"teacher, got {arch}; fix: IncrementalRCNN, IncrementalRetinaNet"):
        IncrementalRun(cfg)


@pytest.mark.parametrize("arch", DENSE)
def test_the_dense_students_offer_their_own_method_presets(arch):
    assert _cfg(arch, 20, method="ilmil").ILMIL.DISTILL.DENSE.ENABLED
    with pytest.raises(ConfigError, match=r"--method 'faster-ilod': choose one of finetune, ilmil, joint, pseudo "
                                          rf"\(the methods of MODEL.META_ARCHITECTURE Incremental{arch}\)"):
        _cfg(arch, 20, method="faster-ilod")


@pytest.mark.parametrize("arch", DENSE)
def test_box_head_pruning_is_refused_for_dense_detectors_with_the_fix(arch):
    with pytest.raises(PruningError, match=f"ILMIL.PRUNING.BOX_HEAD_RATIO .* 0.5: MODEL.META_ARCHITECTURE Incremental{arch} "
                                           "has no fully connected box head; fix: 0"):
        check_pruning_config(_cfg(arch, 20, "ILMIL.PRUNING.BOX_HEAD_RATIO", 0.5))


# ------------------------------------------------------------------ tools/train_incremental.py


def _run(arch, out, datasets_root, *args):
    proc = run_tool("train_incremental.py", ["--config-file", _config_file(arch), "--stages", "2+2",
                                             "--output-dir", str(out), *args, *SHAPES_OPTS, *TRAIN_OPTS],
                    datasets_root, timeout=180)
    proc.out = out
    return proc


def _is_percent(value):
    return isinstance(value, float) and math.isfinite(value) and 0.0 <= value <= 100.0


def _check_results(out, stages):
    """results.json holds every stage's AP numbers and per-class AP; the run's report is written."""
    results = read_json(out / "results.json")
    assert [(s["stage"], s["old_classes"], s["new_classes"]) for s in results["stages"]] == stages
    for entry in results["stages"]:
        assert _is_percent(entry["AP50"]) and _is_percent(entry["AP50_new"])
        assert _is_percent(entry["AP50_class_agnostic"]) and _is_percent(entry["AP_class_agnostic"])
        assert list(entry["per_class"]) == entry["old_classes"] + entry["new_classes"]
    assert (out / "report.md").is_file() and (out / "per_class_ap.csv").is_file()
    return results


def _num_classes(path):
    return state_dict_num_classes(safe_load(str(path))["model"])


# After 6 iterations every RetinaNet score is still near the prior (0.01): below the
# default test threshold (0.05), which would leave the evaluation nothing to count.
RETINANET_OPTS = ["MODEL.RETINANET.SCORE_THRESH_TEST", "0.001"]


@pytest.fixture(scope="module")
def retinanet_finetune(tiny_datasets_root, tmp_path_factory):
    proc = _run("RetinaNet", tmp_path_factory.mktemp("retinanet") / "run", tiny_datasets_root,
                "--method", "finetune", *RETINANET_OPTS)
    assert proc.returncode == 0, tail(proc)
    return proc


def test_retinanet_finetune_runs_both_stages_with_an_expanded_classifier(retinanet_finetune):
    out = retinanet_finetune.out
    results = _check_results(out, [(0, [], CLASSES[:2]), (1, CLASSES[:2], CLASSES[2:])])
    assert results["config"]["MODEL"]["META_ARCHITECTURE"] == "IncrementalRetinaNet"
    assert _is_percent(results["stages"][1]["AP50_old"])
    assert [_num_classes(out / f"stage_{k}" / "model_final.pth") for k in (0, 1)] == [2, 4]
    assert "Student initialised from a 2-class model (classifier expanded)" in retinanet_finetune.log
    logged = set().union(*(line.keys() for line in metrics_lines(out / "stage_1" / "metrics.json")))
    assert {"loss_cls", "loss_box_reg"} <= logged and not any(k.startswith("loss_distill") for k in logged)


def test_reevaluating_a_retinanet_run_reproduces_its_detections(retinanet_finetune, tiny_datasets_root,
                                                               monkeypatch, tmp_path):
    monkeypatch.setenv("ILMIL_DATASETS", str(tiny_datasets_root))
    out = retinanet_finetune.out
    again = evaluate_run(str(out), str(tmp_path / "eval"), progress=False)["stages"]
    for before, after in zip(read_json(out / "results.json")["stages"], again):
        for key in ("AP", "AP50", "num_detections"):
            assert after[key] == pytest.approx(before[key]), key
        k = before["stage"]
        trained = read_json(out / f"stage_{k}" / "detections.json")
        assert len(trained) > 0
        evaluated = read_json(tmp_path / "eval" / f"stage_{k}" / "detections.json")
        assert [(d["image_id"], d["category_id"]) for d in evaluated] == [(d["image_id"], d["category_id"])
                                                                          for d in trained]
    assert [e["stage"] for e in again] == [0, 1]


def test_retinanet_starts_from_a_given_model_of_its_own_architecture(retinanet_finetune, tiny_datasets_root,
                                                                      tmp_path):
    teacher = retinanet_finetune.out / "stage_0" / "model_final.pth"
    proc = _run("RetinaNet", tmp_path / "run", tiny_datasets_root, "--method", "finetune",
                "--start-stage", "1", "--teacher-weights", str(teacher), *RETINANET_OPTS)
    assert proc.returncode == 0, tail(proc)
    results = _check_results(proc.out, [(0, [], CLASSES[:2]), (1, CLASSES[:2], CLASSES[2:])])
    assert results["stages"][0]["weights"] == str(teacher)  # evaluated as stage 0, not trained
    assert results["stages"][0]["AP50"] == read_json(retinanet_finetune.out / "results.json")["stages"][0]["AP50"]
    # Another architecture's config refuses it before any work, in one line.
    proc = _run("IncrementalRCNN", tmp_path / "refused", tiny_datasets_root, "--method", "finetune",
                "--start-stage", "1", "--teacher-weights", str(teacher))
    assert proc.returncode == 1 and "Traceback" not in proc.log, tail(proc)
    assert f"--teacher-weights: checkpoint {teacher} does not fit the config's model" in proc.log
    assert not (tmp_path / "refused" / "stage_1").exists()


def test_fcos_joint_trains_every_class_in_one_stage(tiny_datasets_root, tmp_path):
    proc = _run("FCOS", tmp_path / "run", tiny_datasets_root, "--method", "joint")
    assert proc.returncode == 0, tail(proc)
    results = _check_results(proc.out, [(0, [], CLASSES)])
    assert results["method"] == "joint" and results["config"]["MODEL"]["META_ARCHITECTURE"] == "IncrementalFCOS"
    assert _num_classes(proc.out / "stage_0" / "model_final.pth") == 4
    lines = metrics_lines(proc.out / "stage_0" / "metrics.json")
    assert {"loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr"} <= set().union(*(line.keys() for line in lines))
    assert max(line["iteration"] for line in lines if "total_loss" in line) == 11  # joint: 2 x 6 iterations


def test_fcos_finetune_after_pruning_its_backbone(tiny_datasets_root, tmp_path):
    proc = _run("FCOS", tmp_path / "run", tiny_datasets_root, "--method", "finetune", "--prune", "0.5")
    assert proc.returncode == 0, tail(proc)
    _check_results(proc.out, [(0, [], CLASSES[:2]), (1, CLASSES[:2], CLASSES[2:])])
    summary = read_json(proc.out / "stage_0" / "pruned" / "pruning.json")
    assert summary["after"]["params"] < 0.8 * summary["before"]["params"]
    final = safe_load(str(proc.out / "stage_1" / "model_final.pth"))
    name = "backbone.bottom_up.res4.1.conv1"
    assert final["ilmil"]["channel_layout"][name] == 256 // 2  # the student kept the pruned widths
    assert state_dict_num_classes(final["model"]) == 4
