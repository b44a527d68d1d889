"""The incremental protocol: stage specs, schedules and the per-stage data (docs/methods.md, section 1)."""
import copy

import pytest

from detectron2.structures import BoxMode

from ilmil.data.stages import (
    Stage,
    StageSpecError,
    build_schedule,
    parse_stage_spec,
    stage_test_dicts,
    stage_train_dicts,
)
from ilmil.engine.runner import resolve_class_order

# ----------------------------------------------------------------------------- specs


@pytest.mark.parametrize(
    "spec, num_classes, expected",
    [
        ("10+10", 20, [10, 10]),
        ("15+5", 20, [15, 5]),
        ("19+1", 20, [19, 1]),
        ("10+5+5", 20, [10, 5, 5]),
        ("15+1x5", 20, [15, 1, 1, 1, 1, 1]),
        ("40+40", 80, [40, 40]),
        ("70+10", 80, [70, 10]),
        ("40+10x4", 80, [40, 10, 10, 10, 10]),
        ("10+5", 20, [10, 5]),  # fewer than all classes: a prefix of the order
        (" 10 + 10 ", 20, [10, 10]),  # spaces around the terms are ignored
        ("15 + 1 x 5", 20, [15, 1, 1, 1, 1, 1]),
        ("20", 20, [20]),
        ("10+10", None, [10, 10]),  # without a class count nothing bounds the sum
    ],
)
def test_valid_stage_specs_parse_to_class_counts(spec, num_classes, expected):
    assert parse_stage_spec(spec, num_classes) == expected


def test_spec_needing_more_classes_than_the_dataset_names_both_numbers():
    with pytest.raises(StageSpecError) as info:
        parse_stage_spec("30+30", 20)
    message = str(info.value)
    assert "60" in message and "20" in message
    assert "30+30" in message


def test_spec_with_repeats_exceeding_the_class_count_is_rejected():
    with pytest.raises(StageSpecError, match=r"needs 21 classes .* has 20"):
        parse_stage_spec("16+1x5", 20)


def test_a_huge_repeat_is_refused_before_its_stages_are_listed():
    # 10^10 one-class stages would take ~80 GB as a list: the total is checked first.
    with pytest.raises(StageSpecError, match=r"needs 10000000010 classes .* has 20"):
        parse_stage_spec("10+1x10000000000", 20)


@pytest.mark.parametrize("spec, term", [("0+10", "0"), ("10x0", "10x0"), ("10+0x3", "0x3")])
def test_zero_counts_are_rejected(spec, term):
    with pytest.raises(StageSpecError, match="zero count; fix: every stage learns 1 class or more") as info:
        parse_stage_spec(spec, 20)
    assert repr(term) in str(info.value)


def test_too_many_classes_name_where_the_classes_come_from():
    with pytest.raises(StageSpecError, match=r"needs 20 classes but the dataset has 4; fix: lower the counts$"):
        parse_stage_spec("10+10", 4)
    with pytest.raises(StageSpecError, match=r"needs 20 classes but ILMIL.CLASS_ORDER \(--class-order\) has 2; "
                                             "fix: lower the counts or name more classes"):
        parse_stage_spec("10+10", 2, "ILMIL.CLASS_ORDER (--class-order)")


@pytest.mark.parametrize("spec, term", [("a+10", "a"), ("10.5+5", "10.5"), ("10+", ""), ("+10", ""),
                                        ("-5+10", "-5"), ("10++10", ""), ("15+1y5", "1y5"),
                                        ("1 1", "1 1")])  # not 11
def test_non_integer_terms_are_rejected_with_an_example(spec, term):
    with pytest.raises(StageSpecError) as info:
        parse_stage_spec(spec, 20)
    message = str(info.value)
    assert repr(term) in message
    assert "positive integer" in message and "15+1x5" in message


@pytest.mark.parametrize("spec", ["", "   "])
def test_empty_spec_is_rejected_with_an_example(spec):
    with pytest.raises(StageSpecError, match="empty stage spec.*10\\+10"):
        parse_stage_spec(spec, 20)


def test_stage_spec_error_is_a_value_error():
    # Callers that only know ValueError (argparse type=, yacs) still catch it.
    assert issubclass(StageSpecError, ValueError)


# -------------------------------------------------------------------------- schedule

CLASSES = tuple(f"c{i}" for i in range(20))


def test_schedule_splits_the_order_into_old_and_new_classes():
    stages = build_schedule(CLASSES, parse_stage_spec("10+5+5", 20))
    assert [s.index for s in stages] == [0, 1, 2]
    assert stages[0].old_classes == () and stages[0].new_classes == CLASSES[:10]
    assert stages[1].old_classes == CLASSES[:10] and stages[1].new_classes == CLASSES[10:15]
    assert stages[2].old_classes == CLASSES[:15] and stages[2].new_classes == CLASSES[15:]
    assert stages[2].seen_classes == CLASSES


def test_schedule_of_one_class_steps():
    stages = build_schedule(CLASSES, parse_stage_spec("15+1x5", 20))
    assert len(stages) == 6
    for k, stage in enumerate(stages[1:], start=1):
        assert stage.new_classes == (CLASSES[14 + k],)
        assert stage.old_classes == CLASSES[: 14 + k]


def test_schedule_of_a_prefix_leaves_later_classes_out():
    stages = build_schedule(CLASSES, [4, 2])
    assert stages[-1].seen_classes == CLASSES[:6]


def test_schedule_longer_than_the_class_order_is_rejected():
    with pytest.raises(StageSpecError, match="needs 21 classes .* has 20"):
        build_schedule(CLASSES, [20, 1])


# ------------------------------------------------------------------ per-stage data


def _ann(name, box=(1.0, 1.0, 10.0, 10.0), **extra):
    return {"category_name": name, "bbox": list(box), "bbox_mode": BoxMode.XYXY_ABS, **extra}


def _record(image_id, *anns):
    return {"file_name": f"/nowhere/{image_id}.jpg", "image_id": image_id, "height": 32, "width": 32,
            "annotations": list(anns), "annotation_file": f"/nowhere/{image_id}.xml"}


# Stage 1 of a dog,cat | person,car schedule.
STAGE1 = Stage(index=1, old_classes=("dog", "cat"), new_classes=("person", "car"))


@pytest.fixture
def records():
    return [
        _record("old_only", _ann("dog"), _ann("cat")),
        _record("mixed", _ann("dog"), _ann("car", box=(2, 3, 20, 30)), _ann("horse")),
        _record("new_only", _ann("person"), _ann("person", difficult=1)),
        _record("difficult_new", _ann("car", difficult=1), _ann("dog")),
        _record("crowd_new", _ann("person", iscrowd=1)),
        _record("future_only", _ann("horse")),
        _record("empty"),
    ]


def test_train_images_need_a_non_difficult_non_crowd_new_object(records):
    kept = [r["image_id"] for r in stage_train_dicts(records, STAGE1)]
    assert kept == ["mixed", "new_only"]


def test_train_images_keep_only_new_class_annotations(records):
    by_id = {r["image_id"]: r for r in stage_train_dicts(records, STAGE1)}
    assert [a["category_name"] for a in by_id["mixed"]["annotations"]] == ["car"]
    # A difficult new-class box does not qualify an image but stays as annotation
    # in an image that qualifies through another object.
    assert [(a["category_name"], a.get("difficult", 0)) for a in by_id["new_only"]["annotations"]] == [
        ("person", 0), ("person", 1)]
    assert by_id["mixed"]["annotations"][0]["bbox"] == [2, 3, 20, 30]


def test_category_id_is_the_index_in_the_seen_class_order(records):
    # seen order: dog 0, cat 1, person 2, car 3
    train = stage_train_dicts(records, STAGE1)
    ids = {a["category_name"]: a["category_id"] for r in train for a in r["annotations"]}
    assert ids == {"car": 3, "person": 2}
    test = stage_test_dicts(records, STAGE1)
    ids = {a["category_name"]: a["category_id"] for r in test for a in r["annotations"]}
    assert ids == {"dog": 0, "cat": 1, "person": 2, "car": 3}


def test_first_stage_ids_start_at_zero():
    stage0 = Stage(index=0, old_classes=(), new_classes=("person", "car"))
    train = stage_train_dicts([_record("a", _ann("car"), _ann("person"), _ann("dog"))], stage0)
    assert [(a["category_name"], a["category_id"]) for a in train[0]["annotations"]] == [
        ("car", 1), ("person", 0)]


def test_stage_selection_does_not_mutate_the_input_records(records):
    before = copy.deepcopy(records)
    train = stage_train_dicts(records, STAGE1)
    test = stage_test_dicts(records, STAGE1)
    assert records == before
    assert all("category_id" not in a for r in records for a in r["annotations"])
    # Mutating an output leaves the input alone too.
    train[0]["annotations"].clear()
    test[0]["annotations"][0]["category_id"] = 99
    assert records == before


def test_stage_records_keep_the_image_fields(records):
    for out in stage_train_dicts(records, STAGE1) + stage_test_dicts(records, STAGE1):
        source = next(r for r in records if r["image_id"] == out["image_id"])
        for key in ("file_name", "height", "width", "annotation_file"):
            assert out[key] == source[key]


def test_test_split_keeps_every_image_with_seen_class_ground_truth(records):
    test = stage_test_dicts(records, STAGE1)
    assert [r["image_id"] for r in test] == [r["image_id"] for r in records]
    names = {r["image_id"]: [a["category_name"] for a in r["annotations"]] for r in test}
    assert names["old_only"] == ["dog", "cat"]
    assert names["mixed"] == ["dog", "car"]  # the future class "horse" is dropped
    assert names["difficult_new"] == ["car", "dog"]  # difficult boxes stay (ignored in eval)
    assert names["crowd_new"] == ["person"]
    assert names["future_only"] == [] and names["empty"] == []


def test_first_stage_test_split_has_only_its_classes(records):
    stage0 = Stage(index=0, old_classes=(), new_classes=("dog", "cat"))
    test = stage_test_dicts(records, stage0)
    assert {a["category_name"] for r in test for a in r["annotations"]} == {"dog", "cat"}


# -------------------------------------------------------------------- class order


def test_empty_custom_order_keeps_the_dataset_order():
    assert resolve_class_order([], ["a", "b", "c"]) == ("a", "b", "c")


def test_custom_class_order_is_used():
    assert resolve_class_order(["c", "a", "b"], ("a", "b", "c")) == ("c", "a", "b")
    stages = build_schedule(resolve_class_order(["c", "a", "b"], ("a", "b", "c")), [1, 2])
    assert stages[0].new_classes == ("c",) and stages[1].new_classes == ("a", "b")


def test_custom_order_may_be_a_subset():
    assert resolve_class_order(["b"], ("a", "b", "c")) == ("b",)


def test_unknown_class_in_custom_order_is_named():
    with pytest.raises(StageSpecError) as info:
        resolve_class_order(["a", "zebra"], ("a", "b", "c"))
    message = str(info.value)
    assert "zebra" in message and "CLASS_ORDER" in message
    assert "a, b, c" in message  # the valid names are listed


def test_duplicate_class_in_custom_order_is_rejected():
    with pytest.raises(StageSpecError, match=r"^ILMIL.CLASS_ORDER lists a, b twice; fix: name each class once$"):
        resolve_class_order(["a", "b", "a", "c", "b"], ("a", "b", "c"))
