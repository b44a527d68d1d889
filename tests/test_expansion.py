"""Expanding a K-class detector to K+N classes: before any training the student
scores and regresses the old classes exactly as the teacher (docs/methods.md, section 3)."""
import pytest
import torch

from detectron2.modeling import build_model
from detectron2.structures import Boxes

from ilmil.config import get_ilmil_cfg
from ilmil.modeling import expand_predictor_state_dict, load_expanded

NUM_OLD, NUM_NEW = 3, 2
CLS_W = "roi_heads.box_predictor.cls_score.weight"
CLS_B = "roi_heads.box_predictor.cls_score.bias"
BOX_W = "roi_heads.box_predictor.bbox_pred.weight"
BOX_B = "roi_heads.box_predictor.bbox_pred.bias"
# The feature term's running average in a distilled student's state (ilmil.distill.Distiller).
EMA_KEY = "distiller.terms.feat.ema_distance"


def _model(num_classes, seed, *opts):
    torch.manual_seed(seed)
    cfg = get_ilmil_cfg(None, ["MODEL.ROI_HEADS.NUM_CLASSES", num_classes, "MODEL.DEVICE", "cpu", *opts])
    return build_model(cfg).eval()


@torch.no_grad()
def _make_teacher_distinctive(model, seed=123):
    """Random, non-default values everywhere the copy must reach: predictor rows
    with O(1) weights and distinct biases (a wrong row shows), BN statistics."""
    gen = torch.Generator().manual_seed(seed)
    predictor = model.roi_heads.box_predictor
    # The untrained box head's features have norm ~4000: these scales give class
    # logits of order 10 and rows unlike the student's fresh ones (std 0.01 / 0.001).
    for layer, std in ((predictor.cls_score, 0.005), (predictor.bbox_pred, 0.05)):
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * std)
        layer.bias.copy_(torch.randn(layer.bias.shape, generator=gen))
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=gen) * 0.1)
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen) + 0.5)
            module.weight.copy_(torch.rand(module.weight.shape, generator=gen) + 0.5)
    return model


@pytest.fixture(scope="module")
def teacher():
    return _make_teacher_distinctive(_model(NUM_OLD, seed=0))


@pytest.fixture(scope="module")
def student(teacher):
    model = _model(NUM_OLD + NUM_NEW, seed=1)
    return load_expanded(model, teacher.state_dict(), NUM_OLD).eval()


@pytest.fixture(scope="module")
def image():
    gen = torch.Generator().manual_seed(7)
    return (torch.rand(3, 96, 128, generator=gen) * 255).float()


@torch.no_grad()
def _proposals(model, image):
    images = model.preprocess_image([{"image": image}])
    features = model.backbone(images.tensor)
    proposals, _ = model.proposal_generator(images, features, None)
    return features, proposals


@torch.no_grad()
def _box_outputs(model, features, boxes):
    """Class logits and box deltas of ``model``'s box head on the given boxes."""
    heads = model.roi_heads
    pooled = heads.box_pooler([features[f] for f in heads.box_in_features], [boxes])
    return heads.box_predictor(heads.box_head(pooled))


@pytest.fixture(scope="module")
def outputs(teacher, student, image):
    """Box-head outputs of both models on the SAME boxes (the teacher's proposals
    plus hand-made ones), each model on its own features."""
    t_features, t_proposals = _proposals(teacher, image)
    s_features, _ = _proposals(student, image)
    boxes = Boxes(torch.cat([t_proposals[0].proposal_boxes.tensor[:50],
                             torch.tensor([[0.0, 0.0, 60.0, 40.0], [30.0, 20.0, 120.0, 90.0]])]))
    return _box_outputs(teacher, t_features, boxes), _box_outputs(student, s_features, boxes)


def test_student_predictor_has_the_expanded_shapes(student):
    predictor = student.roi_heads.box_predictor
    assert predictor.cls_score.out_features == NUM_OLD + NUM_NEW + 1
    assert predictor.bbox_pred.out_features == 4 * (NUM_OLD + NUM_NEW)


def test_old_class_logits_are_copied(outputs):
    (t_logits, _), (s_logits, _) = outputs
    assert t_logits.shape[1] == NUM_OLD + 1 and s_logits.shape[1] == NUM_OLD + NUM_NEW + 1
    assert t_logits[:, :NUM_OLD].abs().max() > 0.1  # not trivially zero
    torch.testing.assert_close(s_logits[:, :NUM_OLD], t_logits[:, :NUM_OLD])


def test_background_logit_stays_last(outputs):
    (t_logits, _), (s_logits, _) = outputs
    # teacher background = index K = 3, student background = index K+N = 5
    torch.testing.assert_close(s_logits[:, -1], t_logits[:, NUM_OLD])
    torch.testing.assert_close(s_logits[:, NUM_OLD + NUM_NEW], t_logits[:, NUM_OLD])


def test_old_class_box_deltas_are_copied(outputs):
    (_, t_deltas), (_, s_deltas) = outputs
    assert t_deltas.shape[1] == 4 * NUM_OLD and s_deltas.shape[1] == 4 * (NUM_OLD + NUM_NEW)
    torch.testing.assert_close(s_deltas[:, : 4 * NUM_OLD], t_deltas)


def test_new_class_outputs_are_fresh(teacher, student, outputs):
    (t_logits, t_deltas), (s_logits, s_deltas) = outputs
    new_logits = s_logits[:, NUM_OLD : NUM_OLD + NUM_NEW]
    for column in range(NUM_OLD + 1):
        for new in range(NUM_NEW):
            assert not torch.allclose(new_logits[:, new], t_logits[:, column])
    t_state, s_state = teacher.state_dict(), student.state_dict()
    new_rows = s_state[CLS_W][NUM_OLD : NUM_OLD + NUM_NEW]
    assert not any(torch.allclose(row, old) for row in new_rows for old in t_state[CLS_W])
    # The student's own initialisation is kept for the new rows: std 0.01, bias 0.
    assert 0.003 < new_rows.std() < 0.03
    assert torch.all(s_state[CLS_B][NUM_OLD : NUM_OLD + NUM_NEW] == 0)
    new_box_rows = s_state[BOX_W][4 * NUM_OLD :]
    assert new_box_rows.std() < 0.01  # std 0.001 init, unlike the teacher's 0.05
    assert not torch.allclose(s_deltas[:, 4 * NUM_OLD :], t_deltas[:, : 4 * NUM_NEW])


def test_old_class_scores_shrink_by_the_same_factor(outputs):
    """softmax over K+N+1 logits: old-class and background probabilities are the
    teacher's divided by one per-proposal factor 1 + sum(exp new) / Z_teacher,
    i.e. their log-probabilities drop by logsumexp(student) - logsumexp(teacher)."""
    (t_logits, _), (s_logits, _) = outputs
    t_logp = t_logits.double().log_softmax(1)
    s_logp = s_logits.double().log_softmax(1)
    s_old = torch.cat([s_logp[:, :NUM_OLD], s_logp[:, -1:]], 1)
    drop = t_logp - s_old
    expected = s_logits.double().logsumexp(1) - t_logits.double().logsumexp(1)
    torch.testing.assert_close(drop, expected[:, None].expand_as(drop), rtol=1e-6, atol=1e-4)
    assert torch.all(expected > -1e-4)  # the factor is >= 1 (up to float32 rounding)
    assert expected.max() > 0.1  # and the new classes do take probability mass


def test_every_non_predictor_parameter_and_buffer_is_copied(teacher, student):
    t_state, s_state = teacher.state_dict(), student.state_dict()
    assert set(t_state) == set(s_state)
    for key, value in t_state.items():
        if key.startswith("roi_heads.box_predictor."):
            continue
        assert torch.equal(s_state[key], value), key


def test_rpn_proposals_of_student_and_teacher_are_identical(teacher, student, image):
    _, t_props = _proposals(teacher, image)
    _, s_props = _proposals(student, image)
    assert len(t_props[0]) > 0
    torch.testing.assert_close(s_props[0].proposal_boxes.tensor, t_props[0].proposal_boxes.tensor, rtol=0, atol=0)
    torch.testing.assert_close(s_props[0].objectness_logits, t_props[0].objectness_logits, rtol=0, atol=0)


def test_expansion_leaves_its_inputs_unchanged(teacher):
    new = _model(NUM_OLD + NUM_NEW, seed=2)
    old_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    new_state = {k: v.clone() for k, v in new.state_dict().items()}
    merged = expand_predictor_state_dict(old_state, new_state, NUM_OLD)
    for before, state in ((teacher.state_dict(), old_state), (new.state_dict(), new_state)):
        assert all(torch.equal(before[k], state[k]) for k in before)
    assert {k: v.shape for k, v in merged.items()} == {k: v.shape for k, v in new_state.items()}
    assert merged[CLS_W] is not new_state[CLS_W]


@pytest.mark.parametrize("num_old", [2, 4])
def test_wrong_number_of_old_classes_is_a_value_error(teacher, num_old):
    new_state = _model(NUM_OLD + NUM_NEW, seed=2).state_dict()
    with pytest.raises(ValueError, match=f"old model has {NUM_OLD} classes, the schedule says {num_old}"):
        expand_predictor_state_dict(teacher.state_dict(), new_state, num_old)


def test_other_shape_mismatch_names_the_parameter(teacher):
    other = _model(NUM_OLD + NUM_NEW, 2, "MODEL.ROI_BOX_HEAD.FC_DIM", 128)
    with pytest.raises(ValueError, match="roi_heads.box_head.fc1.weight"):
        expand_predictor_state_dict(teacher.state_dict(), other.state_dict(), NUM_OLD)


@pytest.mark.parametrize("old_key", [EMA_KEY, "feature_loss.ema_distance"], ids=["distiller", "feature_loss-prefix"])
def test_the_old_students_distillation_state_is_not_carried_into_the_next_stage(teacher, old_key):
    # A stage-1 student's final checkpoint (the teacher of stage 2) holds its layer
    # weights' running average (under ``feature_loss.`` in checkpoints written before
    # the distiller); stage 2's student starts its own from zero.
    old_state = dict(teacher.state_dict(), **{old_key: torch.tensor([0.5, 2.0])})
    new_state = dict(_model(NUM_OLD + NUM_NEW, seed=1).state_dict(), **{EMA_KEY: torch.zeros(3)})
    merged = expand_predictor_state_dict(old_state, new_state, NUM_OLD)
    assert merged[EMA_KEY].tolist() == [0.0, 0.0, 0.0]
    assert set(merged) == set(new_state)
    # A student without the feature term gets no such key at all.
    plain = _model(NUM_OLD + NUM_NEW, seed=1)
    load_expanded(plain, old_state, NUM_OLD)
    assert old_key not in plain.state_dict() and EMA_KEY not in plain.state_dict()


def test_class_agnostic_box_regression_is_copied_whole():
    agnostic = ("MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", True)
    teacher = _make_teacher_distinctive(_model(NUM_OLD, 0, *agnostic))
    student = load_expanded(_model(NUM_OLD + NUM_NEW, 1, *agnostic), teacher.state_dict(), NUM_OLD)
    t_state, s_state = teacher.state_dict(), student.state_dict()
    assert s_state[BOX_W].shape == (4, t_state[BOX_W].shape[1])
    assert torch.equal(s_state[BOX_W], t_state[BOX_W])
    assert torch.equal(s_state[BOX_B], t_state[BOX_B])
    assert torch.equal(s_state[CLS_W][:NUM_OLD], t_state[CLS_W][:NUM_OLD])
    assert torch.equal(s_state[CLS_W][-1], t_state[CLS_W][NUM_OLD])
