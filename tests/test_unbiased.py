"""MMA's unbiased losses (docs/methods.md, section 4.5) on tiny hand-made logits:
2 old classes, 1 new class and background (last), the expected values computed
here with math.exp / math.log; their limit cases, the gradients, and the ``mma``
preset's keys."""
import math

import pytest
import torch
import torch.nn.functional as F

from ilmil.config import ConfigError, get_ilmil_cfg, uses_teacher
from ilmil.distill import RCNDistillation, check_distill_config
from ilmil.modeling.unbiased import unbiased_cross_entropy, unbiased_student_log_probs

K, NEW = 2, 1  # old classes, new classes; background is column K + NEW
BG = K + NEW

# Three proposals' student logits [old 0, old 1, new, background].
SCORES = [[1.0, 2.0, 0.5, -1.0], [0.2, -0.3, 1.5, 0.7], [-0.4, 0.9, 0.1, 1.2]]


def _rcn(loss_fn, s_scores, s_deltas, t_scores, t_deltas):
    """The RCN term on box-head outputs as the student records them (scores, deltas)."""
    rois = RCNDistillation.ROIS
    return loss_fn({rois: (s_scores, s_deltas)}, {rois: (t_scores, t_deltas)}, None)


def _log_sum_exp(values):
    return math.log(sum(math.exp(v) for v in values))


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- unbiased classification


def test_unbiased_ce_matches_the_hand_computed_value():
    # Background (may be an old object), the new class, and a pseudo-labelled old class.
    gt = [BG, 2, 0]
    z0, z1, z2 = SCORES
    background_or_old = -(_log_sum_exp([z0[0], z0[1], z0[3]]) - _log_sum_exp(z0))
    new = -(z1[2] - _log_sum_exp(z1))
    old = -(z2[0] - _log_sum_exp(z2))
    expected = (background_or_old + new + old) / 3
    loss = unbiased_cross_entropy(torch.tensor(SCORES), torch.tensor(gt), K)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_unbiased_ce_of_a_background_proposal_is_below_the_plain_ce():
    scores, gt = torch.tensor(SCORES), torch.tensor([BG, BG, BG])
    plain = F.cross_entropy(scores, gt).item()
    unbiased = unbiased_cross_entropy(scores, gt, K).item()
    # -log(p_bg + p_old) < -log p_bg: the old classes' share is not counted as an error.
    expected_gap = sum(_log_sum_exp([z[0], z[1], z[3]]) - z[3] for z in SCORES) / 3
    assert plain - unbiased == pytest.approx(expected_gap, rel=1e-5)


def test_unbiased_ce_does_not_tell_background_from_an_old_class():
    swapped = [[z[3], z[1], z[2], z[0]] for z in SCORES]  # old class 0 <-> background
    gt = torch.tensor([BG, BG, BG])
    a = unbiased_cross_entropy(torch.tensor(SCORES), gt, K)
    b = unbiased_cross_entropy(torch.tensor(swapped), gt, K)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)


def test_unbiased_ce_is_the_plain_ce_without_old_classes():
    scores = _randn(16, 1 + NEW + 1, seed=3) * 3  # 0 old classes: [new..., background]
    gt = torch.tensor([0, 1, 2, 2] * 4)
    unbiased = unbiased_cross_entropy(scores, gt, num_old=0)
    assert unbiased.item() == pytest.approx(F.cross_entropy(scores, gt).item(), rel=1e-6)


def test_unbiased_ce_on_labelled_proposals_is_the_plain_ce():
    scores, gt = torch.tensor(SCORES), torch.tensor([2, 0, 1])
    assert unbiased_cross_entropy(scores, gt, K).item() == pytest.approx(F.cross_entropy(scores, gt).item(), rel=1e-6)


def test_unbiased_ce_pushes_the_new_class_down_on_background_only():
    scores = torch.tensor(SCORES, requires_grad=True)
    unbiased_cross_entropy(scores, torch.tensor([BG, BG, BG]), K).backward()
    p = F.softmax(torch.tensor(SCORES), dim=1)
    # d/dz_new of -log(p_bg + p_old) = p_new: raising the new class is the only error.
    assert torch.allclose(scores.grad[:, 2], p[:, 2] / 3, atol=1e-6)
    assert (scores.grad[:, [0, 1, 3]] < 0).all()


def test_unbiased_ce_of_no_proposals_is_zero_and_differentiable():
    scores = torch.zeros(0, K + NEW + 1, requires_grad=True)
    loss = unbiased_cross_entropy(scores, torch.zeros(0, dtype=torch.int64), K)
    assert loss.item() == 0.0
    loss.backward()


# --------------------------------------------------------------------------- unbiased distillation


def test_unbiased_student_log_probs_merge_the_new_classes_into_background():
    temp = 2.0
    merged = unbiased_student_log_probs(torch.tensor(SCORES), K, temp)
    for row, z in zip(merged.tolist(), SCORES):
        norm = _log_sum_exp([v / temp for v in z])
        expected = [z[0] / temp - norm, z[1] / temp - norm, _log_sum_exp([z[2] / temp, z[3] / temp]) - norm]
        assert row == pytest.approx(expected, rel=1e-6)


def _teacher():
    """Teacher logits [old 0, old 1, background] for the three proposals, and
    class-specific deltas equal to the student's old-class ones."""
    t_scores = torch.tensor([[0.5, 1.5, 0.0], [1.0, -0.5, 2.0], [0.3, 0.3, -0.2]])
    t_deltas = _randn(3, 4 * K, seed=1)
    s_deltas = torch.cat([t_deltas, _randn(3, 4 * NEW, seed=2)], dim=1)
    return t_scores, t_deltas, s_deltas


def test_unbiased_kl_matches_the_hand_computed_value():
    t_scores, t_deltas, s_deltas = _teacher()
    temp = 2.0
    total = 0.0
    for zs, zt in zip(SCORES, t_scores.tolist()):
        s_norm, t_norm = _log_sum_exp([v / temp for v in zs]), _log_sum_exp([v / temp for v in zt])
        p = [math.exp(zs[0] / temp - s_norm), math.exp(zs[1] / temp - s_norm),
             math.exp(zs[2] / temp - s_norm) + math.exp(zs[3] / temp - s_norm)]  # bg or new
        q = [math.exp(v / temp - t_norm) for v in zt]
        total += sum(qj * math.log(qj / pj) for qj, pj in zip(q, p))
    expected = temp * temp * total / 3
    loss_fn = RCNDistillation(logits="unbiased_kl", temperature=temp)
    loss = _rcn(loss_fn, torch.tensor(SCORES), s_deltas, t_scores, t_deltas)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("share", [0.05, 0.5, 0.95])
def test_unbiased_kl_is_zero_when_old_and_background_or_new_equal_the_teacher(share):
    """The student's new class takes ``share`` of the teacher's background mass:
    unbiased_kl does not care how it is split, plain kl does."""
    t_scores, t_deltas, s_deltas = _teacher()
    temp = 2.0
    bg = t_scores[:, -1:]
    student = torch.cat([t_scores[:, :K], bg + temp * math.log(share), bg + temp * math.log(1 - share)], dim=1)
    unbiased = _rcn(RCNDistillation(logits="unbiased_kl", temperature=temp), student, s_deltas, t_scores, t_deltas)
    assert unbiased.item() == pytest.approx(0.0, abs=1e-6)
    plain = _rcn(RCNDistillation(logits="kl", temperature=temp), student, s_deltas, t_scores, t_deltas)
    assert plain.item() > 1e-5  # the student's own background is 1 - share of the teacher's


def test_unbiased_kl_is_kl_without_new_classes():
    t_scores, t_deltas, _ = _teacher()
    student = t_scores + _randn(3, K + 1, seed=4)
    args = (student, t_deltas + 0.1, t_scores, t_deltas)
    unbiased = _rcn(RCNDistillation(logits="unbiased_kl", temperature=3.0), *args)
    assert unbiased.item() == pytest.approx(_rcn(RCNDistillation(logits="kl", temperature=3.0), *args).item(), rel=1e-6)


def test_unbiased_kl_gradient_reaches_the_student_only_and_its_new_class_too():
    t_scores, t_deltas, s_deltas = _teacher()
    s_scores = torch.tensor(SCORES, requires_grad=True)
    s_deltas = (s_deltas + 0.3).requires_grad_()
    t_scores, t_deltas = t_scores.clone().requires_grad_(), t_deltas.clone().requires_grad_()
    _rcn(RCNDistillation(logits="unbiased_kl"), s_scores, s_deltas, t_scores, t_deltas).backward()
    assert (s_scores.grad.abs().sum(dim=0) > 0).all()  # the new class is in the merged background
    assert s_deltas.grad[:, :4 * K].abs().sum() > 0 and (s_deltas.grad[:, 4 * K:] == 0).all()
    assert t_scores.grad is None and t_deltas.grad is None


def test_unbiased_kl_is_a_config_choice_and_unknown_modes_are_refused_with_it():
    cfg = get_ilmil_cfg(None, ["ILMIL.DISTILL.RCN.LOGITS", "unbiased_kl"], method="ilmil")
    check_distill_config(cfg)
    assert RCNDistillation(cfg).logits == "unbiased_kl"
    cfg = get_ilmil_cfg(None, ["ILMIL.DISTILL.RCN.LOGITS", "unbiased"], method="ilmil")
    with pytest.raises(ConfigError, match="ILMIL.DISTILL.RCN.LOGITS 'unbiased': choose one of l2, kl, unbiased_kl"):
        check_distill_config(cfg)


# --------------------------------------------------------------------------- the preset


def test_mma_is_faster_ilod_distillation_with_both_unbiased_losses_and_no_pseudo_labels():
    cfg = get_ilmil_cfg(method="mma")
    d = cfg.ILMIL.DISTILL
    assert (d.FEAT.ENABLED, d.RPN.ENABLED, d.RCN.ENABLED) == (True, True, True)
    assert list(d.FEAT.LAYERS) == ["p2", "p3", "p4", "p5", "p6"]
    assert (d.FEAT.DISTANCE, d.FEAT.LAYER_WEIGHTING) == ("filtered_l1", "uniform")
    assert d.RCN.LOGITS == "unbiased_kl" and cfg.ILMIL.UNBIASED_CLS.ENABLED
    assert not cfg.ILMIL.PSEUDO_LABELS.ENABLED
    assert uses_teacher(cfg)


def test_the_unbiased_keys_are_off_in_every_other_preset():
    for method in ("finetune", "joint", "pseudo", "faster-ilod", "ilmil"):
        cfg = get_ilmil_cfg(method=method)
        assert not cfg.ILMIL.UNBIASED_CLS.ENABLED and cfg.ILMIL.DISTILL.RCN.LOGITS != "unbiased_kl", method


def test_unbiased_classification_alone_needs_the_teacher():
    assert uses_teacher(get_ilmil_cfg(None, ["ILMIL.UNBIASED_CLS.ENABLED", "True"], method="finetune"))
