"""M-KD's attention transfer (ILMIL.DISTILL.AT) and layer relations (ILMIL.DISTILL.FSP):
each against a hand-computed case, zero at equality, gradients to the student (and its
connectors) only, and both as terms of a distilled step of a narrower student."""
import math

import pytest
import torch

from detectron2.layers import ShapeSpec
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from student_models import distilled_student

from ilmil.config import ConfigError, get_ilmil_cfg
from ilmil.distill import AttentionTransfer, FSPRelation, check_distill_config
from ilmil.distill.losses import attention_map, fsp_matrix


def test_attention_transfer_by_hand():
    # One image, 2 channels, a 1 x 2 map. Teacher: squares (1, 1) and (1, 3) per channel, so
    # channel means (1, 2); student: (4, 0) and (0, 0), means (2, 0).
    teacher = torch.tensor([[[[1.0, 1.0]], [[1.0, 3.0 ** 0.5]]]])
    student = torch.tensor([[[[2.0, 0.0]], [[0.0, 0.0]]]])
    assert attention_map(teacher).flatten().tolist() == pytest.approx([1.0, 2.0])
    q_t = torch.tensor([1.0, 2.0]) / math.sqrt(5)
    q_s = torch.tensor([1.0, 0.0])
    loss = AttentionTransfer(layers=["res4"])({"res4": student}, {"res4": teacher})
    assert loss.item() == pytest.approx((q_s - q_t).norm().item(), rel=1e-6)
    assert AttentionTransfer(layers=["res4"])({"res4": teacher}, {"res4": teacher}).item() == pytest.approx(0, abs=1e-7)


def test_attention_transfer_compares_any_widths_and_sizes_and_trains_the_student_only():
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(2, 4, 8, 8, generator=gen, requires_grad=True)
    teacher = torch.randn(2, 16, 4, 4, generator=gen, requires_grad=True)
    loss = AttentionTransfer(layers=["res4"])({"res4": student}, {"res4": teacher})
    loss.backward()
    assert loss.item() > 0 and student.grad.abs().sum() > 0 and teacher.grad is None


def test_fsp_matrix_and_loss_by_hand():
    # F1: 1 channel, F2: 2 channels, 1 x 2 maps: G = F1 F2^T / 2.
    f1 = torch.tensor([[[[1.0, 2.0]]]])
    f2 = torch.tensor([[[[3.0, 4.0]], [[0.0, 1.0]]]])
    assert fsp_matrix(f1, f2).tolist() == [[[(3 + 8) / 2, (0 + 2) / 2]]]
    # The student's second map differs in its second channel: G_S = [[5.5, 0]] vs [[5.5, 1]].
    student = {"res3": f1, "res4": torch.tensor([[[[3.0, 4.0]], [[0.0, 0.0]]]])}
    loss = FSPRelation(pairs=[["res3", "res4"]])(student, {"res3": f1, "res4": f2})
    assert loss.item() == pytest.approx((0.0 + 1.0) / 2)
    assert FSPRelation(pairs=[["res3", "res4"]])({"res3": f1, "res4": f2}, {"res3": f1, "res4": f2}).item() == 0


@pytest.mark.parametrize("second_size", [(3, 5), (4, 7), (6, 10), (12, 20)])
def test_fsp_matrix_equals_the_one_of_the_second_map_resized_to_the_first(second_size):
    # The definition: the second map resized (bilinear) to the first's size, then F1 F2^T / (H W).
    gen = torch.Generator().manual_seed(0)
    first = torch.randn(2, 3, 6, 10, generator=gen, dtype=torch.float64, requires_grad=True)
    second = torch.randn(2, 4, *second_size, generator=gen, dtype=torch.float64, requires_grad=True)
    resized = torch.nn.functional.interpolate(second, size=(6, 10), mode="bilinear", align_corners=False)
    expected = torch.bmm(first.flatten(2), resized.flatten(2).transpose(1, 2)) / 60
    weights = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64)
    got = fsp_matrix(first, second)
    torch.testing.assert_close(got, expected)
    expected_grads = torch.autograd.grad((expected * weights).sum(), (first, second))
    torch.testing.assert_close(torch.autograd.grad((got * weights).sum(), (first, second)), expected_grads)


def test_fsp_maps_a_narrow_student_through_connectors_trained_with_it():
    cfg = get_ilmil_cfg(None, ["ILMIL.DISTILL.FSP.PAIRS", [["res3", "res4"]]])
    loss = FSPRelation(cfg, {"res3": ShapeSpec(channels=4, stride=8), "res4": ShapeSpec(channels=8, stride=16)},
                       {"res3": ShapeSpec(channels=6, stride=8), "res4": ShapeSpec(channels=12, stride=16)})
    assert sorted(loss.connectors) == ["res3", "res4"]
    gen = torch.Generator().manual_seed(0)
    student = {"res3": torch.randn(2, 4, 8, 8, generator=gen, requires_grad=True),
               "res4": torch.randn(2, 8, 4, 4, generator=gen, requires_grad=True)}
    teacher = {"res3": torch.randn(2, 6, 8, 8, generator=gen), "res4": torch.randn(2, 12, 4, 4, generator=gen)}
    value = loss(student, teacher)
    value.backward()
    assert value.item() > 0 and student["res3"].grad.abs().sum() > 0
    assert all(p.grad is not None for p in loss.connectors.parameters())


def test_bad_mkd_keys_are_refused():
    with pytest.raises(ConfigError, match="FSP.PAIRS"):
        FSPRelation(pairs=[["res3"]])
    with pytest.raises(ConfigError, match=r"FSP.PAIRS \['res3', 'res4'\]: give pairs of layers"):  # not [[...]]
        FSPRelation(pairs=["res3", "res4"])
    # Module paths have no shapes to build connectors from: widths that differ are named at the first step.
    gen = torch.Generator().manual_seed(0)
    student = {"a": torch.randn(1, 4, 4, 4, generator=gen), "b": torch.randn(1, 8, 2, 2, generator=gen)}
    teacher = {"a": torch.randn(1, 4, 4, 4, generator=gen), "b": torch.randn(1, 16, 2, 2, generator=gen)}
    with pytest.raises(ConfigError, match=r"FSP.PAIRS: \[a, b\] are 4 and 8 channels wide in the student, 4 and 16"):
        FSPRelation(pairs=[["a", "b"]])(student, teacher)
    # A learned detection weight needs terms to weigh it against.
    with pytest.raises(ConfigError, match="DETECTION_WEIGHT uncertainty with no distillation term enabled"):
        check_distill_config(get_ilmil_cfg(None, ["ILMIL.DISTILL.DETECTION_WEIGHT", "uncertainty"], method="finetune"))
    with pytest.raises(ConfigError, match="ILMIL.DISTILL.DETECTION_WEIGHT 'bogus'"):
        check_distill_config(get_ilmil_cfg(None, ["ILMIL.DISTILL.DETECTION_WEIGHT", "bogus"], method="finetune"))
    with pytest.raises(ConfigError, match="AT.LAYERS is empty"):
        AttentionTransfer(layers=[])


def test_attention_relations_and_exploration_in_a_distilled_step(tmp_path):
    student = distilled_student(tmp_path, "kd/faster_rcnn_R18_FPN32_student_cpu.yaml", "faster_rcnn_R18_FPN_cpu.yaml",
                                3, ["ILMIL.DISTILL.FEAT.ENABLED", False, "ILMIL.DISTILL.RCN.ENABLED", False,
                                    "ILMIL.DISTILL.AT.ENABLED", True, "ILMIL.DISTILL.FSP.ENABLED", True,
                                    "ILMIL.DISTILL.DETECTION_WEIGHT", "uncertainty"])
    inst = Instances((96, 128))
    inst.gt_boxes = Boxes(torch.tensor([[10.0, 10.0, 60.0, 60.0]]))
    inst.gt_classes = torch.tensor([1])
    gen = torch.Generator().manual_seed(0)
    batch = [{"image": torch.rand(3, 96, 128, generator=gen) * 255, "instances": inst} for _ in range(2)]
    with EventStorage():
        losses = student(batch)
    assert losses["loss_distill_at"].item() > 0 and losses["loss_distill_fsp"].item() > 0
    # Exploration: the detection losses are weighed by the learned factor, its penalty logged.
    assert "loss_detection_uncertainty" in losses and "loss_cls" in losses
    # The half-width student's residual blocks keep their output widths: no FSP connector needed.
    assert not student.distiller.terms["fsp"].connectors


# --------------------------------------------------------------------------- the exploration module


def test_a_learned_detection_weight_follows_the_formula_and_moves():
    from ilmil.distill import Distiller

    distiller = Distiller({}, {}, detection_weight="uncertainty")
    losses = distiller.weigh_detection({"loss_cls": torch.tensor(2.0), "loss_box_reg": torch.tensor(1.0)})
    # log s^2 = 0 at the start: each loss halved, no penalty.
    assert {k: v.item() for k, v in losses.items()} == {"loss_cls": 1.0, "loss_box_reg": 0.5,
                                                        "loss_detection_uncertainty": 0.0}
    with torch.no_grad():
        distiller.detection_log_variance.fill_(math.log(4.0))
    losses = distiller.weigh_detection({"loss_cls": torch.tensor(2.0)})
    assert losses["loss_cls"].item() == pytest.approx(2.0 / 4 / 2)
    assert losses["loss_detection_uncertainty"].item() == pytest.approx(math.log(4.0) / 2)
    # A large detection loss raises s_det: one SGD step moves log s^2 up.
    before = distiller.detection_log_variance.item()
    optimizer = torch.optim.SGD(distiller.parameters(), lr=0.1)
    sum(distiller.weigh_detection({"loss_cls": torch.tensor(10.0)}).values()).backward()
    optimizer.step()
    assert distiller.detection_log_variance.item() > before
    # Fixed: the losses as they are.
    fixed = {"loss_cls": torch.tensor(2.0)}
    assert Distiller({}, {}).weigh_detection(fixed) is fixed


def test_free_channels_leave_a_random_share_out_of_the_feature_term_in_training_only():
    from ilmil.distill import FeatureDistillation

    loss = FeatureDistillation(layers=["p3"], distance="l2", weighting="uniform", free_channels=0.5)
    teacher = torch.zeros(1, 4, 2, 2)
    student = teacher.clone()
    student[:, 0] = 1.0  # the student differs in channel 0 only
    torch.manual_seed(0)
    values = {round(loss({"p3": student}, {"p3": teacher}).item(), 6) for _ in range(20)}
    # Two of four channels imitated: 0 when channel 0 is left out, 1/2 of its mean when it is not.
    assert values == {0.0, 0.5}
    assert loss.eval()({"p3": student}, {"p3": teacher}).item() == pytest.approx(0.25)  # every channel
    with pytest.raises(ConfigError, match="FREE_CHANNELS"):
        FeatureDistillation(layers=["p3"], free_channels=1.0)
