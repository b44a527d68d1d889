"""VOC-XML and COCO-json loading, built-in dataset names, validation and stage
registration, on small real folders written into tmp_path."""
import json
import logging
import os
import re

import pytest
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from ilmil.config import ConfigError, get_ilmil_cfg
from ilmil.data import (
    BUILTIN_DATASETS,
    VOC_CLASSES,
    DatasetError,
    DatasetSource,
    build_schedule,
    load_coco_json,
    load_dataset_source,
    load_voc_split,
    register_stage_datasets,
    shape_class_names,
    stage_test_dicts,
    stage_train_dicts,
)
from ilmil.data.datasets import validate_records
from conftest import TINY_SHAPES
from voc_coco_files import write_coco_json, write_voc_folder

# Three images, in VOC form (1-based inclusive boxes) ...
VOC_IMAGES = {
    "000001": (64, 48, [{"name": "dog", "box": (11, 21, 50, 40), "difficult": 0},
                        {"name": "cat", "box": (1, 1, 64, 48), "difficult": 1}]),
    "000002": (80, 60, [{"name": "person", "box": (5, 6, 30, 40)}]),  # no <difficult> tag
    "000003": (50, 50, [{"name": "dog", "box": (10, 10, 20, 20)},
                        {"name": "person", "box": (30, 31, 45, 50)}]),
}
VOC_SPLITS = {"trainval": ["000002", "000001"], "test": ["000003"]}
# ... the same boxes in 0-based (x0, y0, x1, y1): xmin 11 -> x0 10.0, xmax stays.
EXPECTED_BOXES = {
    "000001": [("dog", [10.0, 20.0, 50.0, 40.0]), ("cat", [0.0, 0.0, 64.0, 48.0])],
    "000002": [("person", [4.0, 5.0, 30.0, 40.0])],
    "000003": [("dog", [9.0, 9.0, 20.0, 20.0]), ("person", [29.0, 30.0, 45.0, 50.0])],
}
# ... and in COCO form (x, y, w, h), category ids deliberately not in name order.
COCO_CATEGORIES = {7: "person", 2: "dog", 5: "cat"}
COCO_IDS = {name: i for i, name in COCO_CATEGORIES.items()}


def _coco_images(file_ids):
    images = []
    for n, file_id in enumerate(file_ids, start=1):
        width, height, _ = VOC_IMAGES[file_id]
        anns = [{"category_id": COCO_IDS[name], "bbox": [x0, y0, x1 - x0, y1 - y0]}
                for name, (x0, y0, x1, y1) in EXPECTED_BOXES[file_id]]
        images.append((100 + n, f"{file_id}.jpg", width, height, anns))
    return images


@pytest.fixture
def voc_dir(tmp_path):
    return write_voc_folder(tmp_path / "voc", VOC_IMAGES, VOC_SPLITS)


@pytest.fixture
def coco_files(tmp_path):
    """(train json, test json, image folder) of the same images as ``voc_dir``."""
    images = tmp_path / "coco_images"
    train = write_coco_json(str(tmp_path / "ann" / "train.json"), str(images), _coco_images(["000002", "000001"]),
                            COCO_CATEGORIES)
    test = write_coco_json(str(tmp_path / "ann" / "test.json"), str(images), _coco_images(["000003"]),
                           COCO_CATEGORIES)
    return train, test, str(images)


def _voc_cfg(root, *opts):
    return get_ilmil_cfg(None, ["ILMIL.DATASET", "voc_folder", "ILMIL.DATA.ROOT", str(root), *opts])


def _coco_cfg(train_json, test_json, images, *opts):
    return get_ilmil_cfg(None, [
        "ILMIL.DATASET", "coco_json",
        "ILMIL.DATA.TRAIN_JSON", train_json, "ILMIL.DATA.TRAIN_IMAGES", images,
        "ILMIL.DATA.TEST_JSON", test_json, "ILMIL.DATA.TEST_IMAGES", images, *opts])


def _boxes(records):
    return {str(r["file_name"]).rsplit("/", 1)[-1][:-4]: [(a["category_name"], list(a["bbox"])) for a in r["annotations"]]
            for r in records}


# ----------------------------------------------------------------------- loaders


def test_voc_boxes_are_converted_from_1_based_to_0_based(voc_dir):
    records = load_voc_split(voc_dir, "trainval")
    assert _boxes(records) == {k: EXPECTED_BOXES[k] for k in ("000001", "000002")}
    dog = records[1]["annotations"][0]
    assert dog["bbox"][0] == 10.0 and isinstance(dog["bbox"][0], float)  # xmin 11 -> x0 10.0
    assert all(a["bbox_mode"] == BoxMode.XYXY_ABS for r in records for a in r["annotations"])


def test_voc_records_follow_the_split_file(voc_dir):
    records = load_voc_split(voc_dir, "trainval")
    assert [r["image_id"] for r in records] == ["000002", "000001"]
    first = records[0]
    assert first["file_name"] == os.path.join(voc_dir, "JPEGImages", "000002.jpg")
    assert first["annotation_file"] == os.path.join(voc_dir, "Annotations", "000002.xml")
    assert (first["width"], first["height"]) == (80, 60)
    assert (records[1]["width"], records[1]["height"]) == (64, 48)
    assert [r["image_id"] for r in load_voc_split(voc_dir, "test")] == ["000003"]


def test_voc_difficult_flag_is_read_and_defaults_to_zero(voc_dir):
    by_id = {r["image_id"]: r for r in load_voc_split(voc_dir, "trainval")}
    assert [a["difficult"] for a in by_id["000001"]["annotations"]] == [0, 1]
    assert [a["difficult"] for a in by_id["000002"]["annotations"]] == [0]


def test_coco_boxes_become_xyxy_and_classes_follow_category_ids(coco_files):
    train_json, _, images = coco_files
    records, class_names = load_coco_json(train_json, images)
    assert class_names == ("dog", "cat", "person")  # sorted by id: 2, 5, 7
    assert _boxes(records) == {k: EXPECTED_BOXES[k] for k in ("000001", "000002")}
    first = records[0]
    assert first["image_id"] == 101
    assert first["file_name"] == os.path.join(images, "000002.jpg")
    assert (first["width"], first["height"]) == (80, 60)
    assert first["annotation_file"] == train_json
    assert all(a["bbox_mode"] == BoxMode.XYXY_ABS and a["iscrowd"] == 0 for r in records for a in r["annotations"])


def test_voc_and_coco_loaders_give_the_same_boxes(voc_dir, coco_files):
    _, test_json, images = coco_files
    voc = load_voc_split(voc_dir, "test")
    coco, _ = load_coco_json(test_json, images)
    assert _boxes(voc) == _boxes(coco) == {"000003": EXPECTED_BOXES["000003"]}
    assert [(r["width"], r["height"]) for r in voc] == [(r["width"], r["height"]) for r in coco]


def test_shapes_dataset_reads_the_same_from_its_voc_and_coco_files(tiny_shapes_dir):
    voc = load_voc_split(tiny_shapes_dir, "test")
    coco, class_names = load_coco_json(os.path.join(tiny_shapes_dir, "annotations", "instances_test.json"),
                                       os.path.join(tiny_shapes_dir, "JPEGImages"))
    assert class_names == tuple(shape_class_names(20))
    assert len(voc) == len(coco) == 8
    for v, c in zip(voc, coco):
        assert v["file_name"] == c["file_name"] and os.path.isfile(v["file_name"])
        assert (v["width"], v["height"]) == (c["width"], c["height"]) == (128, 128)
        assert [(a["category_name"], a["bbox"]) for a in v["annotations"]] == \
            [(a["category_name"], a["bbox"]) for a in c["annotations"]]


# ----------------------------------------------------------- load_dataset_source


def test_voc_folder_loads_with_sorted_class_names(voc_dir):
    source = load_dataset_source(_voc_cfg(voc_dir))
    assert isinstance(source, DatasetSource)
    assert source.class_names == ("cat", "dog", "person")  # not the files' order: person, dog, cat
    assert [r["image_id"] for r in source.train] == ["000002", "000001"]
    assert [r["image_id"] for r in source.test] == ["000003"]
    assert source.is_voc is True


def test_coco_json_loads(coco_files):
    source = load_dataset_source(_coco_cfg(*coco_files))
    assert source.class_names == ("dog", "cat", "person")
    assert len(source.train) == 2 and len(source.test) == 1
    assert source.is_voc is False


def _bad_voc(tmp_path, problem):
    """The VOC folder with one bad annotation (or image) in 000001 (trainval)."""
    images = {k: (w, h, [dict(o) for o in objs]) for k, (w, h, objs) in VOC_IMAGES.items()}
    objects = images["000001"][2]
    if problem == "outside":
        objects[0]["box"] = (11, 21, 70, 40)  # the image is 64 wide
    elif problem == "zero_area":
        objects[0]["box"] = (11, 21, 10, 40)  # x0 10, x1 10
    elif problem == "unknown_class":
        images["000003"][2][0]["name"] = "dgo"  # test split: a class no training file has
    root = write_voc_folder(tmp_path / problem, images, VOC_SPLITS)
    if problem == "missing_image":
        os.remove(os.path.join(root, "JPEGImages", "000001.jpg"))
    return root


@pytest.mark.parametrize(
    "problem, bad_file, detail",
    [
        ("outside", "000001.xml", "outside the 64x48 image"),
        ("zero_area", "000001.xml", "zero or negative area"),
        ("unknown_class", "000003.xml", "unknown class 'dgo'"),
        ("missing_image", "000001.xml", "image file missing"),
    ],
)
def test_malformed_voc_data_names_the_file_and_the_fix(tmp_path, problem, bad_file, detail):
    root = _bad_voc(tmp_path, problem)
    with pytest.raises(DatasetError) as info:
        load_dataset_source(_voc_cfg(root))
    message = str(info.value)
    assert os.path.join(root, "Annotations", bad_file) in message
    assert detail in message
    assert "ILMIL.DATA.SKIP_BAD_ANNOTATIONS True" in message
    if problem == "missing_image":
        assert os.path.join(root, "JPEGImages", "000001.jpg") in message


def test_all_problems_are_reported_in_one_error(tmp_path):
    images = {k: (w, h, [dict(o) for o in objs]) for k, (w, h, objs) in VOC_IMAGES.items()}
    images["000001"][2][0]["box"] = (11, 21, 70, 40)  # outside
    images["000002"][2][0]["box"] = (5, 6, 4, 40)  # zero area
    images["000003"][2][1]["name"] = "persn"  # unknown (test split)
    root = write_voc_folder(tmp_path / "voc", images, VOC_SPLITS)
    with pytest.raises(DatasetError) as info:
        load_dataset_source(_voc_cfg(root))
    message = str(info.value)
    # Both splits are checked before anything is reported.
    assert "3 malformed annotation(s) or image(s)" in message
    assert "000001.xml" in message and "000002.xml" in message and "000003.xml" in message
    assert "outside" in message and "zero or negative area" in message and "'persn'" in message


def test_skip_bad_annotations_drops_the_bad_and_keeps_the_good(tmp_path):
    images = {k: (w, h, [dict(o) for o in objs]) for k, (w, h, objs) in VOC_IMAGES.items()}
    images["000001"][2][0]["box"] = (11, 21, 70, 40)  # outside: dropped
    images["000003"][2][1]["name"] = "persn"  # unknown: dropped
    root = write_voc_folder(tmp_path / "voc", images, VOC_SPLITS)
    os.remove(os.path.join(root, "JPEGImages", "000002.jpg"))  # image dropped
    source = load_dataset_source(_voc_cfg(root, "ILMIL.DATA.SKIP_BAD_ANNOTATIONS", True))
    assert [r["image_id"] for r in source.train] == ["000001"]
    assert _boxes(source.train) == {"000001": [("cat", [0.0, 0.0, 64.0, 48.0])]}
    assert _boxes(source.test) == {"000003": [("dog", [9.0, 9.0, 20.0, 20.0])]}


def _bad_coco(tmp_path, problem):
    images = _coco_images(["000002", "000001"])
    first_ann = images[1][4][0]
    if problem == "outside":
        first_ann["bbox"] = [10.0, 20.0, 60.0, 20.0]  # x1 70 > width 64
    elif problem == "zero_area":
        first_ann["bbox"] = [10.0, 20.0, 0.0, 20.0]
    elif problem == "unknown_category":
        first_ann["category_id"] = 99
    image_root = str(tmp_path / problem / "images")
    train = write_coco_json(str(tmp_path / problem / "train.json"), image_root, images, COCO_CATEGORIES)
    test = write_coco_json(str(tmp_path / problem / "test.json"), image_root, _coco_images(["000003"]),
                           COCO_CATEGORIES)
    if problem == "missing_image":
        os.remove(os.path.join(image_root, "000001.jpg"))
    return train, test, image_root


@pytest.mark.parametrize(
    "problem, detail",
    [
        ("outside", "outside the 64x48 image"),
        ("zero_area", "zero or negative area"),
        ("unknown_category", "99"),
        ("missing_image", "image file missing"),
    ],
)
def test_malformed_coco_data_names_the_file_and_the_fix(tmp_path, problem, detail):
    train, test, images = _bad_coco(tmp_path, problem)
    with pytest.raises(DatasetError) as info:
        load_dataset_source(_coco_cfg(train, test, images))
    message = str(info.value)
    assert train in message and detail in message
    assert "ILMIL.DATA.SKIP_BAD_ANNOTATIONS True" in message
    if problem != "missing_image":
        assert "annotation id 2" in message  # the second annotation of the json


def test_coco_skip_bad_annotations_keeps_the_good_ones(tmp_path):
    train, test, images = _bad_coco(tmp_path, "unknown_category")
    source = load_dataset_source(_coco_cfg(train, test, images, "ILMIL.DATA.SKIP_BAD_ANNOTATIONS", True))
    assert _boxes(source.train) == {"000002": EXPECTED_BOXES["000002"], "000001": [EXPECTED_BOXES["000001"][1]]}


def test_coco_test_categories_must_match_train(tmp_path, coco_files):
    train, _, images = coco_files
    other = write_coco_json(str(tmp_path / "other.json"), images, _coco_images(["000003"]),
                            {2: "dog", 5: "cat", 7: "person", 8: "horse"}, write_images=False)
    with pytest.raises(DatasetError, match=re.escape("categories differ from those of") + ".*"
                       + re.escape("(not in the train json: horse); fix: give both files the same")):
        load_dataset_source(_coco_cfg(train, other, images))
    swapped = write_coco_json(str(tmp_path / "swapped.json"), images, _coco_images(["000003"]),
                              {2: "cat", 5: "dog", 7: "person"}, write_images=False)
    with pytest.raises(DatasetError, match=re.escape("(the same names in another id order)")):
        load_dataset_source(_coco_cfg(train, swapped, images))


def test_coco_flags_and_ids_of_other_exporters_load(tmp_path, coco_files):
    # iscrowd as a JSON boolean; string ids for images and categories alike.
    train, _, images = coco_files
    with open(train) as f:
        data = json.load(f)
    for ann in data["annotations"]:
        ann["iscrowd"], ann["image_id"], ann["category_id"] = False, f"img{ann['image_id']}", str(ann["category_id"])
    for image in data["images"]:
        image["id"] = f"img{image['id']}"
    for category in data["categories"]:
        category["id"] = str(category["id"])
    other = tmp_path / "other.json"
    other.write_text(json.dumps(data))
    records, classes = load_coco_json(str(other), images)
    expected_records, _ = load_coco_json(train, images)
    assert _boxes(records) == _boxes(expected_records) and all(
        a["iscrowd"] == 0 for r in records for a in r["annotations"])
    assert classes == ("dog", "cat", "person")  # string ids "2" < "5" < "7": the same order here


@pytest.mark.parametrize("field", ["id", "file_name"])
def test_an_image_listed_twice_is_refused_naming_both_entries(tmp_path, coco_files, field):
    # A second entry of one id took the first's boxes; a file listed twice was scored once without its boxes.
    train, _, images = coco_files
    with open(train) as f:
        data = json.load(f)
    data["images"][1][field] = data["images"][0][field]
    bad = tmp_path / "twice.json"
    bad.write_text(json.dumps(data))
    value = data["images"][0][field]
    with pytest.raises(DatasetError, match=re.escape(f"{bad}: images[0] and images[1] share the {field} {value!r}; "
                                                     "fix: list each image once")):
        load_coco_json(str(bad), images)


def test_annotations_of_unknown_images_are_listed_together_with_the_fix(tmp_path, coco_files):
    train, _, images = coco_files
    with open(train) as f:
        data = json.load(f)
    data["annotations"][0]["image_id"], data["annotations"][1]["image_id"] = 9, 8
    bad = tmp_path / "orphans.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=re.escape(f"{bad}: 2 annotation(s) refer to an image_id no image has "
                                                     "(id 1 -> image_id 9, id 2 -> image_id 8); fix: ")):
        load_coco_json(str(bad), images)


def test_a_byte_order_mark_is_read_past(tmp_path, voc_dir, coco_files):
    train, _, images = coco_files
    with_bom = tmp_path / "bom.json"
    with_bom.write_bytes(b"\xef\xbb\xbf" + open(train, "rb").read())
    (records, classes), (expected_records, expected_classes) = load_coco_json(str(with_bom), images), load_coco_json(
        train, images)
    assert classes == expected_classes and _boxes(records) == _boxes(expected_records)
    split = os.path.join(voc_dir, "ImageSets", "Main", "trainval.txt")
    expected = _boxes(load_voc_split(voc_dir, "trainval"))
    with open(split, "rb") as f:
        text = f.read()
    with open(split, "wb") as f:
        f.write(b"\xef\xbb\xbf" + text)
    assert _boxes(load_voc_split(voc_dir, "trainval")) == expected


def test_missing_voc_annotation_files_are_listed_together(voc_dir):
    for file_id in ("000001", "000002"):
        os.remove(os.path.join(voc_dir, "Annotations", f"{file_id}.xml"))
    split = os.path.join(voc_dir, "ImageSets", "Main", "trainval.txt")
    annotations = os.path.join(voc_dir, "Annotations")
    with pytest.raises(DatasetError, match=re.escape(f"{split}: 2 listed image(s) have no annotation file "
                                                     f"({annotations}/000002.xml, {annotations}/000001.xml); "
                                                     "fix: add them, or remove their ids")):
        load_voc_split(voc_dir, "trainval")


def test_a_voc_xml_copied_from_another_image_keeps_its_own_image(voc_dir):
    # 000002.xml names 000001.jpg (copied by a renaming script): the image of id 000002 is still 000002.jpg.
    _rewrite(os.path.join(voc_dir, "Annotations", "000002.xml"), "<filename>000002.jpg</filename>",
             "<filename>000001.jpg</filename>")
    files = {r["image_id"]: os.path.basename(r["file_name"]) for r in load_voc_split(voc_dir, "trainval")}
    assert files == {"000001": "000001.jpg", "000002": "000002.jpg"}


def test_a_voc_image_of_another_extension_is_found_through_its_xml_filename(voc_dir):
    jpeg = os.path.join(voc_dir, "JPEGImages", "000002.jpg")
    Image.open(jpeg).save(jpeg[:-4] + ".png")
    os.remove(jpeg)
    _rewrite(os.path.join(voc_dir, "Annotations", "000002.xml"), "<filename>000002.jpg</filename>",
             "<filename>000002.png</filename>")
    source = load_dataset_source(_voc_cfg(voc_dir))
    assert jpeg[:-4] + ".png" in [r["file_name"] for r in source.train]


def test_voc_object_names_that_differ_only_in_case_are_warned_of(tmp_path, caplog):
    images = {"a": (40, 30, [{"name": "cat", "box": (3, 4, 20, 25)}]),
              "b": (40, 30, [{"name": "Cat", "box": (3, 4, 20, 25)}])}
    root = write_voc_folder(tmp_path / "voc", images, {"trainval": ["a", "b"], "test": ["a"]})
    with caplog.at_level(logging.WARNING):
        source = load_dataset_source(_voc_cfg(root))
    assert source.class_names == ("Cat", "cat")
    assert "object names 'Cat', 'cat' differ only in case and are 2 classes" in caplog.text


@pytest.mark.parametrize("orientation, json_size, problem", [
    (6, (64, 48), "fields 'width', 'height' say 64x48, but image file {} is 48x64 once turned as its EXIF "
                  "orientation says"),
    (6, (48, 64), None),  # the size of the turned image, as the loader reads it
    (1, (64, 48), None),
])
@pytest.mark.parametrize("check_images", [True, False])  # without the decoding too: the size is in the header
@pytest.mark.parametrize("suffix", [".jpg", ".png"])  # a PNG's EXIF read without decoding it too
def test_an_image_turned_by_its_exif_orientation_is_checked_at_its_turned_size(tmp_path, orientation, json_size,
                                                                               problem, check_images, suffix):
    path = tmp_path / "images" / f"a{suffix}"
    path.parent.mkdir()
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.new("RGB", (64, 48), (90, 120, 200)).save(path, exif=exif)
    record = {"file_name": str(path), "width": json_size[0], "height": json_size[1], "annotations": [],
              "annotation_file": "train.json"}
    _, problems = validate_records([record], ("dog",), "train", check_images=check_images)
    assert problems == ([] if problem is None else [f"train.json: {problem.format(path)}"])


def test_unknown_dataset_name_lists_the_valid_names():
    with pytest.raises(DatasetError) as info:
        load_dataset_source(get_ilmil_cfg(None, ["ILMIL.DATASET", "voc2007"]))
    message = str(info.value)
    assert "'voc2007'" in message
    for name in BUILTIN_DATASETS:
        assert name in message


@pytest.mark.parametrize("dataset, key", [("voc_folder", "ROOT"), ("coco_json", "TRAIN_JSON")])
def test_custom_dataset_without_its_path_key_names_the_key(dataset, key):
    with pytest.raises(DatasetError, match=f"ILMIL.DATA.{key}"):
        load_dataset_source(get_ilmil_cfg(None, ["ILMIL.DATASET", dataset]))


def test_missing_split_file_is_named(voc_dir):
    with pytest.raises(DatasetError) as info:
        load_dataset_source(_voc_cfg(voc_dir, "ILMIL.DATA.TRAIN_SPLIT", "train"))
    assert os.path.join(voc_dir, "ImageSets", "Main", "train.txt") in str(info.value)


def test_missing_voc_image_folder_is_named(voc_dir):
    os.rename(os.path.join(voc_dir, "JPEGImages"), os.path.join(voc_dir, "images"))
    with pytest.raises(DatasetError) as info:
        load_voc_split(voc_dir, "trainval")
    assert os.path.join(voc_dir, "JPEGImages") in str(info.value)


def test_missing_voc_annotation_file_is_named(voc_dir):
    os.remove(os.path.join(voc_dir, "Annotations", "000001.xml"))
    with pytest.raises(DatasetError) as info:
        load_voc_split(voc_dir, "trainval")
    assert os.path.join(voc_dir, "Annotations", "000001.xml") in str(info.value)


def test_missing_voc_root_is_named(tmp_path):
    with pytest.raises(DatasetError) as info:
        load_dataset_source(_voc_cfg(tmp_path / "no_such_voc"))
    assert str(tmp_path / "no_such_voc") in str(info.value)


def test_missing_coco_json_and_image_folder_are_named(tmp_path, coco_files):
    train, test, images = coco_files
    missing_json = str(tmp_path / "ann" / "nope.json")
    with pytest.raises(DatasetError) as info:
        load_dataset_source(_coco_cfg(missing_json, test, images))
    assert missing_json in str(info.value)
    missing_images = str(tmp_path / "no_images")
    with pytest.raises(DatasetError) as info:
        load_coco_json(train, missing_images)
    assert missing_images in str(info.value)


def test_invalid_voc_xml_is_named(voc_dir):
    xml_file = os.path.join(voc_dir, "Annotations", "000002.xml")
    with open(xml_file, "w") as f:
        f.write("<annotation><size>")
    with pytest.raises(DatasetError, match="not valid XML") as info:
        load_voc_split(voc_dir, "trainval")
    assert xml_file in str(info.value)


def _rewrite(path, old, new):
    with open(path) as f:
        text = f.read()
    assert old in text
    with open(path, "w") as f:
        f.write(text.replace(old, new, 1))


def test_an_image_id_listed_twice_in_a_voc_split_file_is_refused(voc_dir):
    # Its second record would be scored without the boxes the first one's detections take.
    split_file = os.path.join(voc_dir, "ImageSets", "Main", "trainval.txt")
    with open(split_file, "a") as f:
        f.write("\n000002 1\n")
    with pytest.raises(DatasetError, match=re.escape(f"{split_file}: lines 1 and 4 both list '000002'; fix: list")):
        load_voc_split(voc_dir, "trainval")


def test_a_voc_id_with_spaces_is_read_whole_and_a_flag_after_an_id_is_not(voc_dir):
    for ext, folder in (("xml", "Annotations"), ("jpg", "JPEGImages")):
        os.rename(os.path.join(voc_dir, folder, f"000001.{ext}"), os.path.join(voc_dir, folder, f"my image 1.{ext}"))
    with open(os.path.join(voc_dir, "ImageSets", "Main", "trainval.txt"), "w") as f:
        f.write("000002  -1\nmy image 1\nmy image 1\t0\n")
    with pytest.raises(DatasetError, match="lines 2 and 3 both list 'my image 1'"):  # the id, with or without a flag
        load_voc_split(voc_dir, "trainval")
    with open(os.path.join(voc_dir, "ImageSets", "Main", "trainval.txt"), "w") as f:
        f.write("000002  -1\nmy image 1\n")
    records = load_voc_split(voc_dir, "trainval")
    assert [r["image_id"] for r in records] == ["000002", "my image 1"]
    assert records[1]["file_name"] == os.path.join(voc_dir, "JPEGImages", "my image 1.jpg")
    with open(os.path.join(voc_dir, "ImageSets", "Main", "trainval.txt"), "w") as f:
        f.write("my imagex\n")  # a typo is named whole
    with pytest.raises(DatasetError, match=re.escape(os.path.join(voc_dir, "Annotations", "my imagex.xml"))):
        load_voc_split(voc_dir, "trainval")


def test_voc_whole_numbers_written_as_floats_are_read_and_fractions_refused(voc_dir):
    xml_file = os.path.join(voc_dir, "Annotations", "000002.xml")
    _rewrite(xml_file, "<width>80<", "<width>80.0<")
    assert load_voc_split(voc_dir, "trainval")[0]["width"] == 80
    _rewrite(xml_file, "<width>80.0<", "<width>80.5<")
    with pytest.raises(DatasetError, match=re.escape(f"{xml_file}: field <width> '80.5' is not a whole number")):
        load_voc_split(voc_dir, "trainval")


def test_a_box_problem_quotes_the_box_as_the_file_writes_it(tmp_path, coco_files):
    images = {k: (w, h, [dict(o) for o in objs]) for k, (w, h, objs) in VOC_IMAGES.items()}
    images["000001"][2][0]["box"] = (0, 21, 30, 40)  # xmin 0: VOC's pixels start at 1
    root = write_voc_folder(tmp_path / "voc", images, VOC_SPLITS)
    with pytest.raises(DatasetError) as info:
        load_dataset_source(_voc_cfg(root))
    assert ("000001.xml object 'dog': field <xmin> 0 <ymin> 21 <xmax> 30 <ymax> 40 (VOC pixels, from 1) lies "
            "outside the 64x48 image") in str(info.value)
    # A COCO annotation without an id is named by its place in the file, with its own bbox.
    train, test, image_root = coco_files
    with open(train) as f:
        data = json.load(f)
    del data["annotations"][1]["id"]
    data["annotations"][1]["bbox"] = [5, 5, 0, 20]
    with open(train, "w") as f:
        json.dump(data, f)
    with pytest.raises(DatasetError) as info:
        load_dataset_source(_coco_cfg(train, test, image_root))
    assert (f"{train} annotations[1]: field 'bbox' [5, 5, 0, 20] (x, y, width, height) has zero or negative "
            "area") in str(info.value)


def test_a_test_split_without_an_image_is_refused_before_anything_trains(tmp_path, coco_files, voc_dir):
    train, test, images = coco_files
    write_coco_json(test, images, [], COCO_CATEGORIES)
    with pytest.raises(DatasetError, match=re.escape(f"{test}: no test image; fix: list the test images")):
        load_dataset_source(_coco_cfg(train, test, images))
    # Its images all missing, skipped as unusable: refused too, naming them and the training data's problems.
    os.remove(os.path.join(voc_dir, "JPEGImages", "000003.jpg"))
    _rewrite(os.path.join(voc_dir, "Annotations", "000002.xml"), "<xmax>30<", "<xmax>3<")
    with pytest.raises(DatasetError) as info:
        load_dataset_source(_voc_cfg(voc_dir, "ILMIL.DATA.SKIP_BAD_ANNOTATIONS", True))
    message = str(info.value)
    assert message.startswith(f"{os.path.join(voc_dir, 'ImageSets', 'Main', 'test.txt')}: none of its 1 test images")
    assert "000003.jpg" in message and "000002.xml object 'person'" in message


def test_the_test_split_alone_needs_no_training_image(voc_dir):
    for file_id in ("000001", "000002"):
        os.remove(os.path.join(voc_dir, "JPEGImages", f"{file_id}.jpg"))
    source = load_dataset_source(_voc_cfg(voc_dir), splits=("test",))
    assert source.train == [] and [r["image_id"] for r in source.test] == ["000003"]
    assert source.class_names == ("cat", "dog", "person")  # still the training files' names
    with pytest.raises(DatasetError, match="image file missing"):
        load_dataset_source(_voc_cfg(voc_dir))


def test_the_coco_test_split_alone_needs_no_training_image_folder(coco_files, tmp_path):
    train, test, images = coco_files
    elsewhere = str(tmp_path / "train_images_not_here")
    cfg = get_ilmil_cfg(None, ["ILMIL.DATASET", "coco_json", "ILMIL.DATA.TRAIN_JSON", train,
                               "ILMIL.DATA.TRAIN_IMAGES", elsewhere, "ILMIL.DATA.TEST_JSON", test,
                               "ILMIL.DATA.TEST_IMAGES", images])
    source = load_dataset_source(cfg, splits=("test",))
    assert source.train == [] and len(source.test) == 1 and source.class_names == ("dog", "cat", "person")
    with pytest.raises(DatasetError, match=re.escape(f"COCO image folder not found: {elsewhere}")):
        load_dataset_source(cfg)


def test_a_voc_split_file_not_in_utf8_is_named(voc_dir):
    split_file = os.path.join(voc_dir, "ImageSets", "Main", "test.txt")
    with open(split_file, "wb") as f:
        f.write("caf\xe9\n".encode("latin-1"))
    with pytest.raises(DatasetError, match=re.escape(f"{split_file}: not UTF-8 text (") + ".*fix: save it as UTF-8"):
        load_voc_split(voc_dir, "test")


@pytest.mark.parametrize("num_classes", [-3, 100])
def test_a_shapes_class_count_out_of_range_is_named(num_classes):
    cfg = get_ilmil_cfg(None, ["ILMIL.SHAPES.NUM_CLASSES", num_classes, "ILMIL.STAGES", "10+10"])
    with pytest.raises(ConfigError, match=re.escape(f"ILMIL.SHAPES.NUM_CLASSES {num_classes}: the shapes dataset "
                                                    "has 1 to 80 classes")):
        load_dataset_source(cfg)


@pytest.mark.parametrize("old, new, message", [
    ("</name>", "</name><difficult>yes</difficult>", "field <difficult> 'yes' is not a number"),
    ("<name>person</name>", "<name> </name>", "empty field <name>; fix: give its value"),  # not a class named ""
])
def test_a_voc_field_of_a_wrong_value_is_named(voc_dir, old, new, message):
    xml_file = os.path.join(voc_dir, "Annotations", "000002.xml")
    _rewrite(xml_file, old, new)
    with pytest.raises(DatasetError, match=re.escape(f"{xml_file}: {message}")):
        load_voc_split(voc_dir, "trainval")


@pytest.mark.parametrize("field, value, detail", [
    ("bbox", [1.0, 2.0, 3.0], "annotations[0] field 'bbox' [1.0, 2.0, 3.0] is not a list of 4 numbers"),
    ("bbox", ["1", "2", "3", "4"], "annotations[0] field 'bbox' ['1', '2', '3', '4'] is not a list of 4 numbers"),
    ("width", "64", "images[0] field 'width' '64' is not an integer"),
    ("images.id", [101], "images[0] field 'id' [101] is not an integer or a string"),
    ("categories.id", "2", "the categories' ids mix integers and strings, which have no order; fix: give every"),
    ("categories.id", [2], "categories[0] field 'id' [2] is not an integer or a string"),
    ("categories.name", 2, "categories[0] field 'name' 2 is not a string"),
    ("iscrowd", "0", "annotations[0] field 'iscrowd' '0' is not 0 or 1"),
])
def test_coco_fields_of_the_wrong_kind_are_named(tmp_path, coco_files, field, value, detail):
    train, _, images = coco_files
    with open(train) as f:
        data = json.load(f)
    section, field = field.split(".") if "." in field else ("annotations" if field in ("bbox", "iscrowd")
                                                            else "images", field)
    data[section][0][field] = value
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=re.escape(f"{bad}: {detail}")):
        load_coco_json(str(bad), images)
    with pytest.raises(DatasetError, match=re.escape(f"COCO annotation file {tmp_path} is a folder")):
        load_coco_json(str(tmp_path), images)


# ----------------------------------------------------------------- built-in names


def _voc_year(root, year, names_by_split, class_name="dog"):
    images, splits = {}, {}
    for split, ids in names_by_split.items():
        splits[split] = ids
        for file_id in ids:
            images[file_id] = (40, 30, [{"name": class_name, "box": (3, 4, 20, 25)}])
    return write_voc_folder(os.path.join(root, f"VOC{year}"), images, splits)


@pytest.fixture
def voc_datasets_root(tmp_path, monkeypatch):
    """$ILMIL_DATASETS with tiny VOC2007 and VOC2012 folders."""
    root = tmp_path / "datasets"
    _voc_year(root, 2007, {"trainval": ["000005", "000007"], "test": ["000001"]})
    _voc_year(root, 2012, {"train": ["2008_000002"], "val": ["2008_000008"],
                           "trainval": ["2008_000002", "2008_000008"]})
    monkeypatch.setenv("ILMIL_DATASETS", str(root))
    return root


def test_voc_2007_resolves_under_the_datasets_root(voc_datasets_root):
    source = load_dataset_source(get_ilmil_cfg(None, ["ILMIL.DATASET", "voc_2007"]))
    assert source.class_names == VOC_CLASSES
    assert [r["image_id"] for r in source.train] == ["000005", "000007"]
    assert [r["image_id"] for r in source.test] == ["000001"]
    assert source.train[0]["file_name"] == os.path.join(str(voc_datasets_root), "VOC2007", "JPEGImages",
                                                        "000005.jpg")
    assert source.is_voc is True


def test_voc_2012_tests_on_val(voc_datasets_root):
    source = load_dataset_source(get_ilmil_cfg(None, ["ILMIL.DATASET", "voc_2012"]))
    assert [r["image_id"] for r in source.train] == ["2008_000002"]
    assert [r["image_id"] for r in source.test] == ["2008_000008"]


def test_voc_07_12_trains_on_both_trainvals_and_tests_on_2007(voc_datasets_root):
    source = load_dataset_source(get_ilmil_cfg(None, ["ILMIL.DATASET", "voc_07_12"]))
    assert [r["image_id"] for r in source.train] == ["000005", "000007", "2008_000002", "2008_000008"]
    assert [r["image_id"] for r in source.test] == ["000001"]


def test_builtin_voc_rejects_a_non_voc_class_name(tmp_path, monkeypatch):
    root = tmp_path / "datasets"
    voc = _voc_year(root, 2007, {"trainval": ["000005"], "test": ["000001"]}, class_name="doggo")
    monkeypatch.setenv("ILMIL_DATASETS", str(root))
    with pytest.raises(DatasetError) as info:
        load_dataset_source(get_ilmil_cfg(None, ["ILMIL.DATASET", "voc_2007"]))
    message = str(info.value)
    assert "unknown class 'doggo'" in message
    assert os.path.join(voc, "Annotations", "000005.xml") in message


def test_missing_builtin_voc_folder_names_the_path(tmp_path, monkeypatch):
    monkeypatch.setenv("ILMIL_DATASETS", str(tmp_path / "empty"))
    with pytest.raises(DatasetError) as info:
        load_dataset_source(get_ilmil_cfg(None, ["ILMIL.DATASET", "voc_2007"]))
    assert os.path.join(str(tmp_path / "empty"), "VOC2007") in str(info.value)


def test_coco_2017_resolves_under_the_datasets_root(tmp_path, monkeypatch):
    coco = tmp_path / "datasets" / "coco"
    write_coco_json(str(coco / "annotations" / "instances_train2017.json"), str(coco / "train2017"),
                    _coco_images(["000001", "000002"]), COCO_CATEGORIES)
    write_coco_json(str(coco / "annotations" / "instances_val2017.json"), str(coco / "val2017"),
                    _coco_images(["000003"]), COCO_CATEGORIES)
    monkeypatch.setenv("ILMIL_DATASETS", str(tmp_path / "datasets"))
    source = load_dataset_source(get_ilmil_cfg(None, ["ILMIL.DATASET", "coco_2017"]))
    assert source.class_names == ("dog", "cat", "person")
    assert len(source.train) == 2 and len(source.test) == 1
    assert source.test[0]["file_name"] == str(coco / "val2017" / "000003.jpg")


def test_shapes_resolves_to_the_cached_set_under_the_datasets_root(tiny_datasets_root, tiny_shapes_dir,
                                                                   monkeypatch):
    monkeypatch.setenv("ILMIL_DATASETS", str(tiny_datasets_root))
    cfg = get_ilmil_cfg(None, ["ILMIL.SHAPES.NUM_CLASSES", 20, "ILMIL.SHAPES.NUM_TRAIN", 24,
                               "ILMIL.SHAPES.NUM_TEST", 8, "ILMIL.SHAPES.IMAGE_SIZE", 128, "ILMIL.SHAPES.SEED", TINY_SHAPES["seed"]])
    before = os.path.getmtime(os.path.join(tiny_shapes_dir, "meta.json"))
    source = load_dataset_source(cfg)
    assert os.path.getmtime(os.path.join(tiny_shapes_dir, "meta.json")) == before  # not regenerated
    assert source.class_names == tuple(shape_class_names(20))
    assert len(source.train) == 24 and len(source.test) == 8
    assert all(r["file_name"].startswith(tiny_shapes_dir) for r in source.train)


# ------------------------------------------------------------------- registration


@pytest.fixture
def registered_names():
    names = []
    yield names
    for name in names:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


def test_registered_stage_datasets_carry_the_seen_classes(voc_dir, registered_names):
    source = load_dataset_source(_voc_cfg(voc_dir))
    schedule = build_schedule(("person", "dog", "cat"), [1, 2])  # a custom class order
    for stage in schedule:
        train_name, test_name = register_stage_datasets("test_reg", source, stage)
        registered_names += [train_name, test_name]
        assert (train_name, test_name) == (f"test_reg_stage{stage.index}_train", f"test_reg_stage{stage.index}_test")
        for name in (train_name, test_name):
            meta = MetadataCatalog.get(name)
            assert meta.thing_classes == list(stage.seen_classes)
            assert meta.old_classes == list(stage.old_classes)
            assert meta.new_classes == list(stage.new_classes)
            assert meta.is_voc is True
        assert DatasetCatalog.get(train_name) == stage_train_dicts(source.train, stage)
        assert DatasetCatalog.get(test_name) == stage_test_dicts(source.test, stage)
    assert MetadataCatalog.get("test_reg_stage1_train").thing_classes == ["person", "dog", "cat"]
    # stage 1 (dog, cat) trains on 000001 only: 000002 holds only a person
    assert [r["image_id"] for r in DatasetCatalog.get("test_reg_stage1_train")] == ["000001"]


def test_registering_again_replaces_the_stage_datasets(voc_dir, coco_files, registered_names):
    voc = load_dataset_source(_voc_cfg(voc_dir))
    coco = load_dataset_source(_coco_cfg(*coco_files))
    train_name, test_name = register_stage_datasets("test_rereg", voc, build_schedule(voc.class_names, [3])[0])
    registered_names += [train_name, test_name]
    stage = build_schedule(coco.class_names, [2])[0]
    assert register_stage_datasets("test_rereg", coco, stage) == (train_name, test_name)
    assert MetadataCatalog.get(train_name).thing_classes == ["dog", "cat"]
    assert MetadataCatalog.get(test_name).is_voc is False
    assert DatasetCatalog.get(train_name) == stage_train_dicts(coco.train, stage)



def test_loader_errors_point_to_the_layout_readme_which_describes_both_layouts(tmp_path):
    from conftest import REPO_ROOT

    with pytest.raises(DatasetError, match=re.escape("(datasets/README.md)")):
        load_voc_split(str(tmp_path), "trainval")  # no VOC layout here
    with pytest.raises(DatasetError, match=re.escape("(datasets/README.md)")):
        load_coco_json(str(tmp_path / "instances_train.json"), str(tmp_path))
    with open(os.path.join(REPO_ROOT, "datasets", "README.md")) as f:
        layouts = f.read()
    assert "Annotations/" in layouts and "JPEGImages/" in layouts and "ImageSets/Main/" in layouts
    assert "instances_" in layouts
