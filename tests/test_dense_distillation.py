"""Distillation on the one-stage detectors: the dense-head term against its formula,
an expanded RetinaNet / FCOS student that equals its teacher before any update, and
a tiny incremental RetinaNet run of the ilmil recipe end to end."""
import math

import pytest
import torch
import torch.nn.functional as F

from detectron2.modeling import RetinaNet, build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from ilmil.config import CONFIGS_DIR, ConfigError, get_ilmil_cfg, set_num_classes
from ilmil.distill import DenseHeadDistillation, DistillContext, FGFIImitation, IncrementalRetinaNet
from ilmil.distill.masks import fgfi_mask, gt_box_mask
from ilmil.modeling import FCOS, decode_head_boxes, load_expanded
from tool_runs import SHAPES_OPTS, TRAIN_OPTS, metrics_lines, read_json, run_tool, tail

NUM_OLD, NUM_ALL = 3, 5
IMAGE_SIZE = (96, 128)
CONFIGS = {"RetinaNet": "retinanet_R18_FPN_cpu.yaml", "FCOS": "fcos_R18_FPN_cpu.yaml"}
PLAIN = {"RetinaNet": RetinaNet, "FCOS": FCOS}


def _cfg(arch, num_classes, *opts, method="ilmil"):
    path = f"{CONFIGS_DIR}/shapes/{CONFIGS[arch]}"
    return set_num_classes(get_ilmil_cfg(path, ["MODEL.DEVICE", "cpu", *opts], method=method), num_classes)


# --------------------------------------------------------------------------- the dense-head term


def _head(logits, boxes):
    """One level: [N, A*K, H, W] logits and [N, A*4, H, W] boxes."""
    return [logits], [boxes]


def test_dense_term_is_the_binary_kl_of_the_old_classes_plus_confident_boxes():
    # 1 image, 1 anchor per location, 2 x 1 locations; teacher: 2 old classes; student: 3 classes.
    z_t = torch.tensor([[[[2.0], [-3.0]], [[-1.0], [-4.0]]]])        # [1, 2, 2, 1]
    z_s = torch.tensor([[[[1.0], [-3.0]], [[0.0], [-4.0]], [[5.0], [5.0]]]])  # new class (row 2) ignored
    r_t = torch.zeros(1, 4, 2, 1)
    r_s = torch.ones(1, 4, 2, 1)
    loss = DenseHeadDistillation(box_loss="l1", temperature=1.0, box_score_thresh=0.5, normalizer="mean")(
        {"head": _head(z_s, r_s)}, {"head": _head(z_t, r_t)}, None)

    def kl(t, s):
        p, q = torch.sigmoid(torch.tensor(t)), torch.sigmoid(torch.tensor(s))
        return float(p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q)))

    cls = (kl(2.0, 1.0) + kl(-1.0, 0.0) + kl(-3.0, -3.0) + kl(-4.0, -4.0)) / 4
    # Location 0: sigmoid(2) = 0.88 >= 0.5 (confident): |1 - 0| x 4 coordinates; location 1 is not.
    assert loss.item() == pytest.approx(cls + 4.0, rel=1e-5)
    # NORMALIZER objects (the default): the KL summed, over the teacher's soft object count,
    # the best old-class score per location: sigmoid(2) + sigmoid(-3) (below 1: counted as 1).
    objects = DenseHeadDistillation(box_loss="l1", temperature=1.0, box_score_thresh=0.5)(
        {"head": _head(z_s, r_s)}, {"head": _head(z_t, r_t)}, None)
    assert torch.sigmoid(torch.tensor(2.0)) + torch.sigmoid(torch.tensor(-3.0)) < 1
    assert objects.item() == pytest.approx(4 * cls + 4.0, rel=1e-5)
    # A teacher sure of two objects (score sigmoid(3) at both locations): the sum over 2 sigmoid(3).
    z_sure = torch.tensor([[[[3.0], [3.0]], [[-1.0], [-4.0]]]])
    sure = DenseHeadDistillation(box_loss="l1", temperature=1.0, box_score_thresh=0.99, normalizer="objects")(
        {"head": _head(z_s, r_s)}, {"head": _head(z_sure, r_t)}, None)
    summed = kl(3.0, 1.0) + kl(-1.0, 0.0) + kl(3.0, -3.0) + kl(-4.0, -4.0)
    assert sure.item() == pytest.approx(summed / (2 * float(torch.sigmoid(torch.tensor(3.0)))), rel=1e-5)
    with pytest.raises(ConfigError, match="DENSE.NORMALIZER 'sum': choose one of mean, objects"):
        DenseHeadDistillation(normalizer="sum")


def test_dense_term_is_zero_for_equal_outputs_and_gives_the_student_gradients_only():
    gen = torch.Generator().manual_seed(0)
    z_t, r_t = torch.randn(2, 9 * 3, 4, 4, generator=gen), torch.randn(2, 9 * 4, 4, 4, generator=gen)
    loss_fn = DenseHeadDistillation(box_loss="l1", temperature=2.0)
    z_s = torch.cat([z_t.view(2, 9, 3, 4, 4), torch.randn(2, 9, 2, 4, 4, generator=gen)], dim=2).view(2, 45, 4, 4)
    teacher = {"head": _head(z_t, r_t)}
    assert loss_fn({"head": _head(z_s, r_t.clone())}, teacher, None).item() == pytest.approx(0.0, abs=1e-6)
    z_s = (z_s + 0.3).requires_grad_()
    z_t.requires_grad_()
    loss = loss_fn({"head": _head(z_s, r_t.clone())}, {"head": _head(z_t, r_t)}, None)
    assert loss.item() > 0
    loss.backward()
    grad = z_s.grad.view(2, 9, 5, 4, 4)
    assert grad[:, :, :3].abs().sum() > 0 and (grad[:, :, 3:] == 0).all()  # old classes only
    assert z_t.grad is None


def test_dense_term_leaves_out_the_anchors_on_a_new_class_gt_box():
    # One level of stride 8, 2 x 2 cells (centres at 4 and 12 px), 1 anchor, 2 old classes.
    # A new-class GT box covers cell (0, 0) only, a pseudo-label (old class) cell (1, 1).
    z_t = torch.full((1, 2, 2, 2), -2.0)
    z_t[0, 0, 0, 0] = z_t[0, 1, 1, 1] = 3.0  # the teacher is confident at both boxed cells
    z_s = torch.full((1, 3, 2, 2), -2.0)
    z_s[0, 1, 1, 1] = 3.0
    z_s[0, 0, 0, 0] = -1.0  # only the cell on the new object differs...
    r_t, r_s = torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 2)
    r_s[:, :, 0, 0] = 1.0  # ...in scores and in boxes
    gt = Instances((16, 16))
    gt.gt_boxes = Boxes(torch.tensor([[0.0, 0.0, 7.0, 7.0], [9.0, 9.0, 16.0, 16.0]]))
    gt.gt_classes = torch.tensor([2, 1])  # class 2 is new, class 1 an old class's pseudo-label
    context = DistillContext(gt_instances=[gt], head_strides=[8], num_old_classes=2)
    z_s.requires_grad_()
    args = ({"head": _head(z_s, r_s)}, {"head": _head(z_t, r_t)}, context)
    assert DenseHeadDistillation(box_loss="l1", box_score_thresh=0.5)(*args).item() > 1.0  # KL plus |1 - 0| x 4
    excluded = DenseHeadDistillation(box_loss="l1", box_score_thresh=0.5, exclude_new_gt=True)(*args)
    assert excluded.item() == 0.0
    # Everywhere else the term is as before: a difference at the pseudo-labelled cell counts.
    with torch.no_grad():
        z_s[0, 1, 1, 1] = 0.0
    p = torch.sigmoid(torch.tensor(3.0))
    kl = p * torch.log(p / 0.5) + (1 - p) * torch.log((1 - p) / 0.5)
    loss = DenseHeadDistillation(box_loss="l1", box_score_thresh=0.5, exclude_new_gt=True, normalizer="mean")(*args)
    assert loss.item() == pytest.approx(kl.item() / 8, rel=1e-5)  # 4 cells x 2 old classes
    loss.backward()
    assert z_s.grad[0, :, 0, 0].abs().sum() == 0 and z_s.grad[0, 1, 1, 1] != 0
    # A compression run (every class old) has nothing to leave out.
    old_only = DistillContext(gt_instances=[gt[1:]], num_old_classes=2)
    assert DenseHeadDistillation(box_loss="l1", exclude_new_gt=True)(args[0], args[1], old_only).item() > 0


def test_yolos_objectness_kl_is_divided_by_the_teachers_objects_left_in():
    # One level of stride 8, 2 x 2 cells, 1 anchor, 2 old classes; the class logits and boxes
    # agree, the objectness differs at cell (1, 1) only: teacher 0, student 2. A new-class GT box
    # covers cell (0, 0), which EXCLUDE_NEW_GT leaves out: the KL is divided by the teacher's
    # object count sum(sigmoid(0)) over 3 cells, 1.5, not 4 cells' 2 (NORMALIZER mean: by 3, not 4).
    z = torch.full((1, 2, 2, 2), -5.0)
    boxes = torch.zeros(1, 4, 2, 2)
    o_t, o_s = torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)
    o_s[0, 0, 1, 1] = 2.0
    gt = Instances((16, 16))
    gt.gt_boxes = Boxes(torch.tensor([[0.0, 0.0, 7.0, 7.0]]))
    gt.gt_classes = torch.tensor([2])
    context = DistillContext(gt_instances=[gt], head_strides=[8], num_old_classes=2,
                             teacher_outputs={"objectness": [o_t]})
    student = {"head": ([torch.cat([z, torch.full((1, 1, 2, 2), -5.0)], dim=1)], [boxes], [o_s])}
    teacher = {"head": ([z], [boxes], [o_t])}
    p_s = torch.sigmoid(torch.tensor(2.0))
    kl = 0.5 * torch.log(0.5 / p_s) + 0.5 * torch.log(0.5 / (1 - p_s))
    for normalizer, exclude, divisor in (("objects", False, 2.0), ("objects", True, 1.5), ("mean", False, 4),
                                         ("mean", True, 3)):
        loss = DenseHeadDistillation(exclude_new_gt=exclude, normalizer=normalizer)(student, teacher, context)
        assert loss.item() == pytest.approx(kl.item() / divisor, rel=1e-5), (normalizer, exclude)


def _as_boxes(box_levels):
    """A stand-in decoder: the box outputs read as XYXY boxes in pixels."""
    return torch.cat([x.permute(0, 2, 3, 1).reshape(len(x), -1, 4) for x in box_levels], dim=1)


def test_dense_box_term_giou_is_one_minus_the_giou_of_the_decoded_boxes_at_any_scale():
    # 1 image, 1 anchor per location, 2 x 1 locations, 1 old class; the teacher is confident
    # at location 0 only. There the student's box (0, 0, 2, 2) and the teacher's (1, 1, 3, 3)
    # overlap in 1 of a union of 7 inside an enclosing box of 9: GIoU = 1/7 - (9 - 7)/9.
    z = torch.tensor([[[[4.0], [-4.0]]]])
    r_s = torch.tensor([0.0, 0, 2, 2, 5, 5, 6, 6]).view(1, 2, 1, 4).permute(0, 3, 1, 2)  # [1, 4, 2, 1]
    r_t = torch.tensor([1.0, 1, 3, 3, 0, 0, 1, 1]).view(1, 2, 1, 4).permute(0, 3, 1, 2)
    context = DistillContext(gt_instances=[], box_decoders={"student": _as_boxes, "teacher": _as_boxes})
    giou = DenseHeadDistillation(box_loss="giou")
    loss = giou({"head": _head(z, r_s)}, {"head": _head(z, r_t)}, context)
    assert loss.item() == pytest.approx(1 - (1 / 7 - 2 / 9), rel=1e-5)  # the KL is 0: equal scores
    # Both boxes 8x larger (FCOS's distances at stride 8): GIoU unchanged, L1 8x.
    assert giou({"head": _head(z, 8 * r_s)}, {"head": _head(z, 8 * r_t)}, context).item() == pytest.approx(
        loss.item(), rel=1e-5)
    l1 = DenseHeadDistillation(box_loss="l1")
    assert l1({"head": _head(z, 8 * r_s)}, {"head": _head(z, 8 * r_t)}, None).item() == pytest.approx(32.0)
    assert giou({"head": _head(z, r_t.clone())}, {"head": _head(z, r_t)}, context).item() == pytest.approx(0, abs=1e-6)
    # A teacher box of no area (FCOS's distances clamped to 0) is no box to keep.
    flat = torch.ones(1, 4, 2, 1)
    assert giou({"head": _head(z, r_s)}, {"head": _head(z, flat)}, context).item() == 0.0
    with pytest.raises(ValueError, match="box_decoders"):
        giou({"head": _head(z, r_s)}, {"head": _head(z, r_t)}, None)
    with pytest.raises(ConfigError, match="DENSE.BOX_LOSS 'l2': choose one of l1, giou"):
        DenseHeadDistillation(box_loss="l2")


def _one_location_levels(detector, size, deltas):
    """Per level of ``detector``'s head, zero box outputs for one anchor per location on a
    ``size`` image, but ``deltas`` at cell (1, 2) of the finest level."""
    strides = [detector.backbone.output_shape()[f].stride for f in detector.head_in_features]
    levels = [torch.zeros(1, 4, -(-size // s), -(-size // s)) for s in strides]
    levels[0][0, :, 1, 2] = torch.tensor(deltas)
    return levels


def test_head_boxes_decode_fcos_distances_and_retinanet_deltas_in_pixels():
    # The finest level has stride 8, 8 x 8 cells on a 64 px image: cell (1, 2) is anchor
    # 1 x 8 + 2 = 10, its centre (2.5 x 8, 1.5 x 8) = (20, 12).
    fcos = build_model(_cfg("FCOS", NUM_OLD, method="finetune"))
    # FCOS: distances to the left, top, right and bottom sides in strides.
    boxes = decode_head_boxes(fcos, _one_location_levels(fcos, 64, [1.0, 2.0, 3.0, 4.0]))
    assert boxes.shape == (1, 8 * 8 + 4 * 4 + 2 * 2 + 1 + 1, 4)
    assert boxes[0, 10].tolist() == pytest.approx([20 - 8, 12 - 16, 20 + 24, 12 + 32])
    # RetinaNet: one 32 px anchor per location at stride 8, centred on the cell's corner
    # (2 x 8, 1 x 8) = (16, 8) (MODEL.ANCHOR_GENERATOR.OFFSET 0); the centre moves by half the
    # anchor's width, the width doubles.
    retinanet = build_model(_cfg("RetinaNet", NUM_OLD, method="finetune"))
    boxes = decode_head_boxes(retinanet, _one_location_levels(retinanet, 64, [0.5, 0.0, math.log(2.0), 0.0]))
    assert boxes[0, 10].tolist() == pytest.approx([32 - 32, 8 - 16, 32 + 32, 8 + 16])
    assert boxes[0, 0].tolist() == pytest.approx([-16, -16, 16, 16])  # zero deltas: the anchor


def _saved_teacher(arch, num_classes, tmp_path):
    """A freshly initialised ``arch`` of ``num_classes`` classes and its checkpoint's path."""
    teacher = build_model(_cfg(arch, num_classes, method="finetune"))
    path = tmp_path / "teacher.pth"
    torch.save({"model": teacher.state_dict()}, path)
    return teacher, path


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_the_giou_box_term_trains_a_students_box_outputs_on_the_detectors_anchors(arch, tmp_path):
    torch.manual_seed(0)
    teacher, path = _saved_teacher(arch, NUM_ALL, tmp_path)
    # Every anchor confident (threshold 0): the box term compares the whole head's boxes.
    student = build_model(_cfg(arch, NUM_ALL, "ILMIL.TEACHER.WEIGHTS", str(path), "ILMIL.PSEUDO_LABELS.ENABLED",
                               "False", "ILMIL.DISTILL.DENSE.ENABLED", "True", "ILMIL.DISTILL.DENSE.BOX_LOSS",
                               "giou", "ILMIL.DISTILL.DENSE.BOX_SCORE_THRESH", "0.0", method="finetune"))
    student.load_state_dict(teacher.state_dict(), strict=False)
    student.freeze_bn_stats()
    with EventStorage():
        equal = student.train()(_batch())["loss_distill_dense"].item()
        with torch.no_grad():
            student.head.bbox_pred.bias.add_(0.3)
        loss = student(_batch())["loss_distill_dense"]
    loss.backward()
    assert loss.item() > 1e-3
    # Zero up to rounding: the teacher runs with its BatchNorms folded into its convolutions
    # (3e-5 for FCOS on an AVX2-only CPU, against ~0.9 for the shifted boxes).
    assert equal < 1e-3 * loss.item()
    assert student.head.bbox_pred.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in student.teacher.parameters())


# --------------------------------------------------------------------------- the students


def _instances(boxes, classes):
    inst = Instances(IMAGE_SIZE)
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).view(-1, 4))
    inst.gt_classes = torch.tensor(classes, dtype=torch.int64)
    return inst


def _batch():
    gen = torch.Generator().manual_seed(0)
    return [{"image": torch.rand(3, *IMAGE_SIZE, generator=gen) * 255,
             "instances": _instances([[10, 10, 50, 50]], [3])} for _ in range(2)]


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_an_expanded_dense_student_equals_its_teacher_then_learns_from_it(arch, tmp_path):
    torch.manual_seed(0)
    teacher, path = _saved_teacher(arch, NUM_OLD, tmp_path)
    # The recipe plus the feature term, which it leaves off on these detectors.
    student = build_model(_cfg(arch, NUM_ALL, "ILMIL.TEACHER.WEIGHTS", str(path), "ILMIL.DISTILL.FEAT.ENABLED", "True"))
    assert type(student.teacher) is PLAIN[arch] and isinstance(student, PLAIN[arch])
    assert sorted(student.distiller.terms) == ["dense", "feat"]
    load_expanded(student, teacher.state_dict(), NUM_OLD)
    student.freeze_bn_stats()
    with EventStorage() as storage:
        losses = student.train()(_batch())
        assert "pseudo_boxes_per_image" in storage.latest()
    for name in ("loss_distill_feat", "loss_distill_dense"):
        assert abs(losses[name].item()) < 1e-4, name
    with torch.no_grad():
        student.head.cls_score.weight.add_(0.05)
    with EventStorage():
        losses = student(_batch())
    losses["loss_distill_dense"].backward()
    assert losses["loss_distill_dense"].item() > 1e-4
    assert student.head.cls_score.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in student.teacher.parameters())
    assert not any(k.startswith("teacher") for k in student.state_dict())


@pytest.mark.parametrize("pseudo, term, head_runs", [
    ("False", "FEAT", False),  # feature terms alone: the teacher's backbone only
    ("False", "DENSE", True),  # the dense-head term reads the teacher's head
    ("True", "FEAT", True),  # pseudo-labels are the teacher's detections
])  # fmt: skip
def test_the_teacher_pass_runs_only_as_far_as_the_terms_need(tmp_path, pseudo, term, head_runs):
    torch.manual_seed(0)
    _, path = _saved_teacher("RetinaNet", NUM_ALL, tmp_path)
    student = build_model(_cfg("RetinaNet", NUM_ALL, "ILMIL.TEACHER.WEIGHTS", str(path),
                               "ILMIL.PSEUDO_LABELS.ENABLED", pseudo, f"ILMIL.DISTILL.{term}.ENABLED", "True",
                               method="finetune"))
    head_calls = []
    student.teacher.head.register_forward_hook(lambda *_: head_calls.append(1))
    with EventStorage():
        losses = student.train()(_batch())
    assert f"loss_distill_{term.lower()}" in losses
    assert bool(head_calls) == head_runs


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_fgfi_masks_a_retinanet_student_near_its_anchors_and_fcos_inside_the_gt_boxes(arch, tmp_path, monkeypatch):
    torch.manual_seed(0)
    _, path = _saved_teacher(arch, NUM_ALL, tmp_path)
    student = build_model(_cfg(arch, NUM_ALL, "ILMIL.TEACHER.WEIGHTS", str(path), "ILMIL.PSEUDO_LABELS.ENABLED",
                               "False", "ILMIL.DISTILL.FGFI.ENABLED", "True", "ILMIL.DISTILL.FGFI.LAYERS",
                               "['p3', 'p4']", method="finetune"))
    seen = {}
    masks = FGFIImitation.masks

    def recorded_masks(term, teacher, context):
        seen["context"], seen["masks"] = context, masks(term, teacher, context)
        return seen["masks"]

    monkeypatch.setattr(FGFIImitation, "masks", recorded_masks)
    with EventStorage():
        assert student.train()(_batch())["loss_distill_fgfi"].item() > 0
    gt = seen["context"].gt_instances
    # A 96 x 128 input: p3 .. p7 of 12 x 16, 6 x 8, 3 x 4, 2 x 2, 1 x 1 locations.
    sizes = {"p3": (12, 16), "p4": (6, 8), "p5": (3, 4), "p6": (2, 2), "p7": (1, 1)}
    inside = {level: gt_box_mask(gt, sizes[level], stride) for level, stride in (("p3", 8), ("p4", 16))}
    if arch == "FCOS":  # anchor-free: the GT-box mask
        assert seen["context"].anchors == {}
        expected = inside
    else:  # the anchor mask, the best IoU of the box over the anchors of all five levels
        anchors = dict(zip(sizes, student.anchor_generator([torch.zeros(1, 1, *size) for size in sizes.values()])))
        expected = fgfi_mask(gt, anchors, {level: sizes[level] for level in ("p3", "p4")})
        assert not torch.equal(expected["p3"], inside["p3"])
    assert sorted(seen["masks"]) == ["p3", "p4"]
    for level in ("p3", "p4"):
        assert torch.equal(seen["masks"][level], expected[level]), level


def test_a_plain_retinanet_is_the_student_without_a_teacher():
    model = build_model(_cfg("RetinaNet", NUM_ALL, method="finetune"))
    assert type(model) is IncrementalRetinaNet and model.teacher is None and model.distiller is None


# --------------------------------------------------------------------------- a tiny incremental run


def test_a_tiny_incremental_retinanet_run_of_the_ilmil_recipe(tiny_datasets_root, tmp_path):
    out = tmp_path / "run"
    # After a few iterations every score is near the prior: a low test threshold keeps detections to count.
    args = ["--config-file", f"{CONFIGS_DIR}/shapes/{CONFIGS['RetinaNet']}", "--stages", "2+2", "--method", "ilmil",
            "--output-dir", str(out), *SHAPES_OPTS, *TRAIN_OPTS, "MODEL.RETINANET.SCORE_THRESH_TEST", "0.001",
            "ILMIL.PSEUDO_LABELS.SCORE_THRESH", "0.001"]
    proc = run_tool("train_incremental.py", args, tiny_datasets_root, timeout=600)
    assert proc.returncode == 0, tail(proc)
    results = read_json(out / "results.json")
    assert [s["stage"] for s in results["stages"]] == [0, 1]
    stage1 = results["stages"][1]
    assert all(math.isfinite(stage1[k]) for k in ("AP50_old", "AP50_new", "AP50"))
    logged = set().union(*(line.keys() for line in metrics_lines(out / "stage_1" / "metrics.json")))
    assert {"loss_distill_dense", "pseudo_boxes_per_image"} <= logged and "loss_distill_feat" not in logged
    assert (out / "report.md").is_file()
