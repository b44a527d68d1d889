"""Knowledge review with fg/bg decoupling (ILMIL.DISTILL.REVIEW): the pyramid distance
against a hand-computed case, the coarse-to-fine fusion, gradients to the student and
its fusion modules only, and the term in distilled steps of Faster R-CNN and RetinaNet
(a narrower student, an incremental one)."""
import re

import pytest
import torch

from detectron2.layers import ShapeSpec
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from student_models import distilled_student

from ilmil.config import ConfigError, get_ilmil_cfg
from ilmil.distill import DistillContext, KnowledgeReview, pyramid_distance

LAYERS = ("p3", "p4", "p5")
STRIDES = {"p3": 8, "p4": 16, "p5": 32}


def test_pyramid_distance_by_hand():
    teacher = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    student = torch.zeros_like(teacher)
    mask = torch.tensor([[1.0, 0.0], [0.0, 0.0]]).view(1, 2, 2)
    # Full size: squared errors 1, 4, 9, 16; foreground the first, background the other three.
    # Pooled to 1 x 1 (2 x 2 is not smaller than the map: skipped): error 2.5^2 = 6.25, a
    # quarter of the cell inside the box, so both parts are 6.25. Weights 1 and 1/2.
    full, pooled = 1.0 * 1 + 2.0 * (4 + 9 + 16) / 3, (1.0 + 2.0) * 6.25
    got = pyramid_distance(student, teacher, mask, pool_sizes=(2, 1), fg_weight=1.0, bg_weight=2.0)
    assert got.item() == pytest.approx((full + 0.5 * pooled) / 1.5)
    # Not decoupled: the plain mean at each scale.
    assert pyramid_distance(student, teacher, None, (2, 1)).item() == pytest.approx((7.5 + 0.5 * 6.25) / 1.5)
    # Full size only; no box in the batch: the background term alone.
    empty = torch.zeros(1, 2, 2)
    assert pyramid_distance(student, teacher, empty, (), 1.0, 2.0).item() == pytest.approx(2.0 * 7.5)
    assert pyramid_distance(teacher, teacher, mask, (4, 2, 1), 1.0, 2.0).item() == 0.0


def _review(mid=8, student_width=4, teacher_width=6, **kwargs):
    cfg = get_ilmil_cfg(None, ["ILMIL.DISTILL.REVIEW.LAYERS", list(LAYERS), "ILMIL.DISTILL.REVIEW.MID_CHANNELS", mid])
    shapes = {n: ShapeSpec(channels=student_width, stride=s) for n, s in STRIDES.items()}
    teacher_shapes = {n: ShapeSpec(channels=teacher_width, stride=s) for n, s in STRIDES.items()}
    torch.manual_seed(0)
    return KnowledgeReview(cfg, shapes, teacher_shapes)


def _maps(width, requires_grad=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(2, width, 64 // s, 64 // s, generator=gen).requires_grad_(requires_grad)
            for n, s in STRIDES.items()}


def _context():
    inst = Instances((64, 64))
    inst.gt_boxes = Boxes(torch.tensor([[8.0, 8.0, 40.0, 40.0]]))
    inst.gt_classes = torch.tensor([0])
    return DistillContext(gt_instances=[inst, inst], strides=STRIDES)


def test_review_is_zero_when_the_fused_student_is_the_teacher_and_positive_otherwise():
    loss = _review()
    student = _maps(4)
    fused = dict(zip(LAYERS, [out.detach() for out in loss.review(student)]))
    assert [tuple(fused[n].shape) for n in LAYERS] == [(2, 6, 8, 8), (2, 6, 4, 4), (2, 6, 2, 2)]
    assert loss(student, fused, _context()).item() == pytest.approx(0.0, abs=1e-10)
    assert loss(student, _maps(6, seed=1), _context()).item() > 0


def test_normalized_review_ignores_the_scale_of_the_teachers_features():
    # Per-channel standardisation: a teacher grown to 100x the scale (from-scratch features)
    # costs the same; the raw distance (NORMALIZE False) grows with it.
    student, teacher = _maps(4), _maps(6, seed=1)
    scaled = {n: 100 * t + 3 for n, t in teacher.items()}
    loss = _review()
    assert loss(student, scaled, _context()).item() == pytest.approx(loss(student, teacher, _context()).item(),
                                                                      rel=1e-4)
    loss.normalize = False
    assert loss(student, scaled, _context()).item() > 1000 * loss(student, teacher, _context()).item()


def test_review_fuses_coarse_to_fine_and_trains_the_student_and_its_fusions_only():
    loss = _review()
    student, teacher = _maps(4, requires_grad=True), _maps(6, requires_grad=True, seed=1)
    finest, _, coarsest = loss.review(student)
    # The finest output reviews every coarser level; the coarsest sees itself only.
    p5_into_p3, = torch.autograd.grad(finest.sum(), student["p5"], retain_graph=True)
    assert p5_into_p3.abs().sum() > 0
    assert torch.autograd.grad(coarsest.sum(), student["p3"], allow_unused=True)[0] is None
    loss(student, teacher, _context()).backward()
    assert all(student[n].grad.abs().sum() > 0 for n in LAYERS)
    assert all(teacher[n].grad is None for n in LAYERS)
    assert all(p.grad is not None for p in loss.fusions.parameters())


def test_decoupling_weighs_the_inside_and_the_outside_of_the_boxes_apart():
    student, teacher = _maps(4), _maps(6, seed=1)
    context = _context()
    costs = {}
    for fg, bg in ((1.0, 0.0), (0.0, 1.0), (1.0, 1.0)):
        loss = _review()
        loss.fg_weight, loss.bg_weight = fg, bg
        costs[fg, bg] = loss(student, teacher, context).item()
    assert costs[1.0, 0.0] > 0 and costs[0.0, 1.0] > 0
    assert costs[1.0, 1.0] == pytest.approx(costs[1.0, 0.0] + costs[0.0, 1.0], rel=1e-5)


def test_bad_review_keys_are_refused():
    with pytest.raises(ConfigError, match="REVIEW.LAYERS is empty"):
        KnowledgeReview(get_ilmil_cfg(None, ["ILMIL.DISTILL.REVIEW.LAYERS", []]))
    with pytest.raises(ConfigError, match="POOL_SIZES"):
        KnowledgeReview(get_ilmil_cfg(None, ["ILMIL.DISTILL.REVIEW.POOL_SIZES", [2, 0]]))
    # A fraction would stop the first step (pooling takes whole sizes), a width of 0 the check's conv.
    with pytest.raises(ConfigError, match=r"POOL_SIZES \[2.5\]: sizes must be whole numbers"):
        KnowledgeReview(get_ilmil_cfg(None, ["ILMIL.DISTILL.REVIEW.POOL_SIZES", [2.5]]))
    with pytest.raises(ConfigError, match="ILMIL.DISTILL.REVIEW.MID_CHANNELS 0: must be at least 1"):
        KnowledgeReview(get_ilmil_cfg(None, ["ILMIL.DISTILL.REVIEW.MID_CHANNELS", 0]))
    # Coarse first, the fusions would shrink the finer maps: another method.
    shapes = {n: ShapeSpec(channels=4, stride=s) for n, s in STRIDES.items()}
    with pytest.raises(ConfigError, match=re.escape("ILMIL.DISTILL.REVIEW.LAYERS ['p5', 'p3', 'p4']: strides [32, 8, "
                                                    "16], and the review goes fine to coarse; fix: ['p3', 'p4', 'p5']")):
        KnowledgeReview(get_ilmil_cfg(None, ["ILMIL.DISTILL.REVIEW.LAYERS", ["p5", "p3", "p4"]]), shapes, shapes)


def _batch(size=(96, 128)):
    gen = torch.Generator().manual_seed(0)
    inst = Instances(size)
    inst.gt_boxes = Boxes(torch.tensor([[10.0, 10.0, 60.0, 60.0]]))
    inst.gt_classes = torch.tensor([1])
    return [{"image": torch.rand(3, *size, generator=gen) * 255, "instances": inst} for _ in range(2)]


@pytest.mark.parametrize("config, teacher_config, method", [
    # Compression: a narrower Faster R-CNN student (FPN 32 channels) of a default teacher.
    ("kd/faster_rcnn_R18_FPN32_student_cpu.yaml", "faster_rcnn_R18_FPN_cpu.yaml", "finetune"),
    # Incremental: a RetinaNet student of more classes than its teacher.
    ("retinanet_R18_FPN_cpu.yaml", "retinanet_R18_FPN_cpu.yaml", "ilmil"),
])  # fmt: skip
def test_review_is_a_term_of_a_distilled_step(tmp_path, config, teacher_config, method):
    student = distilled_student(tmp_path, config, teacher_config, 3 if method == "finetune" else 5,
                                ["ILMIL.DISTILL.REVIEW.ENABLED", True], method)
    with EventStorage():
        losses = student(_batch())
    assert losses["loss_distill_review"].item() > 0
    losses["loss_distill_review"].backward()
    fusions = student.distiller.terms["review"].fusions
    assert all(p.grad is not None for p in fusions.parameters())
    assert all(p.grad is None for p in student.teacher.parameters())
    # The fusion modules are distillation state, not the detector's.
    assert all(k.startswith("distiller.") for k in student.state_dict() if ".fusions." in k)
