"""The MFRRK distillation losses (docs/methods.md, section 4) on small hand-made tensors: each
distance and loss against its formula computed by hand, gradients reach the
student only, and the adaptive layer weights follow their EMA."""
import math

import numpy as np
import pytest
import torch

from detectron2.structures import Boxes, Instances

from ilmil.config import ConfigError, get_ilmil_cfg
from ilmil.distill import (
    DISTILL_LOSS_REGISTRY,
    FEATURE_DISTANCES,
    FeatureDistillation,
    RCNDistillation,
    RPNDistillation,
    old_class_logits,
    registered_terms,
)

DISTANCES = sorted(FEATURE_DISTANCES)
# Where the RPN term reads both models' head outputs: (objectness logits, deltas) per level.
RPN_HEAD = "proposal_generator.rpn_head"


def _built(section, cfg):
    """The registered loss of config section ``section``, built from ``cfg`` as the
    distiller builds it (no feature shapes: no connectors)."""
    return registered_terms()[section](cfg, None, None)


def _rpn(loss_fn, s_logits, s_deltas, t_logits, t_deltas):
    return loss_fn({RPN_HEAD: (s_logits, s_deltas)}, {RPN_HEAD: (t_logits, t_deltas)}, None)


def _rcn(loss_fn, s_scores, s_deltas, t_scores, t_deltas):
    rois = RCNDistillation.ROIS
    return loss_fn({rois: (s_scores, s_deltas)}, {rois: (t_scores, t_deltas)}, None)


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- feature distances


def test_the_three_distances_of_the_design_are_registered():
    assert set(FEATURE_DISTANCES) == {"l2", "normalized", "filtered_l1"}


@pytest.mark.parametrize("name", DISTANCES)
def test_distance_is_zero_when_student_equals_teacher(name):
    s = _randn(2, 3, 4, 5)
    assert FEATURE_DISTANCES[name](s, s.clone()).item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("name", ["l2", "normalized"])
def test_distance_is_positive_when_student_differs(name):
    s, t = _randn(2, 3, 4, 5, seed=0), _randn(2, 3, 4, 5, seed=1)
    assert FEATURE_DISTANCES[name](s, t).item() > 1e-3


def test_filtered_l1_is_positive_where_the_teacher_responds_more_strongly():
    s = _randn(2, 3, 4, 5)
    t = s.clone()
    t[0, 1, 2, 3] += 5.0  # a bump of teacher activation at two locations
    t[1, 0, 0, 0] += 3.0
    assert FEATURE_DISTANCES["filtered_l1"](s, t).item() > 1e-3


# Hand computations with numpy (float64), element by element where it is clearer.
def _hand_l2(s, t):
    s, t = s.double().numpy(), t.double().numpy()
    return float(((s - t) ** 2).sum() / s.size)


def _hand_normalized(s, t):
    s, t = s.double().numpy(), t.double().numpy()
    total = 0.0
    for c in range(s.shape[1]):
        sc, tc = s[:, c], t[:, c]  # this channel over (N, H, W)
        sn = (sc - sc.mean()) / math.sqrt(((sc - sc.mean()) ** 2).mean())
        tn = (tc - tc.mean()) / math.sqrt(((tc - tc.mean()) ** 2).mean())
        total += ((sn - tn) ** 2).sum()
    return total / s.size / 2


def _hand_filtered_l1(s, t):
    s, t = s.double().numpy(), t.double().numpy()
    s_hat, t_hat = s - s.mean(), t - t.mean()  # mean over the whole tensor
    return float(np.maximum(t_hat - s_hat, 0).sum() / s.size)


HAND = {"l2": _hand_l2, "normalized": _hand_normalized, "filtered_l1": _hand_filtered_l1}


@pytest.mark.parametrize("name", DISTANCES)
def test_distance_matches_the_design_formula_computed_by_hand(name):
    s = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.5, -1.0], [2.0, 0.0]]],
                      [[[0.0, 1.0], [1.0, 5.0]], [[3.0, 1.0], [-2.0, 1.5]]]])  # [N=2, C=2, H=2, W=2]
    t = torch.tensor([[[[2.0, 2.0], [1.0, 6.0]], [[0.0, 0.0], [1.0, 1.0]]],
                      [[[1.0, -1.0], [3.0, 2.0]], [[2.5, 4.0], [0.0, -1.0]]]])
    expected = HAND[name](s, t)
    assert expected > 0.01
    assert FEATURE_DISTANCES[name](s, t).item() == pytest.approx(expected, rel=1e-4)


def test_normalized_distance_ignores_per_channel_scale_and_shift():
    s = _randn(2, 3, 4, 5)
    t = s * torch.tensor([2.0, 0.5, 7.0]).view(1, 3, 1, 1) + torch.tensor([1.0, -3.0, 0.2]).view(1, 3, 1, 1)
    assert FEATURE_DISTANCES["normalized"](s, t).item() == pytest.approx(0.0, abs=1e-5)


# --------------------------------------------------------------------------- FeatureDistillation


def _pair(layers, seed=0, shape=(2, 4, 6, 6)):
    student = {n: _randn(*shape, seed=seed + i).requires_grad_() for i, n in enumerate(layers)}
    teacher = {n: _randn(*shape, seed=100 + seed + i).requires_grad_() for i, n in enumerate(layers)}
    return student, teacher


@pytest.mark.parametrize("name", DISTANCES)
def test_feature_loss_gradient_reaches_the_student_not_the_teacher(name):
    layers = ["p2", "p3"]
    loss_fn = FeatureDistillation(layers=layers, distance=name, weighting="adaptive")
    student, teacher = _pair(layers)
    loss = loss_fn(student, teacher)
    assert loss.item() > 0
    loss.backward()
    for n in layers:
        assert student[n].grad is not None and student[n].grad.abs().sum() > 0, n
        assert teacher[n].grad is None, n


def _constant_pair(layer_distances):
    """Features whose l2 distance on layer i is exactly layer_distances[i] (S = 0, T = sqrt(d))."""
    student = {f"l{i}": torch.zeros(1, 2, 3, 3) for i in range(len(layer_distances))}
    teacher = {f"l{i}": torch.full((1, 2, 3, 3), math.sqrt(d)) for i, d in enumerate(layer_distances)}
    return student, teacher


def _hand_weights(ema, low=0.5, high=2.0):
    return [min(max(len(ema) * e / sum(ema), low), high) for e in ema]


def test_adaptive_weights_follow_the_ema_computed_by_hand():
    steps = [[1.0, 2.0, 3.0], [2.0, 2.0, 0.5], [0.25, 4.0, 1.0]]
    loss_fn = FeatureDistillation(layers=["l0", "l1", "l2"], distance="l2", weighting="adaptive").train()
    assert loss_fn.ema_distance.tolist() == [0.0, 0.0, 0.0]
    ema = [0.0, 0.0, 0.0]
    for d in steps:
        loss = loss_fn(*_constant_pair(d))
        ema = [0.9 * e + 0.1 * x for e, x in zip(ema, d)]
        weights = _hand_weights(ema)
        assert loss_fn.ema_distance.tolist() == pytest.approx(ema, rel=1e-5)
        assert loss.item() == pytest.approx(sum(w * x for w, x in zip(weights, d)), rel=1e-5)


def test_adaptive_weights_stay_within_the_clip_range_for_very_unequal_distances():
    d = [1e-6, 1.0, 1e4]
    loss_fn = FeatureDistillation(layers=["l0", "l1", "l2"], distance="l2", weighting="adaptive").train()
    for _ in range(3):
        loss = loss_fn(*_constant_pair(d))
    weights = loss_fn.layer_weights(torch.tensor(d)).tolist()  # one more EMA step, same distances
    assert all(0.5 - 1e-6 <= w <= 2.0 + 1e-6 for w in weights), weights
    assert weights[0] == pytest.approx(0.5) and weights[2] == pytest.approx(2.0)
    assert loss.item() == pytest.approx(0.5 * d[0] + 0.5 * d[1] + 2.0 * d[2], rel=1e-4)


def test_adaptive_ema_does_not_change_in_eval_mode():
    loss_fn = FeatureDistillation(layers=["l0", "l1"], distance="l2", weighting="adaptive").train()
    loss_fn(*_constant_pair([1.0, 3.0]))
    frozen = loss_fn.ema_distance.clone()
    loss_fn.eval()
    loss = loss_fn(*_constant_pair([5.0, 0.1]))
    assert torch.equal(loss_fn.ema_distance, frozen)
    weights = _hand_weights(frozen.tolist())  # the weights of the kept EMA
    assert loss.item() == pytest.approx(weights[0] * 5.0 + weights[1] * 0.1, rel=1e-5)


def test_adaptive_ema_is_saved_and_restored_with_the_state_dict():
    # Part of the student's checkpoint, so --resume continues the running average.
    loss_fn = FeatureDistillation(layers=["l0", "l1"], distance="l2", weighting="adaptive").train()
    loss_fn(*_constant_pair([1.0, 3.0]))
    restored = FeatureDistillation(layers=["l0", "l1"], distance="l2", weighting="adaptive")
    restored.load_state_dict(loss_fn.state_dict())
    assert restored.ema_distance.tolist() == pytest.approx([0.1, 0.3])


def test_uniform_weighting_gives_the_plain_sum_of_the_distances():
    d = [1e-3, 1.0, 50.0]
    loss_fn = FeatureDistillation(layers=["l0", "l1", "l2"], distance="l2", weighting="uniform").train()
    for _ in range(2):
        assert loss_fn(*_constant_pair(d)).item() == pytest.approx(sum(d), rel=1e-5)


def test_unknown_distance_is_refused_naming_the_choices():
    with pytest.raises(ConfigError, match=r"ILMIL.DISTILL.FEAT.DISTANCE 'cosine': choose one of") as info:
        FeatureDistillation(layers=["p2"], distance="cosine")
    for name in DISTANCES:
        assert name in str(info.value)


def test_unknown_weighting_is_refused():
    with pytest.raises(ConfigError, match=r"LAYER_WEIGHTING 'softmax': choose one of uniform, adaptive"):
        FeatureDistillation(layers=["p2"], weighting="softmax")


def test_empty_layer_list_is_refused():
    with pytest.raises(ConfigError, match=r"ILMIL.DISTILL.FEAT.LAYERS is empty.*at least one layer"):
        FeatureDistillation(layers=[])


def test_layer_missing_from_the_features_is_named():
    loss_fn = FeatureDistillation(layers=["p2", "res7"], distance="l2")
    student, teacher = _pair(["p2", "p3"])
    with pytest.raises(KeyError, match=r"res7"):
        loss_fn(student, teacher)


def test_student_and_teacher_shape_mismatch_is_refused():
    loss_fn = FeatureDistillation(layers=["p2"], distance="l2")
    with pytest.raises(ValueError, match=r"p2"):
        loss_fn({"p2": torch.zeros(1, 4, 6, 6)}, {"p2": torch.zeros(1, 8, 6, 6)})


def test_feature_loss_is_built_from_the_config_keys():
    cfg = get_ilmil_cfg(None, ["ILMIL.DISTILL.FEAT.LAYERS", ["p3", "res4"], "ILMIL.DISTILL.FEAT.DISTANCE",
                               "filtered_l1", "ILMIL.DISTILL.FEAT.LAYER_WEIGHTING", "uniform"])
    loss_fn = _built("FEAT", cfg)
    assert isinstance(loss_fn, FeatureDistillation)
    assert DISTILL_LOSS_REGISTRY.get("FeatureDistillation") is FeatureDistillation
    assert loss_fn.layers == ("p3", "res4")
    assert loss_fn.distance is FEATURE_DISTANCES["filtered_l1"]
    assert loss_fn.weighting == "uniform"
    cfg.ILMIL.DISTILL.FEAT.DISTANCE = "nope"
    with pytest.raises(ConfigError, match="ILMIL.DISTILL.FEAT.DISTANCE 'nope'"):
        FeatureDistillation(cfg)


# --------------------------------------------------------------------------- RPN


def _rpn_levels(seed=0, n=2, a=3, sizes=((4, 4), (2, 2))):
    logits = [_randn(n, a, h, w, seed=seed + i) for i, (h, w) in enumerate(sizes)]
    deltas = [_randn(n, 4 * a, h, w, seed=seed + 10 + i) for i, (h, w) in enumerate(sizes)]
    return logits, deltas


def _to_delta_layout(mask):
    """A per-anchor [N, A, H, W] tensor -> detectron2's delta layout [N, A*4, H, W]."""
    return mask.repeat_interleave(4, dim=1)


def test_rpn_loss_is_zero_when_student_equals_teacher():
    logits, deltas = _rpn_levels()
    loss = _rpn(RPNDistillation(margin=0.1), logits, deltas, [x.clone() for x in logits], [x.clone() for x in deltas])
    assert loss.item() == pytest.approx(0.0, abs=1e-7)


def test_rpn_loss_is_zero_where_the_student_is_more_confident():
    s_logits, s_deltas = _rpn_levels(seed=0)
    _, t_deltas = _rpn_levels(seed=50)  # deltas differ everywhere
    t_logits = [x - 1.0 for x in s_logits]
    assert _rpn(RPNDistillation(margin=0.1), s_logits, s_deltas, t_logits, t_deltas).item() == 0.0


def _rpn_case():
    """Teacher objectness above the student's by 0.05 (below the margin) on most
    anchors, by 1.0 on a few, below it on others; returns the per-level gaps."""
    s_logits, s_deltas = _rpn_levels()
    gaps = []
    for i, x in enumerate(s_logits):
        gap = torch.full_like(x, 0.05)
        gap[0, 1, 0, 0] = 1.0
        gap[1, 2, 1, 1] = 1.0
        gap[1, 0, 0, 1] = -0.7  # student more confident
        if i == 1:
            gap[0, 0, 1, 0] = 1.0
        gaps.append(gap)
    t_logits = [x + g for x, g in zip(s_logits, gaps)]
    return s_logits, s_deltas, t_logits, gaps


def test_rpn_deltas_only_count_on_anchors_above_the_margin():
    s_logits, s_deltas, t_logits, gaps = _rpn_case()
    # Teacher deltas differ from the student's on every anchor whose gap is below the margin.
    t_deltas = [d + 3.0 * _to_delta_layout((g <= 0.1).float()) for d, g in zip(s_deltas, gaps)]
    all_gaps = torch.cat([g.flatten() for g in gaps])
    objectness_only = (all_gaps.clamp(min=0) ** 2).mean().item()
    loss = _rpn(RPNDistillation(margin=0.1), s_logits, s_deltas, t_logits, t_deltas)
    assert loss.item() == pytest.approx(objectness_only, rel=1e-4)


def test_rpn_loss_matches_the_design_formula_computed_by_hand():
    s_logits, s_deltas, t_logits, gaps = _rpn_case()
    # Deltas differ by 0.5 per coordinate on every anchor: sum_4 = 1.0 per anchor.
    t_deltas = [d + 0.5 for d in s_deltas]
    num_anchors = sum(g.numel() for g in gaps)
    confident = sum(int((g > 0.1).sum()) for g in gaps)
    assert confident == 5
    objectness = sum(float((g.clamp(min=0) ** 2).sum()) for g in gaps) / num_anchors
    expected = objectness + 1.0  # mean over the 5 confident anchors of sum_4 0.5^2
    loss = _rpn(RPNDistillation(margin=0.1), s_logits, s_deltas, t_logits, t_deltas)
    assert loss.item() == pytest.approx(expected, rel=1e-4)


def test_rpn_delta_term_is_the_mean_over_confident_anchors_of_their_own_deltas():
    s_logits, s_deltas, t_logits, gaps = _rpn_case()
    # Only the anchor (image 0, anchor 1, y 0, x 0) of level 0 (confident) has other deltas.
    bump = torch.zeros_like(s_deltas[0])
    bump[0, 4 * 1: 4 * 1 + 4, 0, 0] = torch.tensor([1.0, 0.0, 2.0, 0.0])
    t_deltas = [s_deltas[0] + bump, s_deltas[1].clone()]
    num_anchors = sum(g.numel() for g in gaps)
    objectness = sum(float((g.clamp(min=0) ** 2).sum()) for g in gaps) / num_anchors
    loss = _rpn(RPNDistillation(margin=0.1), s_logits, s_deltas, t_logits, t_deltas)
    assert loss.item() == pytest.approx(objectness + 5.0 / 5, rel=1e-4)


def test_rpn_loss_gradient_reaches_the_student_not_the_teacher():
    s_logits, s_deltas, t_logits, _ = _rpn_case()
    t_deltas = [d + 0.5 for d in s_deltas]
    s_logits = [x.clone().requires_grad_() for x in s_logits]
    s_deltas = [x.clone().requires_grad_() for x in s_deltas]
    t_logits = [x.clone().requires_grad_() for x in t_logits]
    t_deltas = [x.clone().requires_grad_() for x in t_deltas]
    _rpn(RPNDistillation(margin=0.1), s_logits, s_deltas, t_logits, t_deltas).backward()
    for x in s_logits + s_deltas:
        assert x.grad is not None and x.grad.abs().sum() > 0
    for x in t_logits + t_deltas:
        assert x.grad is None
    # Deltas get gradient only on the confident anchors.
    assert torch.equal(s_deltas[0].grad[0, 4:8, 0, 0] != 0, torch.ones(4, dtype=torch.bool))
    assert (s_deltas[0].grad[0, 0:4] == 0).all()


def test_rpn_margin_is_read_from_the_config():
    cfg = get_ilmil_cfg(None, ["ILMIL.DISTILL.RPN.DELTA_MARGIN", 0.3])
    loss_fn = _built("RPN", cfg)
    assert isinstance(loss_fn, RPNDistillation) and loss_fn.margin == pytest.approx(0.3)
    assert RPNDistillation(cfg).margin == pytest.approx(0.3)


# --------------------------------------------------------------------------- RCN

K, NEW, R = 3, 2, 6  # old classes, new classes, proposals


def test_old_class_logits_picks_the_old_columns_and_the_last_one():
    scores = torch.arange(2 * (K + NEW + 1), dtype=torch.float32).view(2, K + NEW + 1)
    picked = old_class_logits(scores, K)
    assert picked.tolist() == [[0, 1, 2, 5], [6, 7, 8, 11]]


def _rcn_case(seed=0):
    """Teacher outputs [R, K+1] / [R, 4K]; a student [R, K+N+1] / [R, 4(K+N)] equal
    to it on the old columns and the (last) background column, arbitrary elsewhere."""
    t_scores, t_deltas = _randn(R, K + 1, seed=seed) * 3, _randn(R, 4 * K, seed=seed + 1)
    s_scores = torch.cat([t_scores[:, :K], _randn(R, NEW, seed=seed + 2) * 5, t_scores[:, K:]], dim=1)
    s_deltas = torch.cat([t_deltas, _randn(R, 4 * NEW, seed=seed + 3)], dim=1)
    return s_scores, s_deltas, t_scores, t_deltas


@pytest.mark.parametrize("mode", ["l2", "kl"])
def test_rcn_loss_is_zero_when_old_and_background_columns_equal_the_teacher(mode):
    s_scores, s_deltas, t_scores, t_deltas = _rcn_case()
    loss = _rcn(RCNDistillation(logits=mode), s_scores, s_deltas, t_scores, t_deltas)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("mode", ["l2", "kl"])
def test_rcn_logit_loss_ignores_a_per_proposal_shift(mode):
    s_scores, s_deltas, t_scores, t_deltas = _rcn_case()
    shifted = s_scores + _randn(R, 1, seed=9) * 4  # softmax and mean-centring remove it
    loss = _rcn(RCNDistillation(logits=mode), shifted, s_deltas, t_scores, t_deltas)
    assert loss.item() == pytest.approx(0.0, abs=1e-5)


def test_rcn_background_column_counts_and_new_class_columns_do_not():
    s_scores, s_deltas, t_scores, t_deltas = _rcn_case()
    loss_fn = RCNDistillation(logits="l2")
    other_bg = s_scores.clone()
    other_bg[:, -1] += 2.0
    assert _rcn(loss_fn, other_bg, s_deltas, t_scores, t_deltas).item() > 0.1
    other_new = s_scores.clone()
    other_new[:, K:K + NEW] = _randn(R, NEW, seed=77) * 10
    assert _rcn(loss_fn, other_new, s_deltas, t_scores, t_deltas).item() == pytest.approx(0.0, abs=1e-6)
    assert _rcn(RCNDistillation(logits="kl"), other_bg, s_deltas, t_scores, t_deltas).item() > 1e-3


def test_rcn_l2_logits_match_the_mean_centred_formula_by_hand():
    s_scores, s_deltas, t_scores, t_deltas = _rcn_case()
    s_scores = s_scores.clone()
    s_scores[:, :K] += _randn(R, K, seed=5)
    s_scores[:, -1] -= 1.5
    zs = torch.cat([s_scores[:, :K], s_scores[:, -1:]], 1).double().numpy()
    zt = t_scores.double().numpy()
    total = 0.0
    for i in range(R):
        a, b = zs[i] - zs[i].mean(), zt[i] - zt[i].mean()
        total += ((a - b) ** 2).sum()
    expected = total / (R * (K + 1))
    loss = _rcn(RCNDistillation(logits="l2"), s_scores, s_deltas, t_scores, t_deltas)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_rcn_kl_logits_match_the_softened_kl_by_hand():
    s_scores, s_deltas, t_scores, t_deltas = _rcn_case()
    s_scores = s_scores.clone()
    s_scores[:, :K] += _randn(R, K, seed=5)
    s_scores[:, -1] -= 1.5
    temp = 3.0
    zs = torch.cat([s_scores[:, :K], s_scores[:, -1:]], 1).double().numpy() / temp
    zt = t_scores.double().numpy() / temp
    total = 0.0
    for i in range(R):
        p = np.exp(zt[i]) / np.exp(zt[i]).sum()
        q = np.exp(zs[i]) / np.exp(zs[i]).sum()
        total += (p * np.log(p / q)).sum()  # KL(teacher || student)
    expected = temp * temp * total / R
    loss = _rcn(RCNDistillation(logits="kl", temperature=temp), s_scores, s_deltas, t_scores, t_deltas)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_rcn_sampling_leaves_out_proposals_on_new_class_gt_boxes_only():
    # A teacher of 3 classes (4 score columns); proposals on an old-class object, on a
    # new-class one and on the background. The old-class object's proposal is kept: there the
    # teacher's knowledge is what the student must keep (a compression run's every object).
    proposals = Instances((100, 100))
    proposals.proposal_boxes = Boxes(torch.tensor([[0.0, 0, 20, 20], [50, 50, 70, 70], [80, 0, 99, 10]]))
    gt = Instances((100, 100))
    gt.gt_boxes = Boxes(torch.tensor([[0.0, 0, 20, 20], [50, 50, 70, 70]]))
    gt.gt_classes = torch.tensor([2, 3])  # old class 2, new class 3
    outputs = (torch.arange(12.0).view(3, 4), torch.zeros(3, 12))
    rcn = RCNDistillation(new_gt_iou=0.5, num_samples=3)
    boxes, (scores, _) = rcn.select_rois([proposals], outputs, [gt])
    assert sorted(boxes[0].tensor[:, 0].tolist()) == [0.0, 80.0]
    assert sorted(scores[:, 0].tolist()) == [0.0, 8.0]
    boxes, _ = RCNDistillation(num_samples=3).select_rois([proposals], outputs, [gt])  # 0: every proposal
    assert len(boxes[0]) == 3


def test_rcn_box_loss_compares_only_the_first_4k_delta_columns():
    s_scores, s_deltas, t_scores, t_deltas = _rcn_case()
    loss_fn = RCNDistillation(logits="l2")
    new_class_boxes = s_deltas.clone()
    new_class_boxes[:, 4 * K:] += 10.0
    assert _rcn(loss_fn, s_scores, new_class_boxes, t_scores, t_deltas).item() == pytest.approx(0.0, abs=1e-6)
    old_class_box = s_deltas.clone()
    old_class_box[:, 0] += 0.5  # class 0, dx: sum_4 = 0.25 for 1 of the K classes of every proposal
    loss = _rcn(loss_fn, s_scores, old_class_box, t_scores, t_deltas)
    assert loss.item() == pytest.approx(0.25 / K, rel=1e-5)


def test_rcn_class_agnostic_deltas_are_compared_as_they_are():
    s_scores, _, t_scores, _ = _rcn_case()
    t_deltas = _randn(R, 4, seed=3)
    s_deltas = t_deltas + torch.tensor([1.0, 0.0, 0.0, 1.0])
    loss = _rcn(RCNDistillation(logits="l2"), s_scores, s_deltas, t_scores, t_deltas)
    assert loss.item() == pytest.approx(2.0, rel=1e-5)


@pytest.mark.parametrize("mode", ["l2", "kl"])
def test_rcn_gradient_reaches_the_student_not_the_teacher(mode):
    s_scores, s_deltas, t_scores, t_deltas = _rcn_case()
    s_scores = (s_scores + _randn(R, K + NEW + 1, seed=8)).requires_grad_()
    s_deltas = (s_deltas + 0.3).requires_grad_()
    t_scores, t_deltas = t_scores.clone().requires_grad_(), t_deltas.clone().requires_grad_()
    _rcn(RCNDistillation(logits=mode), s_scores, s_deltas, t_scores, t_deltas).backward()
    assert s_scores.grad[:, :K].abs().sum() > 0 and s_scores.grad[:, -1].abs().sum() > 0
    assert (s_scores.grad[:, K:K + NEW] == 0).all()  # new classes are not distilled
    assert s_deltas.grad[:, :4 * K].abs().sum() > 0 and (s_deltas.grad[:, 4 * K:] == 0).all()
    assert t_scores.grad is None and t_deltas.grad is None


@pytest.mark.parametrize("mode", ["l2", "kl"])
def test_rcn_loss_is_zero_without_teacher_proposals(mode):
    """A teacher whose RPN keeps no proposal in the batch (all boxes empty or not
    finite) gives an RCN term of 0, not a crash or a NaN that stops training."""
    s_scores = torch.zeros(0, K + NEW + 1, requires_grad=True)
    s_deltas = torch.zeros(0, 4 * (K + NEW), requires_grad=True)
    loss = _rcn(RCNDistillation(logits=mode), s_scores, s_deltas, torch.zeros(0, K + 1), torch.zeros(0, 4 * K))
    assert torch.isfinite(loss) and loss.item() == 0.0
    loss.backward()


def test_unknown_rcn_logits_mode_is_refused():
    with pytest.raises(ConfigError, match=r"ILMIL.DISTILL.RCN.LOGITS 'mse': choose one of l2, kl, unbiased_kl"):
        RCNDistillation(logits="mse")


def test_rcn_loss_is_built_from_the_config_keys():
    cfg = get_ilmil_cfg(None, ["ILMIL.DISTILL.RCN.LOGITS", "kl", "ILMIL.DISTILL.RCN.TEMPERATURE", 4.0])
    loss_fn = _built("RCN", cfg)
    assert isinstance(loss_fn, RCNDistillation)
    assert loss_fn.logits == "kl" and loss_fn.temperature == pytest.approx(4.0)
