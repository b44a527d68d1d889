"""Information-map distillation (ILMIL.DISTILL.INFOMAP) and the output term on a head
with objectness: the soft GT mask on a hand-built box, the importance map, zero at
equality, positive otherwise, gradients to the student and its connectors only."""
import math

import pytest
import torch

from detectron2.layers import ShapeSpec
from detectron2.structures import Boxes, Instances

from ilmil.config import ConfigError, get_ilmil_cfg
from ilmil.distill import DistillContext
from ilmil.distill.losses import DenseHeadDistillation, InformationMapDistillation
from ilmil.distill.masks import gaussian_box_mask

LAYERS = ("dark3", "p3")
STRIDES = {"dark3": 8, "p3": 8}


def _context(objectness=None):
    inst = Instances((32, 32), gt_boxes=Boxes(torch.tensor([[0.0, 0.0, 16.0, 32.0]])), gt_classes=torch.tensor([0]))
    outputs = {"objectness": objectness} if objectness is not None else {}
    return DistillContext(gt_instances=[inst], strides=STRIDES, teacher_outputs=outputs)


def test_soft_gt_mask_by_hand():
    mask = gaussian_box_mask(_context().gt_instances, (4, 4), 8)[0]
    # Box [0, 0, 16, 32]: centre (8, 16), half sizes 8 and 16. Cell (row 1, col 0) has its
    # centre at (4, 12): dx = -4/8, dy = -4/16, weight exp(-(0.25 + 0.0625) / 2).
    assert mask[1, 0].item() == pytest.approx(math.exp(-(0.25 + 0.0625) / 2))
    assert mask[0, 0].item() == pytest.approx(math.exp(-(0.25 + (12 / 16) ** 2) / 2))
    assert torch.all(mask[:, 2:] == 0)  # columns 2 and 3 (centres x = 20, 28) are outside the box


def _loss(weighting="information", student_width=4, teacher_width=6, background_weight=0.0, normalize=False):
    cfg = get_ilmil_cfg(None, ["ILMIL.DISTILL.INFOMAP.LAYERS", list(LAYERS),
                               "ILMIL.DISTILL.INFOMAP.WEIGHTING", weighting,
                               "ILMIL.DISTILL.INFOMAP.BACKGROUND_WEIGHT", background_weight,
                               "ILMIL.DISTILL.INFOMAP.NORMALIZE", normalize])
    student = {n: ShapeSpec(channels=student_width, stride=s) for n, s in STRIDES.items()}
    teacher = {n: ShapeSpec(channels=teacher_width, stride=s) for n, s in STRIDES.items()}
    torch.manual_seed(0)
    return InformationMapDistillation(cfg, student, teacher)


def _maps(width, seed, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(1, width, 4, 4, generator=gen).requires_grad_(requires_grad) for n in LAYERS}


def _head(objectness_logit):
    """A teacher head of one level (4 x 4, 2 anchors, 3 classes) with the given objectness."""
    return ([torch.full((1, 6, 4, 4), -5.0)], [torch.zeros(1, 8, 4, 4)], [objectness_logit])


def test_the_importance_map_is_the_larger_of_soft_gt_mask_and_teacher_objectness():
    loss = _loss()
    objectness = torch.full((1, 2, 4, 4), -20.0)
    objectness[0, 1, 3, 3] = 0.0  # one anchor of the bottom-right cell: probability 1/2
    teacher = {**_maps(6, seed=1), "head": _head(objectness)}
    maps = loss.importance(teacher, _context([objectness]))
    expected = gaussian_box_mask(_context().gt_instances, (4, 4), 8)
    expected[0, 3, 3] = 0.5
    for name in LAYERS:
        assert torch.allclose(maps[name], expected, atol=1e-6)
    # Without objectness (RetinaNet, FCOS) the teacher's best class probability stands in.
    no_objectness = loss.importance(teacher, _context())
    soft_gt = gaussian_box_mask(_context().gt_instances, (4, 4), 8)
    assert torch.allclose(no_objectness["p3"], torch.clamp(soft_gt, min=torch.sigmoid(torch.tensor(-5.0)).item()))
    # A background weight is the least weight of any location: the box's cells keep theirs.
    floored = _loss(background_weight=0.25).importance(teacher, _context([objectness]))
    assert torch.allclose(floored["p3"], torch.clamp(expected, min=0.25), atol=1e-6)
    assert floored["p3"][0, 0, 3].item() == pytest.approx(0.25) and floored["p3"][0, 1, 0].item() > 0.25


def test_the_term_by_hand_with_a_uniform_map():
    loss = _loss("uniform", student_width=6)
    teacher = {n: torch.ones(1, 6, 4, 4) for n in LAYERS}
    student = {n: torch.zeros(1, 6, 4, 4) for n in LAYERS}
    # Each layer: 16 cells x 6 channels of squared error 1, weight 1: 2 * 96 / (2 * 2 * 16).
    assert loss(student, teacher, _context()).item() == pytest.approx(3.0)
    assert loss.records() == LAYERS  # no head needed for a uniform map


def test_the_standardised_term_ignores_the_scale_of_the_teachers_features():
    objectness = torch.zeros(1, 2, 4, 4)
    head, context = {"head": _head(objectness)}, _context([objectness])
    student, teacher = _maps(6, seed=2), _maps(6, seed=1)
    scaled = {**{n: 100 * t + 3 for n, t in teacher.items()}, **head}
    normalized = _loss(student_width=6, normalize=True)
    cost = normalized(student, {**teacher, **head}, context).item()
    assert cost > 0
    assert normalized(student, scaled, context).item() == pytest.approx(cost, rel=1e-4)
    raw = _loss(student_width=6)  # NORMALIZE's default: the published raw error
    assert raw(student, scaled, context).item() > 1000 * cost


def test_the_term_is_zero_at_equality_positive_otherwise_and_trains_the_student_and_connectors_only():
    loss = _loss()
    objectness = torch.zeros(1, 2, 4, 4)
    teacher = {**_maps(6, seed=1, requires_grad=True), "head": _head(objectness)}
    student = _maps(4, seed=2, requires_grad=True)
    mapped = {n: loss.connectors[n](student[n]).detach() for n in LAYERS}
    assert loss(student, {**mapped, "head": _head(objectness)}, _context([objectness])).item() == pytest.approx(
        0.0, abs=1e-12)
    value = loss(student, teacher, _context([objectness]))
    assert value.item() > 0
    value.backward()
    assert all(student[n].grad.abs().sum() > 0 for n in LAYERS)
    assert all(teacher[n].grad is None for n in LAYERS)
    assert all(p.grad is not None for p in loss.connectors.parameters())


def test_an_unknown_weighting_or_a_background_weight_outside_0_1_is_refused():
    with pytest.raises(ConfigError, match="uniform"):
        _loss("objectness")
    with pytest.raises(ConfigError, match="BACKGROUND_WEIGHT 1.5"):
        _loss(background_weight=1.5)


def _dense_head(seed, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    outputs = [torch.randn(1, 6, 4, 4, generator=gen), torch.randn(1, 8, 4, 4, generator=gen),
               torch.randn(1, 2, 4, 4, generator=gen)]
    return tuple([x.requires_grad_(requires_grad)] for x in outputs)


def test_the_output_term_with_objectness_is_zero_at_equality_and_trains_objectness_too():
    # The raw head tensors here have no anchors to decode: the box part as the deltas' L1.
    cfg = get_ilmil_cfg(None, ["ILMIL.DISTILL.DENSE.BOX_SCORE_THRESH", "0.0", "ILMIL.DISTILL.DENSE.BOX_LOSS", "l1"])
    term = DenseHeadDistillation(cfg)
    teacher = _dense_head(seed=0)
    context = _context(teacher[2])
    assert term({"head": teacher}, {"head": teacher}, context).item() == pytest.approx(0.0, abs=1e-6)
    student = _dense_head(seed=1, requires_grad=True)
    value = term({"head": student}, {"head": teacher}, context)
    assert value.item() > 0
    value.backward()
    assert all(level[0].grad.abs().sum() > 0 for level in student)  # class, box and objectness outputs
    # Only the objectness differs: the term still sees it.
    moved = (teacher[0], teacher[1], [teacher[2][0] + 1.0])
    assert term({"head": moved}, {"head": teacher}, context).item() > 0
