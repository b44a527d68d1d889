"""RetinaNet's anchor assignment: ATSS (ilmil/modeling/retinanet.py) on hand-built
anchors and boxes, and the detector built and trained with it from the config keys."""
import os

import pytest
import torch

from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from ilmil.config import CONFIGS_DIR, ConfigError, get_ilmil_cfg, set_num_classes
from ilmil.modeling import RetinaNet, atss_assignment

RETINANET = os.path.join(CONFIGS_DIR, "shapes", "retinanet_R18_FPN_cpu.yaml")


def _boxes(*rows):
    return Boxes(torch.tensor(rows, dtype=torch.float32).reshape(-1, 4))


def test_atss_keeps_the_candidates_above_mean_plus_std_by_hand():
    # One level of four anchors; the box [0,0,12,12] (centre 6,6). The 3 nearest centres:
    # a0 (5,5), a1 (15,5), a2 (5,15); a3 (25,25) is not a candidate.
    level = _boxes([0, 0, 10, 10], [10, 0, 20, 10], [0, 10, 10, 20], [20, 20, 30, 30])
    # IoUs: a0 100/144 = 0.6944; a1, a2 20/224 = 0.0893. mean 0.2910, std (n-1) 0.3493,
    # threshold 0.6403: a0 alone.
    matched, foreground = atss_assignment([level], _boxes([0, 0, 12, 12]), topk=3)
    assert foreground.tolist() == [True, False, False, False]
    assert matched[0].item() == 0


def test_a_candidate_above_the_threshold_is_positive_only_with_its_centre_inside_the_box():
    # Level 1: c0 [0,0,30,12] (centre 15,6) and two far anchors; level 2: one far anchor.
    # Candidates (topk 3 per level): all four. IoUs with both boxes below: c0 100/360 =
    # 0.278, the others 0: mean 0.069, std (n-1) 0.139, threshold 0.208: c0 passes.
    levels = [_boxes([0, 0, 30, 12], [20, 20, 30, 30], [-20, -20, -10, -10]), _boxes([60, 60, 90, 90])]
    _, foreground = atss_assignment(levels, _boxes([0, 0, 10, 10]), topk=3)
    assert not foreground.any()  # c0's centre lies right of the box
    _, foreground = atss_assignment(levels, _boxes([8, 0, 18, 10]), topk=3)
    assert foreground.tolist() == [True, False, False, False]  # now it lies inside


def test_an_anchor_chosen_by_two_boxes_goes_to_the_one_it_overlaps_most():
    level = _boxes([0, 0, 10, 10], [30, 30, 40, 40], [-40, -40, -30, -30])
    # a0's IoU: 100/196 = 0.510 with the first box, 100/120 = 0.833 with the second; with
    # the far anchors at 0 each box's threshold is 0.911 x its best IoU: both choose a0.
    matched, foreground = atss_assignment([level], _boxes([0, 0, 14, 14], [0, 0, 10, 12]), topk=3)
    assert foreground.tolist() == [True, False, False]
    assert matched[0].item() == 1


def test_a_single_candidate_is_its_own_threshold():
    level = _boxes([0, 0, 10, 10], [30, 30, 40, 40])
    _, foreground = atss_assignment([level], _boxes([0, 0, 12, 12]), topk=1)
    assert foreground.tolist() == [True, False]


def test_no_boxes_means_all_background():
    matched, foreground = atss_assignment([_boxes([0, 0, 10, 10], [5, 5, 9, 9])], _boxes(), topk=9)
    assert not foreground.any() and matched.tolist() == [0, 0]


ONE_ANCHOR = ("MODEL.ANCHOR_GENERATOR.SIZES", [[32], [64], [128], [256], [512]],
              "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS", [[1.0]])


def _model(*opts):
    cfg = get_ilmil_cfg(RETINANET, ["MODEL.DEVICE", "cpu", *opts])
    torch.manual_seed(0)
    return build_model(set_num_classes(cfg, 3))


def _batch():
    image = (torch.rand(3, 96, 128, generator=torch.Generator().manual_seed(7)) * 255).float()
    instances = Instances((96, 128))
    instances.gt_boxes = _boxes([10.0, 12.0, 40.0, 44.0], [60.0, 30.0, 118.0, 90.0])
    instances.gt_classes = torch.tensor([0, 2])
    return [{"image": image, "instances": instances}]


def _labels(model):
    batch = _batch()
    images = model.preprocess_image(batch)
    features = [model.backbone(images.tensor)[f] for f in model.head_in_features]
    (labels,), (boxes,) = model.label_anchors(model.anchor_generator(features), [batch[0]["instances"]])
    return labels, boxes, batch[0]["instances"]


def test_atss_on_one_anchor_per_location_gives_each_box_more_locations_than_the_iou_rule():
    iou_model = _model()
    atss_model = _model("MODEL.RETINANET.ASSIGNER", "atss", "MODEL.RETINANET.ATSS_TOPK", 9, *ONE_ANCHOR)
    assert isinstance(atss_model, RetinaNet) and (atss_model.assigner, atss_model.atss_topk) == ("atss", 9)
    iou_labels, _, _ = _labels(iou_model)
    atss_labels, atss_boxes, gt = _labels(atss_model)
    foreground = lambda labels: (labels >= 0) & (labels < 3)  # -1: ignored (the IoU rule only)
    assert set(iou_labels[foreground(iou_labels)].tolist()) == set(atss_labels[foreground(atss_labels)].tolist()) == {0, 2}
    assert (atss_labels >= 0).all()
    # Feature locations with a positive: 9 anchors per location for the IoU rule, 1 for ATSS.
    iou_locations = len(set((torch.nonzero(foreground(iou_labels))[:, 0] // 9).tolist()))
    assert int(foreground(atss_labels).sum()) > iou_locations
    for label, box in zip(atss_labels[foreground(atss_labels)], atss_boxes[foreground(atss_labels)]):
        expected = gt.gt_boxes.tensor[gt.gt_classes.tolist().index(label.item())]
        torch.testing.assert_close(box, expected)  # each positive's box is its label's GT box


def test_retinanet_trains_with_atss():
    model = _model("MODEL.RETINANET.ASSIGNER", "atss", *ONE_ANCHOR).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    history = []
    with EventStorage():
        for _ in range(10):
            losses = model(_batch())
            history.append(losses["loss_cls"].item())
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()
    assert history[-1] < 0.5 * history[0], history


@pytest.mark.parametrize("key, value, message", [
    ("MODEL.RETINANET.ASSIGNER", "atts", r"MODEL.RETINANET.ASSIGNER 'atts': choose one of iou, atss"),
    ("MODEL.RETINANET.ATSS_TOPK", 0, r"MODEL.RETINANET.ATSS_TOPK is 0; fix: a positive number"),
])
def test_a_bad_assigner_setting_is_refused_with_the_fix(key, value, message):
    with pytest.raises(ConfigError, match=message):
        _model(key, value)
