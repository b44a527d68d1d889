"""Every loss term of a distilled training step, pinned on a fixed batch and fixed
weights: moving the distillation terms onto another engine must not change what
they compute. The values were computed before that move (the shapes CPU config,
a 3-class teacher and its 5-class student, the student"s stem, RPN and box head
perturbed so that every term is clearly non-zero); a term whose formula changes on purpose is re-pinned in
the same commit, with the reason in its message."""
import pytest
import torch

from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from ilmil.config import get_ilmil_cfg
from ilmil.modeling import load_expanded

NUM_OLD, NUM_ALL = 3, 5
IMAGE_SIZE = (64, 96)

# method and overrides -> {loss name: value}
PINNED = {
    "faster-ilod": {
        "loss_cls": 4.904168,
        "loss_box_reg": 0.1006757,
        "loss_rpn_cls": 0.6908339,
        "loss_rpn_loc": 0.006714558,
        "loss_distill_feat": 0.9299729,
        "loss_distill_rpn": 0.02767058,
        "loss_distill_rcn": 0.6472318,
    },
    "ilmil": {
        "loss_cls": 2.474122,
        "loss_box_reg": 1.777602,
        "loss_rpn_cls": 0.6906674,
        "loss_rpn_loc": 0.06796404,
        "loss_distill_feat": 2.811067,
        "loss_distill_rpn": 0.02767058,
        "loss_distill_rcn": 0.1618079,
    },
    "ilmil, RCN logits kl": {
        "loss_cls": 2.474122,
        "loss_box_reg": 1.777602,
        "loss_rpn_cls": 0.6906674,
        "loss_rpn_loc": 0.06796404,
        "loss_distill_feat": 2.811067,
        "loss_distill_rpn": 0.02767058,
        "loss_distill_rcn": 0.1538919,
    },
    "ilmil, l2 uniform features": {
        "loss_cls": 2.474122,
        "loss_box_reg": 1.777602,
        "loss_rpn_cls": 0.6906674,
        "loss_rpn_loc": 0.06796404,
        "loss_distill_feat": 64416.28,
        "loss_distill_rpn": 0.02767058,
        "loss_distill_rcn": 0.1618079,
    },
    "mma": {
        "loss_cls": 0.1471399,
        "loss_box_reg": 0.1006757,
        "loss_rpn_cls": 0.6908339,
        "loss_rpn_loc": 0.006714558,
        "loss_distill_feat": 0.9299729,
        "loss_distill_rpn": 0.02767058,
        "loss_distill_rcn": 0.8282127,
    },
}


def _cfg(num_classes, method, *opts):
    return get_ilmil_cfg(None, ["MODEL.ROI_HEADS.NUM_CLASSES", num_classes, "MODEL.DEVICE", "cpu", *opts],
                         method=method)


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
    torch.manual_seed(0)
    teacher = build_model(_cfg(NUM_OLD, "finetune")).eval()
    with torch.no_grad():  # sure of class 0 on every proposal: its detections become pseudo-labels
        predictor = teacher.roi_heads.box_predictor
        predictor.cls_score.weight.mul_(0.01)
        predictor.cls_score.bias.copy_(torch.tensor([5.0, 0.0, 0.0, 0.0]))
    path = tmp_path_factory.mktemp("teacher") / "teacher.pth"
    torch.save({"model": teacher.state_dict(), "ilmil": {"class_names": ["circle", "square", "triangle"]}}, path)
    return str(path)


def _instances(boxes, classes):
    inst = Instances(IMAGE_SIZE)
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).view(-1, 4))
    inst.gt_classes = torch.tensor(classes, dtype=torch.int64)
    return inst


def _batch():
    gen = torch.Generator().manual_seed(0)
    return [
        {"image": torch.rand(3, *IMAGE_SIZE, generator=gen) * 255, "instances": _instances([[10, 10, 40, 40]], [3])},
        {"image": torch.rand(3, *IMAGE_SIZE, generator=gen) * 255,
         "instances": _instances([[30, 20, 80, 60], [5, 5, 20, 25]], [4, 3])},
    ]


def step_losses(teacher_path, method, *opts):
    """The loss dict of one training step of the perturbed student of ``method``."""
    torch.manual_seed(1)
    student = build_model(_cfg(NUM_ALL, method, "ILMIL.TEACHER.WEIGHTS", teacher_path, *opts))
    teacher_state = torch.load(teacher_path, weights_only=True)["model"]
    load_expanded(student, teacher_state, NUM_OLD)
    student.freeze_bn_stats()
    student.train()
    rpn, predictor = student.proposal_generator.rpn_head, student.roi_heads.box_predictor
    perturbed = (student.backbone.bottom_up.stem.conv1.weight, rpn.objectness_logits.weight,
                 rpn.anchor_deltas.weight, predictor.cls_score.weight, predictor.bbox_pred.weight)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for weight in perturbed:  # the heads start at std 0.01 / 0.001: noise of at least 0.05
            weight.add_(max(0.1 * float(weight.std()), 0.05) * torch.randn(weight.shape, generator=gen))
    torch.manual_seed(2)  # ROI and RCN proposal sampling
    with EventStorage():
        losses = student(_batch())
    return {name: float(value.detach()) for name, value in losses.items()}


CASES = {
    "ilmil": ("ilmil",),
    "faster-ilod": ("faster-ilod",),
    "mma": ("mma",),
    "ilmil, RCN logits kl": ("ilmil", "ILMIL.DISTILL.RCN.LOGITS", "kl"),
    "ilmil, l2 uniform features": ("ilmil", "ILMIL.DISTILL.FEAT.DISTANCE", "l2",
                                   "ILMIL.DISTILL.FEAT.LAYER_WEIGHTING", "uniform"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_term_keeps_its_pinned_value(teacher_path, case):
    method, *opts = CASES[case]
    losses = step_losses(teacher_path, method, *opts)
    assert losses == pytest.approx(PINNED[case], rel=1e-3, abs=1e-8)
