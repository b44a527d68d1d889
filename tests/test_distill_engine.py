"""The distillation engine (ilmil.distill): a teacher built from its own config and
loaded strictly, outputs recorded by name, connectors between widths, the loss
registry driven by the config, fixed and learned term weights, and the README's
example loss run as written."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from torch import nn

from detectron2.layers import ShapeSpec
from detectron2.modeling import GeneralizedRCNN, build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from ilmil.checkpoint import CheckpointError, IncrementalCheckpointer
from ilmil.config import CONFIGS_DIR, ConfigError, get_ilmil_cfg
from ilmil.distill import (
    DistillContext,
    Distiller,
    FeatureDistillation,
    FGFIImitation,
    Recorder,
    build_teacher,
    check_distill_config,
    enabled_terms,
)
from ilmil.distill.losses.feature import standardize
from ilmil.distill.masks import fgfi_mask, gt_box_mask
from ilmil.modeling import load_expanded
from tool_runs import SHAPES_OPTS, TRAIN_OPTS, metrics_lines, run_tool, tail

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_OLD, NUM_ALL = 3, 5
IMAGE_SIZE = (64, 96)


def _cfg(num_classes, *opts, method="ilmil"):
    return get_ilmil_cfg(None, ["MODEL.ROI_HEADS.NUM_CLASSES", num_classes, "MODEL.DEVICE", "cpu", *opts],
                         method=method)


@pytest.fixture(scope="module")
def teacher_state():
    torch.manual_seed(0)
    return build_model(_cfg(NUM_OLD, method="finetune")).state_dict()


@pytest.fixture(scope="module")
def teacher_path(teacher_state, tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "teacher.pth"
    torch.save({"model": teacher_state}, path)
    return str(path)


def _batch():
    gen = torch.Generator().manual_seed(0)
    inst = Instances(IMAGE_SIZE)
    inst.gt_boxes = Boxes(torch.tensor([[10.0, 10.0, 40.0, 40.0]]))
    inst.gt_classes = torch.tensor([3])
    return [{"image": torch.rand(3, *IMAGE_SIZE, generator=gen) * 255, "instances": inst} for _ in range(2)]


# --------------------------------------------------------------------------- the registry and the config


def test_enabled_sections_become_terms_in_config_order():
    assert list(enabled_terms(_cfg(NUM_ALL))) == ["FEAT", "RPN", "RCN"]
    assert list(enabled_terms(_cfg(NUM_ALL, "ILMIL.DISTILL.FGFI.ENABLED", True))) == ["FEAT", "RPN", "RCN", "FGFI"]
    assert list(enabled_terms(_cfg(NUM_ALL, "ILMIL.DISTILL.RPN.ENABLED", False))) == ["FEAT", "RCN"]
    assert enabled_terms(_cfg(NUM_ALL, method="finetune")) == {}


def test_an_enabled_section_that_no_loss_claims_is_refused_with_the_registered_ones():
    cfg = _cfg(NUM_ALL)
    cfg.ILMIL.DISTILL.NOT_A_LOSS = type(cfg)({"ENABLED": True, "WEIGHT": 1.0})
    with pytest.raises(ConfigError, match=r"ILMIL\.DISTILL\.NOT_A_LOSS\.ENABLED.*AT, DENSE, FEAT, FGFI, FSP, INFOMAP, RCN, REVIEW, RPN"):
        enabled_terms(cfg)


def test_a_layer_the_model_lacks_is_refused_before_training_with_the_available_names():
    cfg = _cfg(NUM_ALL, "ILMIL.DISTILL.FEAT.LAYERS", ["p3", "p9"])
    with pytest.raises(ConfigError, match=r"ILMIL\.DISTILL\.FEAT\.LAYERS: .* no layer 'p9'.*p2, p3.*res2") as e:
        check_distill_config(cfg)
    assert "proposal_generator.rpn_head" in str(e.value)


def test_a_layer_only_the_teacher_lacks_names_the_teachers_config():
    # A Faster R-CNN student imitating res2 of a teacher given FCOS's config (whose backbone starts at res3).
    fcos = os.path.join(CONFIGS_DIR, "shapes", "fcos_R18_FPN_cpu.yaml")
    cfg = _cfg(NUM_ALL, "ILMIL.DISTILL.FEAT.LAYERS", ["res2"], "ILMIL.TEACHER.CONFIG_FILE", fcos)
    with pytest.raises(ConfigError, match=rf"^ILMIL\.DISTILL\.FEAT\.LAYERS, in the teacher of ILMIL\.TEACHER\.CONFIG_FILE "
                                          rf"{re.escape(fcos)}: FCOS has no layer 'res2'; fix:"):
        check_distill_config(cfg)


@pytest.mark.parametrize("student, section, theirs", [
    ("retinanet_R18_FPN_cpu.yaml", "DENSE", "[9, 9, 9, 9, 9]"),  # detectron2's 3 sizes x 3 aspect ratios
    ("faster_rcnn_R18_FPN_cpu.yaml", "RPN", "[9, 9, 9, 9, 9]"),
])
def test_a_teacher_of_other_anchors_per_location_is_refused_for_the_head_terms(student, section, theirs, tmp_path):
    teacher = tmp_path / "teacher.yaml"
    teacher.write_text(f'_BASE_: "{os.path.join(CONFIGS_DIR, "shapes", student)}"\n'
                       "MODEL:\n  ANCHOR_GENERATOR:\n    SIZES: [[32, 40, 50], [64, 80, 101], [128, 161, 203], "
                       "[256, 322, 406], [512, 645, 812]]\n    ASPECT_RATIOS: [[0.5, 1.0, 2.0]]\n")
    cfg = _shapes_cfg(student, f"ILMIL.DISTILL.{section}.ENABLED", True, "ILMIL.TEACHER.CONFIG_FILE", str(teacher))
    ours = "[1, 1, 1, 1, 1]" if section == "DENSE" else "[3, 3, 3, 3, 3]"
    with pytest.raises(ConfigError, match=re.escape(f"ILMIL.DISTILL.{section}.ENABLED True: the student's head has "
                                                    f"{ours} anchors per location (level by level), the teacher's of "
                                                    f"ILMIL.TEACHER.CONFIG_FILE {teacher} {theirs}")):
        check_distill_config(cfg)


def _shapes_cfg(config, *opts):
    return get_ilmil_cfg(os.path.join(CONFIGS_DIR, "shapes", config), ["MODEL.DEVICE", "cpu", *opts], method="finetune")


@pytest.mark.parametrize("key, value, message", [
    ("ILMIL.DISTILL.FEAT.WEIGHT", -1.0, r"ILMIL\.DISTILL\.FEAT\.WEIGHT -1\.0: must be at least 0; fix: e\.g\. "),
    ("ILMIL.DISTILL.REVIEW.WEIGHT", -0.5, r"REVIEW\.WEIGHT -0\.5: must be at least 0"),  # checked while off too
    ("ILMIL.DISTILL.RCN.TEMPERATURE", 0.0, r"RCN\.TEMPERATURE 0\.0: must be above 0; fix: e\.g\. .*TEMPERATURE 2\.0"),
    ("ILMIL.DISTILL.DENSE.TEMPERATURE", -1.0, r"DENSE\.TEMPERATURE -1\.0: must be above 0"),
    ("ILMIL.DISTILL.RCN.TOPK", 0, r"RCN\.TOPK 0: must be at least 1"),
    ("ILMIL.DISTILL.RCN.NUM_SAMPLES", -3, r"RCN\.NUM_SAMPLES -3: must be at least 1"),
    ("ILMIL.DISTILL.RCN.NEW_GT_IOU_THRESH", 1.5, r"RCN\.NEW_GT_IOU_THRESH 1\.5: must be in \[0, 1\]"),
    ("ILMIL.DISTILL.FGFI.PSI", -1.0, r"FGFI\.PSI -1\.0: must be in \(0, 1\)"),
    ("ILMIL.DISTILL.FGFI.PSI", 1.0, r"FGFI\.PSI 1\.0: must be in \(0, 1\)"),  # IoU > the best IoU: no location
    ("ILMIL.DISTILL.FEAT.EMA_MOMENTUM", 1.5, r"FEAT\.EMA_MOMENTUM 1\.5: must be in \[0, 1\)"),
    ("ILMIL.DISTILL.REVIEW.BG_WEIGHT", -1.0, r"REVIEW\.BG_WEIGHT -1\.0: must be at least 0"),
    ("ILMIL.DISTILL.FEAT.WEIGHT", 0.0, r"FEAT\.WEIGHT 0 with ILMIL\.DISTILL\.FEAT\.ENABLED True: .*fix: "
                                        r"ILMIL\.DISTILL\.FEAT\.ENABLED False"),  # on in _cfg's method
    ("ILMIL.PSEUDO_LABELS.CROSS_CLASS_IOU", 0.0, r"CROSS_CLASS_IOU 0\.0: must be in \(0, 1\]"),  # NMS would keep one box
])
def test_a_value_out_of_its_range_is_refused_before_training(key, value, message):
    # A temperature of 0 made the term NaN at the first step, a negative one reversed the
    # softmax, a negative weight trained away from the teacher, NUM_SAMPLES -3 kept all but 3.
    with pytest.raises(ConfigError, match=message):
        check_distill_config(_cfg(NUM_ALL, key, value))


@pytest.mark.parametrize("cfg, message", [
    # A term that needs each layer's stride (its GT mask) or width (review's fusions) refuses a module path.
    (lambda: _cfg(NUM_ALL, "ILMIL.DISTILL.REVIEW.ENABLED", True, "ILMIL.DISTILL.REVIEW.LAYERS",
                  ["p3", "backbone.bottom_up.res4"]),
     r"ILMIL\.DISTILL\.REVIEW\.LAYERS: backbone\.bottom_up\.res4 is not a feature map .*fix: name feature maps \(.*p3"),
    (lambda: _cfg(NUM_ALL, "ILMIL.DISTILL.FGFI.ENABLED", True, "ILMIL.DISTILL.FGFI.LAYERS", ["backbone.fpn_output3"]),
     r"ILMIL\.DISTILL\.FGFI\.LAYERS: backbone\.fpn_output3 is not a feature map"),
    (lambda: _shapes_cfg("yolov3_cpu.yaml", "ILMIL.DISTILL.INFOMAP.ENABLED", True, "ILMIL.DISTILL.INFOMAP.LAYERS",
                         ["backbone.bottom_up.dark3"]),
     r"ILMIL\.DISTILL\.INFOMAP\.LAYERS: backbone\.bottom_up\.dark3 is not a feature map .*dark3"),
    (lambda: _cfg(NUM_ALL, "ILMIL.DISTILL.FGFI.ENABLED", True, "ILMIL.DISTILL.FGFI.LAYERS", []),
     r"ILMIL\.DISTILL\.FGFI\.LAYERS is empty"),
    (lambda: _cfg(NUM_ALL, "ILMIL.DISTILL.FEAT.WEIGHT_RANGE", (0.5,)),
     r"ILMIL\.DISTILL\.FEAT\.WEIGHT_RANGE \[0\.5\]: .*fix: two numbers"),
    (lambda: _shapes_cfg("fcos_R18_FPN_cpu.yaml", "ILMIL.DISTILL.FEAT.ENABLED", True, "MODEL.BACKBONE.NAME",
                         "build_any_width_retinanet_resnet_fpn_backbone", "MODEL.RESNETS.OUT_FEATURES",
                         ["res3", "res4"], "MODEL.FPN.IN_FEATURES", ["res3", "res4"]),
     r"MODEL\.RESNETS\.OUT_FEATURES \['res3', 'res4'\]: this FPN makes p6 and p7 from res5; fix: include res5"),
    # The RCN term distils a box head: a one-stage detector has none.
    (lambda: _shapes_cfg("fcos_R18_FPN_cpu.yaml", "ILMIL.DISTILL.RCN.ENABLED", True),
     r"ILMIL\.DISTILL\.RCN\.ENABLED True: .* which IncrementalFCOS has not; fix: set it False"),
])
def test_a_term_the_model_cannot_feed_is_refused_before_training(cfg, message):
    with pytest.raises(ConfigError, match=message):
        check_distill_config(cfg())


def test_a_module_path_of_another_width_is_refused_by_name_at_the_first_step():
    term = FeatureDistillation(layers=["backbone.bottom_up.res4.0"])
    student, teacher = {"backbone.bottom_up.res4.0": torch.rand(1, 4, 8, 8)}, {"backbone.bottom_up.res4.0": torch.rand(1, 8, 8, 8)}
    with pytest.raises(ConfigError, match=r"FEAT\.LAYERS: backbone\.bottom_up\.res4\.0 is \(1, 4, 8, 8\) in the student "
                                          r"and \(1, 8, 8, 8\) in the teacher; fix: name a feature map"):
        term(student, teacher)


def test_module_paths_are_recorded_during_a_recording_pass_only(teacher_state):
    model = build_model(_cfg(NUM_OLD, method="finetune")).eval()
    recorder = Recorder(model, ["p3", "res4", "backbone.bottom_up.stem"])
    x = torch.rand(1, 3, 64, 64)
    model.backbone(x)  # not recording: nothing kept
    with pytest.raises(RuntimeError, match="did not run"):
        recorder.collect()
    with recorder.recording():
        features = model.backbone(x)
    recorded = recorder.collect()
    assert recorded["p3"] is features["p3"]
    assert recorded["res4"].shape[1] == model.backbone.bottom_up.output_shape()["res4"].channels
    assert recorded["backbone.bottom_up.stem"].shape[1] == 64


# --------------------------------------------------------------------------- the distiller


class _Constant(nn.Module):
    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, student, teacher, context):
        return student["x"].sum() * 0 + self.value


def test_fixed_weights_scale_each_term_and_name_it_by_its_section():
    distiller = Distiller({"FEAT": _Constant(2.0), "RPN": _Constant(3.0)}, {"FEAT": 0.5, "RPN": 2.0})
    losses = distiller({"x": torch.zeros(1)}, {}, None)
    assert {k: v.item() for k, v in losses.items()} == {"loss_distill_feat": 1.0, "loss_distill_rpn": 6.0}


def test_uncertainty_weights_follow_the_formula_and_learn():
    distiller = Distiller({"FEAT": _Constant(2.0)}, {"FEAT": 0.5}, "uncertainty")
    log_var = distiller.log_variances["feat"]
    with torch.no_grad():
        log_var.fill_(0.4)
    loss = distiller({"x": torch.zeros(1)}, {}, None)["loss_distill_feat"]
    # w L / (2 s^2) + log s, with s^2 = exp(0.4): 0.5 * 2 * exp(-0.4) / 2 + 0.2
    assert loss.item() == pytest.approx(0.5 * 2.0 * torch.exp(torch.tensor(-0.4)).item() / 2 + 0.2, rel=1e-6)
    loss.backward()
    # d/dv (c e^{-v} / 2 + v / 2) = -c e^{-v} / 2 + 1/2 with c = 1
    assert log_var.grad.item() == pytest.approx(-torch.exp(torch.tensor(-0.4)).item() / 2 + 0.5, rel=1e-5)


# --------------------------------------------------------------------------- connectors


def test_differing_widths_need_a_connector_named_by_key_and_widths():
    student, teacher = {"p3": ShapeSpec(channels=32, stride=8)}, {"p3": ShapeSpec(channels=64, stride=8)}
    cfg = _cfg(NUM_ALL, "ILMIL.DISTILL.FEAT.LAYERS", ["p3"], "ILMIL.DISTILL.CONNECTOR", "")
    with pytest.raises(ConfigError, match=r"ILMIL\.DISTILL\.FEAT\.LAYERS: layer p3 has 32 channels in the student "
                                          r"and 64 in the teacher.*ILMIL\.DISTILL\.CONNECTOR Conv1x1BN"):
        FeatureDistillation(cfg, student, teacher)


def test_a_connector_maps_a_narrow_student_and_gets_gradients_with_it():
    cfg = _cfg(NUM_ALL, "ILMIL.DISTILL.FEAT.LAYERS", ["p3", "p4"], "ILMIL.DISTILL.FEAT.DISTANCE", "l2")
    shapes = {"p3": ShapeSpec(channels=32, stride=8), "p4": ShapeSpec(channels=64, stride=16)}
    teacher_shapes = {"p3": ShapeSpec(channels=64, stride=8), "p4": ShapeSpec(channels=64, stride=16)}
    loss_fn = FeatureDistillation(cfg, shapes, teacher_shapes)
    assert list(loss_fn.connectors) == ["p3"]  # p4's widths match: compared as it is
    s = {"p3": torch.randn(2, 32, 8, 8, requires_grad=True), "p4": torch.randn(2, 64, 4, 4, requires_grad=True)}
    t = {"p3": torch.randn(2, 64, 8, 8, requires_grad=True), "p4": s["p4"].detach().clone().requires_grad_()}
    loss = loss_fn(s, t)
    assert loss.item() > 0
    loss.backward()
    assert s["p3"].grad.abs().sum() > 0 and s["p4"].grad is not None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss_fn.connectors.parameters())
    assert t["p3"].grad is None and t["p4"].grad is None


def test_a_student_of_another_stride_is_resized_to_the_teacher():
    cfg = _cfg(NUM_ALL, "ILMIL.DISTILL.FEAT.LAYERS", ["p3"], "ILMIL.DISTILL.FEAT.DISTANCE", "l2",
               "ILMIL.DISTILL.FEAT.LAYER_WEIGHTING", "uniform")
    loss_fn = FeatureDistillation(cfg)
    # Each row of the 2x2 student map is [0, 4]; bilinear (half-pixel centres) to 4x4 makes it
    # [0, 1, 3, 4] (source x = -0.25 clamped, 0.25, 0.75, 1.25 clamped), so against a zero
    # teacher the l2 distance is (0 + 1 + 9 + 16) / 4 = 6.5 (nearest: 8; a blurred map: 4).
    student = torch.tensor([0.0, 4.0]).repeat(1, 4, 2, 1)
    assert loss_fn({"p3": student}, {"p3": torch.zeros(1, 4, 4, 4)}).item() == pytest.approx(6.5)


# --------------------------------------------------------------------------- the teacher


def test_teacher_loading_is_strict_about_unexpected_and_mis_shaped_tensors(teacher_state, tmp_path):
    extra = tmp_path / "extra.pth"
    torch.save({"model": {**teacher_state, "roi_heads.mask_head.weight": torch.zeros(3)}}, extra)
    with pytest.raises(CheckpointError, match=r"1 tensor\(s\).*roi_heads\.mask_head\.weight.*ILMIL\.TEACHER\.CONFIG_FILE"):
        build_teacher(_cfg(NUM_ALL), str(extra))
    wide = tmp_path / "wide.pth"
    torch.save({"model": {**teacher_state, "backbone.fpn_output3.weight": torch.zeros(64, 128, 3, 3)}}, wide)
    with pytest.raises(CheckpointError, match=r"fpn_output3\.weight: \(64, 128, 3, 3\) in the checkpoint"):
        build_teacher(_cfg(NUM_ALL), str(wide))


def test_a_teacher_of_its_own_config_file_and_width(tmp_path):
    # A wider teacher (FPN 128 channels) distilled into the default student (64).
    config = tmp_path / "wide_teacher.yaml"
    config.write_text(f'_BASE_: "{REPO_ROOT}/configs/shapes/faster_rcnn_R18_FPN_cpu.yaml"\n'
                      "MODEL:\n  FPN:\n    OUT_CHANNELS: 128\n  PIXEL_MEAN: [100.0, 110.0, 120.0]\n")
    torch.manual_seed(0)
    wide = build_model(get_ilmil_cfg(str(config), ["MODEL.ROI_HEADS.NUM_CLASSES", NUM_ALL], method="finetune"))
    weights = tmp_path / "wide.pth"
    torch.save({"model": wide.state_dict()}, weights)
    cfg = _cfg(NUM_ALL, "ILMIL.TEACHER.CONFIG_FILE", str(config), "ILMIL.TEACHER.WEIGHTS", str(weights),
               "ILMIL.DISTILL.FEAT.LAYERS", ["p3", "res4"], "ILMIL.PSEUDO_LABELS.ENABLED", False,
               "ILMIL.DISTILL.RPN.ENABLED", False, "ILMIL.DISTILL.RCN.ENABLED", False)
    check_distill_config(cfg)
    student = build_model(cfg).train()
    assert type(student.teacher) is GeneralizedRCNN
    assert student.teacher.backbone.output_shape()["p3"].channels == 128
    assert student.teacher.pixel_mean.flatten().tolist() == [100.0, 110.0, 120.0]  # its own normalisation
    feat = student.distiller.term("FEAT")
    assert list(feat.connectors) == ["p3"]
    with EventStorage():
        losses = student(_batch())
    losses["loss_distill_feat"].backward()
    assert all(p.grad is not None for p in feat.connectors.parameters())
    assert all(p.grad is None for p in student.teacher.parameters())
    # The connector is distillation state: a plain detector loads the student's weights without it.
    assert any(k.startswith("distiller.terms.feat.connectors.p3") for k in student.state_dict())
    plain = build_model(_cfg(NUM_ALL, method="finetune"))
    saved = tmp_path / "student.pth"
    torch.save({"model": student.state_dict()}, saved)
    IncrementalCheckpointer(plain).load(str(saved))
    assert torch.equal(plain.backbone.fpn_output3.weight, student.backbone.fpn_output3.weight)


def test_the_teacher_normalises_its_input_its_own_way(tmp_path, teacher_path):
    student = build_model(_cfg(NUM_ALL, "ILMIL.TEACHER.WEIGHTS", teacher_path))
    batch = _batch()
    images = student.preprocess_image(batch)
    assert student._teacher.images(batch, images, student) is images  # same normalisation: shared
    with torch.no_grad():
        student.teacher.pixel_mean.add_(10.0)
    own = student._teacher.images(batch, images, student)
    assert own is not images and torch.allclose(own.tensor, images.tensor - 10.0 / student.pixel_std, atol=1e-4)


# --------------------------------------------------------------------------- a new loss: one file plus config


def _readme_example():
    with open(os.path.join(REPO_ROOT, "README.md")) as f:
        section = f.read().split("### Writing a distillation loss", 1)[1]
    return re.findall(r"```python\n(.*?)```", section, re.S)[0]


_EXAMPLE_RUN = """
import json, sys, torch
import ilmil
import my_losses  # noqa: F401
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from ilmil.config import get_ilmil_cfg
from ilmil.modeling import load_expanded
sys.path.insert(0, {tests!r})
from test_distill_engine import _batch

torch.set_num_threads(1)
cfg = get_ilmil_cfg(None, ["MODEL.ROI_HEADS.NUM_CLASSES", 5, "ILMIL.TEACHER.WEIGHTS", {teacher!r},
                           "ILMIL.DISTILL.FEAT_L1.ENABLED", True], method="ilmil")
student = build_model(cfg)
load_expanded(student, torch.load({teacher!r}, weights_only=True)["model"], 3)
student.freeze_bn_stats()
out = {{}}
with EventStorage():
    out["equal"] = float(student(_batch())["loss_distill_feat_l1"])
    with torch.no_grad():
        student.backbone.fpn_output3.weight.add_(0.05)
    loss = student(_batch())["loss_distill_feat_l1"]
    loss.backward()
out["perturbed"] = float(loss)
out["grad"] = float(student.backbone.fpn_output3.weight.grad.abs().sum())
# A compression student, its FPN of 32 channels against the teacher's 64: through a connector.
narrow = build_model(get_ilmil_cfg({kd_student!r}, [
    "MODEL.ROI_HEADS.NUM_CLASSES", 5, "MODEL.DEVICE", "cpu", "ILMIL.TEACHER.WEIGHTS", {teacher!r},
    "ILMIL.TEACHER.CONFIG_FILE", {kd_teacher!r}, "ILMIL.DISTILL.FEAT.ENABLED", False,
    "ILMIL.DISTILL.RCN.ENABLED", False, "ILMIL.DISTILL.FEAT_L1.ENABLED", True], method="finetune"))
with EventStorage():
    loss = narrow(_batch())["loss_distill_feat_l1"]
    loss.backward()
out["narrow"] = float(loss)
out["connector_grad"] = float(sum(p.grad.abs().sum() for p in narrow.distiller.parameters()))
# Imported above as a module, named again as a file (a run's config.yaml): registered once.
get_ilmil_cfg(None, ["ILMIL.PLUGINS", "['my_losses.py']"])
print(json.dumps(out))
"""


def test_the_readme_example_loss_is_one_file_plus_config(tmp_path, teacher_path):
    (tmp_path / "my_losses.py").write_text(_readme_example())
    shapes = os.path.join(CONFIGS_DIR, "shapes")
    script = _EXAMPLE_RUN.format(tests=os.path.join(REPO_ROOT, "tests"), teacher=teacher_path,
                                 kd_student=os.path.join(shapes, "kd", "faster_rcnn_R18_FPN32_student_cpu.yaml"),
                                 kd_teacher=os.path.join(shapes, "faster_rcnn_R18_FPN_cpu.yaml"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), REPO_ROOT]), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["perturbed"] > 1e-4 and out["grad"] > 0
    assert out["narrow"] > 0 and out["connector_grad"] > 0
    # The expanded student equals its teacher: zero up to the rounding of the teacher's
    # BatchNorms folded into its convolutions (2e-6 on an AVX2-only CPU, against ~0.4).
    assert out["equal"] < 1e-3 * out["perturbed"]


def test_the_tools_import_a_plugin_loss_named_in_the_config_and_so_does_the_runs_evaluation(tiny_datasets_root,
                                                                                            tmp_path):
    (tmp_path / "my_losses.py").write_text(_readme_example())
    out = tmp_path / "run"
    # Relative to the folder the tool runs in; the run's config.yaml holds it absolute.
    relative = os.path.relpath(tmp_path / "my_losses.py", REPO_ROOT)
    plugin = ["ILMIL.PLUGINS", f"['{relative}']", "ILMIL.DISTILL.FEAT_L1.ENABLED", "True",
              "ILMIL.DISTILL.FEAT_L1.LAYERS", "['p3', 'res4']"]
    proc = run_tool("train_incremental.py", ["--stages", "2+2", "--method", "ilmil", "--output-dir", str(out),
                                             *SHAPES_OPTS, *TRAIN_OPTS, *plugin], tiny_datasets_root, timeout=600)
    assert proc.returncode == 0, tail(proc)
    logged = [line["loss_distill_feat_l1"] for line in metrics_lines(out / "stage_1" / "metrics.json")
              if "loss_distill_feat_l1" in line]
    assert logged and all(value > 0 for value in logged)
    assert str(tmp_path / "my_losses.py") in (out / "config.yaml").read_text()
    proc = run_tool("eval_incremental.py", ["--run-dir", str(out), "--output-dir", str(tmp_path / "eval")],
                    tiny_datasets_root, timeout=300)
    assert proc.returncode == 0, tail(proc)
    proc = run_tool("train_incremental.py", ["--stages", "2+2", "--output-dir", str(tmp_path / "bad"), *SHAPES_OPTS,
                                             "ILMIL.PLUGINS", "['no_such_losses.py']"], tiny_datasets_root)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith(
        "error: ILMIL.PLUGINS no_such_losses.py: cannot import it (FileNotFoundError: no such file")
    proc = run_tool("train_incremental.py", ["--stages", "2+2", "--output-dir", str(tmp_path / "bad"), *SHAPES_OPTS,
                                             "ILMIL.PLUGINS", "my_losses.py"], tiny_datasets_root)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith(
        "error: ILMIL.PLUGINS 'my_losses.py': a list of modules or .py files; fix:")


# --------------------------------------------------------------------------- FGFI masks and loss


def _gt(boxes, size=(32, 32)):
    inst = Instances(size)
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).view(-1, 4))
    inst.gt_classes = torch.zeros(len(inst.gt_boxes), dtype=torch.int64)
    return inst


def test_gt_box_mask_marks_the_cells_whose_centre_is_inside_a_box():
    # stride 8, 4 x 4 cells: centres at 4, 12, 20, 28; the box covers 0..16 in x and y.
    mask = gt_box_mask([_gt([[0, 0, 16, 16]]), _gt([])], (4, 4), 8)
    expected = torch.zeros(2, 4, 4)
    expected[0, :2, :2] = 1
    assert torch.equal(mask, expected)


def test_fgfi_mask_keeps_anchors_above_half_the_best_iou_of_a_box():
    # One anchor per cell of a 2 x 2 level: [0,0,16,16], [16,0,32,16], [0,16,16,32], [16,16,32,32].
    anchors = {"p3": Boxes(torch.tensor([[0, 0, 16, 16], [16, 0, 32, 16], [0, 16, 16, 32], [16, 16, 32, 32]],
                                        dtype=torch.float32))}
    # GT [0,0,24,16]: IoU 16*16/(24*16) = 0.667 with anchor 0 (the best), 8*16/(384+256-128) = 0.25 with
    # anchor 1 (< 0.5 x 0.667), 0 with the others.
    mask = fgfi_mask([_gt([[0, 0, 24, 16]])], anchors, {"p3": (2, 2)})["p3"]
    assert mask.tolist() == [[[1.0, 0.0], [0.0, 0.0]]]
    # GT [0,0,32,16]: IoU 0.5 with anchors 0 and 1 (both the best): both kept.
    mask = fgfi_mask([_gt([[0, 0, 32, 16]])], anchors, {"p3": (2, 2)})["p3"]
    assert mask.tolist() == [[[1.0, 1.0], [0.0, 0.0]]]


def test_fgfi_masks_a_level_by_the_best_iou_of_a_box_over_every_levels_anchors():
    p3 = Boxes(torch.tensor([[0, 0, 16, 16], [16, 0, 32, 16], [0, 16, 16, 32], [16, 16, 32, 32]], dtype=torch.float32))
    p4 = Boxes(torch.tensor([[0, 0, 32, 32]], dtype=torch.float32))
    # GT [0,0,32,24]: IoU 768/1024 = 0.75 with the p4 anchor (the best); on p3 256/768 = 0.333 with the
    # top anchors and 128/896 = 0.143 with the bottom ones: none above 0.5 x 0.75, so p3 is unmasked,
    # where p3's anchors alone (best 0.333) would keep the top two (above 0.167).
    gt = [_gt([[0, 0, 32, 24]])]
    assert fgfi_mask(gt, {"p3": p3, "p4": p4}, {"p3": (2, 2)})["p3"].tolist() == [[[0.0, 0.0], [0.0, 0.0]]]
    assert fgfi_mask(gt, {"p3": p3}, {"p3": (2, 2)})["p3"].tolist() == [[[1.0, 1.0], [0.0, 0.0]]]
    assert list(fgfi_mask(gt, {"p3": p3, "p4": p4}, {"p3": (2, 2)})) == ["p3"]


def test_standardised_maps_of_one_value_per_channel_are_zero_not_an_error():
    # A 1 x 1 level (p7 of a small input) of one image: batch_norm's kernel refuses it.
    student = torch.rand(1, 4, 1, 1, requires_grad=True)
    assert torch.equal(standardize(student), torch.zeros(1, 4, 1, 1))
    loss = FeatureDistillation(layers=["p7"], weighting="uniform")({"p7": student}, {"p7": torch.rand(1, 4, 1, 1)})
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(student.grad, torch.zeros(1, 4, 1, 1))


def test_fgfi_loss_is_the_masked_squared_error_over_twice_the_masked_area():
    loss_fn = FGFIImitation(layers=["p3"], normalize=False)
    context = DistillContext(gt_instances=[_gt([[0, 0, 16, 16]])], strides={"p3": 8})
    teacher = {"p3": torch.zeros(1, 3, 4, 4)}
    assert loss_fn({"p3": teacher["p3"].clone()}, teacher, context).item() == 0.0
    student = torch.zeros(1, 3, 4, 4, requires_grad=True)
    with torch.no_grad():
        student[:, :, 3, 3] = 5.0  # outside the object: ignored
        student[:, :, 0, 0] = 1.0  # inside: 3 channels x 1^2
    # GT-box mask (no anchors on p3): 4 cells; sum M (S - T)^2 = 3; / (2 x 4)
    loss = loss_fn({"p3": student}, teacher, context)
    assert loss.item() == pytest.approx(3 / 8)
    loss.backward()
    assert student.grad[0, :, 3, 3].abs().sum() == 0 and student.grad[0, :, 0, 0].abs().sum() > 0


def test_normalized_fgfi_ignores_the_scale_of_the_teachers_features():
    context = DistillContext(gt_instances=[_gt([[0, 0, 16, 16]])], strides={"p3": 8})
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(1, 3, 4, 4, generator=gen), torch.randn(1, 3, 4, 4, generator=gen)
    normalized = FGFIImitation(layers=["p3"])  # NORMALIZE's default
    cost = normalized({"p3": student}, {"p3": teacher}, context).item()
    assert cost > 0
    assert normalized({"p3": student}, {"p3": 100 * teacher + 3}, context).item() == pytest.approx(cost, rel=1e-4)
    raw = FGFIImitation(layers=["p3"], normalize=False)
    assert raw({"p3": student}, {"p3": 100 * teacher + 3}, context).item() > 1000 * cost


def test_fgfi_runs_as_a_term_of_a_distilled_step(teacher_path):
    cfg = _cfg(NUM_ALL, "ILMIL.TEACHER.WEIGHTS", teacher_path, "ILMIL.DISTILL.FGFI.ENABLED", True,
               "ILMIL.DISTILL.FEAT.ENABLED", False)
    check_distill_config(cfg)
    student = build_model(cfg).train()
    with torch.no_grad():
        student.backbone.fpn_output3.weight.add_(0.05)
    with EventStorage():
        losses = student(_batch())
    assert losses["loss_distill_fgfi"].item() > 0 and "loss_distill_feat" not in losses
