"""Leak-free stages (ILMIL.STAGE_IMAGES exclusive): every training image in exactly one
stage, drawn by a documented, seeded rule (README, Leak-free stages; docs/methods.md, section 1)."""
import logging
import os
import random

import pytest

from detectron2.data import DatasetCatalog
from detectron2.structures import BoxMode

from ilmil.config import get_ilmil_cfg
from ilmil.data import (
    DatasetSource,
    ExclusiveStageImages,
    build_schedule,
    load_coco_json,
    parse_stage_spec,
    register_stage_datasets,
    shape_class_names,
    shared_image_count,
    stage_test_dicts,
    stage_train_dicts,
)
from ilmil.engine.run_dir import RunValidationError
from ilmil.engine.runner import IncrementalRun
from voc_coco_files import write_coco_json

CLASSES = tuple(f"c{i}" for i in range(20))
SCHEDULE = build_schedule(CLASSES, parse_stage_spec("10+5+5", 20))


def _record(image_id, *names, difficult=(), crowd=()):
    annotations = [{"category_name": n, "bbox": [0.0, 0.0, 8.0, 8.0], "bbox_mode": BoxMode.XYXY_ABS,
                    "difficult": int(n in difficult), "iscrowd": int(n in crowd)} for n in names]
    return {"image_id": image_id, "file_name": f"{image_id}.jpg", "height": 64, "width": 64,
            "annotations": annotations}


@pytest.fixture(scope="module")
def records():
    """300 images of 1-5 objects of random classes: most hold objects of several stages."""
    draw = random.Random(0)
    return [_record(i, *draw.choices(CLASSES, k=draw.randint(1, 5))) for i in range(300)]


def _stage_ids(records, schedule, exclusive=None):
    return [[r["image_id"] for r in stage_train_dicts(records, stage, exclusive)] for stage in schedule]


def _stage_of_each(records, exclusive):
    return [exclusive.stage_of(r) for r in records]


def _eligible(record, schedule):
    """The stages the standard rule trains ``record`` in."""
    return {stage.index for stage in schedule if stage_train_dicts([record], stage)}


def test_exclusive_rule_puts_each_training_image_in_exactly_one_stage(records):
    assert shared_image_count(records, SCHEDULE) > 150  # the standard rule reuses most images
    per_stage = _stage_ids(records, SCHEDULE, ExclusiveStageImages(SCHEDULE, seed=0))
    ids = [i for stage in per_stage for i in stage]
    assert len(ids) == len(set(ids))
    standard = {i for stage in _stage_ids(records, SCHEDULE) for i in stage}
    assert set(ids) == standard
    assert all(per_stage)


def test_an_image_goes_to_one_of_its_stages_and_an_image_of_one_stage_to_it(records):
    exclusive = ExclusiveStageImages(SCHEDULE, seed=0)
    single = 0
    for record in records:
        eligible = _eligible(record, SCHEDULE)
        assert exclusive.stage_of(record) in eligible
        if len(eligible) == 1:
            single += 1
            for seed in range(5):
                assert ExclusiveStageImages(SCHEDULE, seed).stage_of(record) == min(eligible)
    assert single > 20
    assert exclusive.stage_of(_record("none")) is None
    assert exclusive.stage_of(_record("first_and_last", "c0", "c19")) in (0, 2)


def test_exclusive_stages_keep_the_standard_records_of_their_images(records):
    exclusive = ExclusiveStageImages(SCHEDULE, seed=0)
    for stage in SCHEDULE:
        standard = {r["image_id"]: r for r in stage_train_dicts(records, stage)}
        for record in stage_train_dicts(records, stage, exclusive):
            assert record == standard[record["image_id"]]  # only the stage's classes, same ids


def test_same_seed_same_assignment_another_seed_another(records):
    first = [ExclusiveStageImages(SCHEDULE, 0).stage_of(r) for r in records]
    assert [ExclusiveStageImages(SCHEDULE, 0).stage_of(r) for r in records] == first
    assert [ExclusiveStageImages(SCHEDULE, 1).stage_of(r) for r in records] != first


def test_an_images_stage_depends_neither_on_the_others_nor_on_their_order(records):
    exclusive = ExclusiveStageImages(SCHEDULE, seed=3)
    together = dict(zip((r["image_id"] for r in records), _stage_of_each(records, exclusive)))
    shuffled = list(records)
    random.Random(1).shuffle(shuffled)
    per_stage = _stage_ids(shuffled, SCHEDULE, exclusive)
    assert {i: k for k, ids in enumerate(per_stage) for i in ids} == together
    alone = {r["image_id"]: k for r in records[:40] for k, ids in enumerate(_stage_ids([r], SCHEDULE, exclusive))
             if ids}
    assert alone == {i: together[i] for i in alone}



def test_the_draw_is_proportional_to_the_objects_of_each_stage():
    # 3 objects of stage 0, 1 of stage 1: stage 0 with probability 3/4.
    records = [_record(i, "c0", "c1", "c2", "c10") for i in range(4000)]
    stages = _stage_of_each(records, ExclusiveStageImages(SCHEDULE, seed=0))
    assert set(stages) == {0, 1}
    assert 0.72 < stages.count(0) / len(stages) < 0.78


def test_difficult_and_crowd_objects_do_not_make_an_image_eligible():
    record = _record("x", "c0", "c10", "c15", difficult=("c10",), crowd=("c15",))
    assert shared_image_count([record], SCHEDULE) == 0
    assert {ExclusiveStageImages(SCHEDULE, seed).stage_of(record) for seed in range(20)} == {0}


# ------------------------------------------------------------- registered datasets


def _registered_train_ids(prefix, source, schedule, exclusive):
    ids = []
    for stage in schedule:
        train_name, test_name = register_stage_datasets(prefix, source, stage, exclusive)
        ids.append([r["image_id"] for r in DatasetCatalog.get(train_name)])
        assert DatasetCatalog.get(test_name) == stage_test_dicts(source.test, stage)  # test split unchanged
    return ids


def _assert_one_stage_each(per_stage, source, schedule):
    ids = [i for stage in per_stage for i in stage]
    assert len(ids) == len(set(ids))
    assert set(ids) == {r["image_id"] for r in source.train if _eligible(r, schedule)}


def test_tiny_shapes_images_each_train_one_stage_of_10_5_5(tiny_shapes_dir):
    images = os.path.join(tiny_shapes_dir, "JPEGImages")
    train, class_names = load_coco_json(os.path.join(tiny_shapes_dir, "annotations", "instances_train.json"), images)
    test, _ = load_coco_json(os.path.join(tiny_shapes_dir, "annotations", "instances_test.json"), images)
    assert class_names == tuple(shape_class_names(20))
    source = DatasetSource("shapes", class_names, train, test, False)
    schedule = build_schedule(class_names, parse_stage_spec("10+5+5", 20))
    assert shared_image_count(train, schedule) > 5
    per_stage = _registered_train_ids("test_exclusive_shapes", source, schedule, ExclusiveStageImages(schedule, 0))
    _assert_one_stage_each(per_stage, source, schedule)
    again = _registered_train_ids("test_exclusive_shapes", source, schedule, ExclusiveStageImages(schedule, 0))
    assert again == per_stage
    standard = _registered_train_ids("test_exclusive_shapes", source, schedule, None)
    assert sum(map(len, standard)) > sum(map(len, per_stage))


# Hand-built COCO data: 4 classes, 2+1+1. Image i holds a (stage 0), b (stage 0) and c
# (stage 1) by turns, and d (stage 2) in every third image; 91-93 hold d only.
COCO_CATEGORIES = {1: "a", 2: "b", 3: "c", 4: "d"}


def _coco_image(image_id, category_ids):
    anns = [{"category_id": c, "bbox": [2.0 + 3 * n, 2.0, 10.0, 10.0]} for n, c in enumerate(category_ids)]
    return (image_id, f"{image_id}.jpg", 64, 48, anns)


def _coco_images():
    images = [_coco_image(i, [1 + i % 3, 1 + (i + 1) % 3] + ([4] if i % 3 == 0 else [])) for i in range(1, 91)]
    return images + [_coco_image(i, [4]) for i in (91, 92, 93)]


@pytest.fixture
def coco_source(tmp_path):
    image_root = tmp_path / "images"
    train_json = write_coco_json(str(tmp_path / "train.json"), str(image_root), _coco_images(), COCO_CATEGORIES)
    test_json = write_coco_json(str(tmp_path / "test.json"), str(image_root), _coco_images()[:6], COCO_CATEGORIES,
                                write_images=False)
    return train_json, test_json, str(image_root)


def test_coco_json_images_each_train_one_stage(coco_source):
    train_json, test_json, image_root = coco_source
    train, class_names = load_coco_json(train_json, image_root)
    test, _ = load_coco_json(test_json, image_root)
    source = DatasetSource("coco_json", class_names, train, test, False)
    schedule = build_schedule(class_names, [2, 1, 1])
    assert shared_image_count(train, schedule) == 90
    per_stage = _registered_train_ids("test_exclusive_coco", source, schedule, ExclusiveStageImages(schedule, 7))
    _assert_one_stage_each(per_stage, source, schedule)
    assert {91, 92, 93} <= set(per_stage[2])  # eligible for stage 2 only
    other = _registered_train_ids("test_exclusive_coco", source, schedule, ExclusiveStageImages(schedule, 8))
    _assert_one_stage_each(other, source, schedule)
    assert other != per_stage


# ------------------------------------------------------------------------ the run


def _coco_cfg(coco_source, output_dir, *opts):
    train_json, test_json, image_root = coco_source
    return get_ilmil_cfg(None, [
        "ILMIL.DATASET", "coco_json", "ILMIL.STAGES", "2+1+1",
        "ILMIL.DATA.TRAIN_JSON", train_json, "ILMIL.DATA.TRAIN_IMAGES", image_root,
        "ILMIL.DATA.TEST_JSON", test_json, "ILMIL.DATA.TEST_IMAGES", image_root,
        "OUTPUT_DIR", str(output_dir), *opts])


def _train_counts(run):
    return [len(DatasetCatalog.get(train_name)) for train_name, _ in run.registered]


def test_a_run_logs_its_stage_images_and_records_the_rule(coco_source, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="ilmil"):
        standard = IncrementalRun(_coco_cfg(coco_source, tmp_path / "standard"))
    assert _train_counts(standard) == [90, 60, 33]
    assert "stage images (standard): 0: 90, 1: 60, 2: 33; 90 images are in 2+ stages" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ilmil"):
        exclusive = IncrementalRun(_coco_cfg(coco_source, tmp_path / "exclusive", "ILMIL.STAGE_IMAGES", "exclusive",
                                             "ILMIL.STAGE_IMAGES_SEED", 5))
    counts = _train_counts(exclusive)
    assert sum(counts) == 93
    listed = ", ".join(f"{k}: {n}" for k, n in enumerate(counts))
    assert f"stage images (exclusive, seed 5): {listed}; 90 images would otherwise be in 2+ stages" in caplog.text
    config = exclusive.identity()["config"]
    assert config["ILMIL.STAGE_IMAGES"] == "exclusive" and config["ILMIL.STAGE_IMAGES_SEED"] == 5
    assert standard.identity()["config"]["ILMIL.STAGE_IMAGES"] == "standard"


def _seed_giving_away(record, schedule):
    """A seed whose draw gives ``record`` to stage 0 (whatever else it holds)."""
    return next(s for s in range(100) if ExclusiveStageImages(schedule, s).stage_of(record) == 0)


def test_a_class_the_draw_leaves_without_boxes_is_named_with_the_seed_key(tmp_path, caplog):
    # "b" is only in image 1, with five "a" (stage 0); "c" has an image of its own.
    images = [_coco_image(1, [1] * 5 + [2]), _coco_image(2, [1]), _coco_image(3, [3])]
    train_json = write_coco_json(str(tmp_path / "train.json"), str(tmp_path / "images"), images,
                                 {1: "a", 2: "b", 3: "c"})
    train, class_names = load_coco_json(train_json, str(tmp_path / "images"))
    seed = _seed_giving_away(train[0], build_schedule(class_names, [1, 2]))
    with caplog.at_level(logging.WARNING, logger="ilmil"):
        IncrementalRun(_coco_cfg((train_json, train_json, str(tmp_path / "images")), tmp_path / "out",
                                 "ILMIL.STAGES", "1+2", "ILMIL.STAGE_IMAGES", "exclusive",
                                 "ILMIL.STAGE_IMAGES_SEED", seed))
    assert ("Stage 1: no training box of class(es) b; the model cannot learn them (ILMIL.STAGE_IMAGES exclusive "
            "gave the images of b to other stages: another ILMIL.STAGE_IMAGES_SEED may keep some)") in caplog.text


def test_a_stage_the_draw_leaves_without_images_is_refused(tmp_path):
    images = [_coco_image(1, [1] * 5 + [2]), _coco_image(2, [1])]
    train_json = write_coco_json(str(tmp_path / "train.json"), str(tmp_path / "images"), images, {1: "a", 2: "b"})
    train, class_names = load_coco_json(train_json, str(tmp_path / "images"))
    seed = _seed_giving_away(train[0], build_schedule(class_names, [1, 1]))
    cfg = _coco_cfg((train_json, train_json, str(tmp_path / "images")), tmp_path / "out", "ILMIL.STAGES", "1+1",
                    "ILMIL.STAGE_IMAGES", "exclusive", "ILMIL.STAGE_IMAGES_SEED", seed)
    with pytest.raises(RunValidationError, match=r"stage 1 \(b\): ILMIL.STAGE_IMAGES exclusive gave every training "
                                                 r"image of these classes to other stages: fix: another "
                                                 r"ILMIL.STAGE_IMAGES_SEED, or ILMIL.STAGE_IMAGES standard"):
        IncrementalRun(cfg)
