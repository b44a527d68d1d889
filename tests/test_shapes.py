"""Tests of the embedded shapes dataset generator (small sets, real files)."""
import hashlib
import json
import multiprocessing
import os
import xml.etree.ElementTree as ET

import cv2
import numpy as np
import pytest

from ilmil.data.shapes import dataset_dirname, generate_shapes_dataset, shape_class_names

PARAMS = dict(num_classes=20, num_train=12, num_test=4, image_size=128, seed=3)


def _generate(root):
    return generate_shapes_dataset(str(root), progress=False, **PARAMS)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return _generate(tmp_path_factory.mktemp("shapes"))


def _read_ids(path):
    with open(path) as f:
        return f.read().split()


def _voc_objects(path):
    root = ET.parse(path).getroot()
    objects = []
    for obj in root.findall("object"):
        box = obj.find("bndbox")
        objects.append((obj.find("name").text,
                        tuple(int(box.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax")),
                        obj.find("truncated").text))
    return root, objects


def _listing(path):
    return sorted(os.path.relpath(os.path.join(d, f), path)
                  for d, _, files in os.walk(path) for f in files)


def _assert_same_files(expected, actual):
    files = _listing(expected)
    assert _listing(actual) == files
    for rel in files:
        with open(os.path.join(expected, rel), "rb") as a, open(os.path.join(actual, rel), "rb") as b:
            assert a.read() == b.read(), rel


def test_layout(dataset):
    assert os.path.basename(dataset) == dataset_dirname(20, 12, 4, 128, 3)
    assert os.path.basename(dataset) == "shapes_c20_train12_test4_s128_seed3_v5"
    train = _read_ids(os.path.join(dataset, "ImageSets", "Main", "train.txt"))
    test = _read_ids(os.path.join(dataset, "ImageSets", "Main", "test.txt"))
    assert train == [f"{i:06d}" for i in range(12)]
    assert test == [f"{i:06d}" for i in range(12, 16)]
    for stem in train + test:
        assert os.path.isfile(os.path.join(dataset, "JPEGImages", stem + ".jpg"))
        assert os.path.isfile(os.path.join(dataset, "Annotations", stem + ".xml"))
    for split in ("train", "test"):
        assert os.path.isfile(os.path.join(dataset, "annotations", f"instances_{split}.json"))
    with open(os.path.join(dataset, "meta.json")) as f:
        meta = json.load(f)
    assert meta.pop("knobs")["max_objects"] == 6
    assert meta == {"generator_version": 5, "num_classes": 20, "num_train": 12, "num_test": 4,
                    "image_size": 128, "seed": 3, "difficulty": "hard", "class_names": shape_class_names(20)}


def _boxes_per_image(folder):
    with open(os.path.join(folder, "annotations", "instances_train.json")) as f:
        coco = json.load(f)
    counts = {img["id"]: 0 for img in coco["images"]}
    for ann in coco["annotations"]:
        counts[ann["image_id"]] += 1
    sides = [max(a["bbox"][2:]) for a in coco["annotations"]]
    return list(counts.values()), sides


def test_easy_difficulty_is_its_own_cached_set_with_fewer_larger_objects(dataset, tmp_path):
    easy = generate_shapes_dataset(str(tmp_path), num_train=40, num_test=4, image_size=128, seed=3,
                                   difficulty="easy", progress=False)
    assert os.path.basename(easy) == "shapes_c20_train40_test4_s128_seed3_easy_v5"
    hard = generate_shapes_dataset(str(tmp_path), num_train=40, num_test=4, image_size=128, seed=3, progress=False)
    easy_counts, easy_sides = _boxes_per_image(easy)
    hard_counts, hard_sides = _boxes_per_image(hard)
    assert max(easy_counts) <= 3 < max(hard_counts)
    assert min(easy_counts) >= 1
    assert min(easy_sides) > min(hard_sides)
    again = generate_shapes_dataset(str(tmp_path / "again"), num_train=40, num_test=4, image_size=128, seed=3,
                                    difficulty="easy", progress=False)
    for rel in _listing(easy):
        with open(os.path.join(easy, rel), "rb") as a, open(os.path.join(again, rel), "rb") as b:
            assert a.read() == b.read(), rel
    # Class colours: the centre of a filled (convex) object shows its class's hue.
    with open(os.path.join(easy, "annotations", "instances_train.json")) as f:
        coco = json.load(f)
    hue_errors = {}
    for ann in coco["annotations"]:
        if ann["category_id"] % 2 == 0 or ann["category_id"] > 10:
            continue  # outlines, and kinds past the five convex ones
        x, y, w, h = ann["bbox"]
        image = cv2.imread(os.path.join(easy, "JPEGImages", f"{ann['image_id']:06d}.jpg"))
        hue = cv2.cvtColor(image[int(y + h / 2):int(y + h / 2) + 1, int(x + w / 2):int(x + w / 2) + 1],
                           cv2.COLOR_BGR2HSV)[0, 0, 0]
        expected = ((ann["category_id"] - 1) * 0.618034 % 1.0) * 180
        hue_errors.setdefault(ann["category_id"], []).append(min(abs(hue - expected), 180 - abs(hue - expected)))
    assert len(hue_errors) >= 3
    assert all(np.median(errors) < 8 for errors in hue_errors.values()), hue_errors
    with pytest.raises(ValueError, match="difficulty must be one of hard, easy, got 'medium'"):
        generate_shapes_dataset(str(tmp_path), difficulty="medium", progress=False)


def test_voc_annotations(dataset):
    names = set(shape_class_names(20))
    stems = _read_ids(os.path.join(dataset, "ImageSets", "Main", "train.txt"))
    for stem in stems:
        root, objects = _voc_objects(os.path.join(dataset, "Annotations", stem + ".xml"))
        assert root.find("filename").text == stem + ".jpg"
        size = root.find("size")
        assert [size.find(k).text for k in ("width", "height", "depth")] == ["128", "128", "3"]
        for name, (xmin, ymin, xmax, ymax), truncated in objects:
            assert name in names
            assert 1 <= xmin <= xmax <= 128 and 1 <= ymin <= ymax <= 128
            assert xmax - xmin + 1 >= 2 and ymax - ymin + 1 >= 2
            assert truncated in ("0", "1")
    assert any(_voc_objects(os.path.join(dataset, "Annotations", s + ".xml"))[1] for s in stems)


@pytest.mark.parametrize("split", ["train", "test"])
def test_coco_matches_voc(dataset, split):
    with open(os.path.join(dataset, "annotations", f"instances_{split}.json")) as f:
        coco = json.load(f)
    names = shape_class_names(20)
    assert [(c["id"], c["name"]) for c in coco["categories"]] == \
        [(i + 1, n) for i, n in enumerate(names)]
    stems = _read_ids(os.path.join(dataset, "ImageSets", "Main", f"{split}.txt"))
    assert [img["file_name"] for img in coco["images"]] == [s + ".jpg" for s in stems]
    assert [img["id"] for img in coco["images"]] == [int(s) for s in stems]
    assert len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"])
    for img in coco["images"]:
        assert (img["width"], img["height"]) == (128, 128)
        _, voc = _voc_objects(os.path.join(dataset, "Annotations", img["file_name"][:-4] + ".xml"))
        anns = [a for a in coco["annotations"] if a["image_id"] == img["id"]]
        assert len(anns) == len(voc)
        for ann, (name, (xmin, ymin, xmax, ymax), _) in zip(anns, voc):
            assert names[ann["category_id"] - 1] == name
            assert ann["bbox"] == [xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]
            assert ann["area"] == ann["bbox"][2] * ann["bbox"][3] > 0
            assert ann["iscrowd"] == 0


def test_several_classes_per_image(dataset):
    with open(os.path.join(dataset, "annotations", "instances_train.json")) as f:
        coco = json.load(f)
    classes = {img["id"]: set() for img in coco["images"]}
    for ann in coco["annotations"]:
        classes[ann["image_id"]].add(ann["category_id"])
    assert sum(len(c) for c in classes.values()) / len(classes) > 1.5


def test_deterministic(dataset, tmp_path):
    again = _generate(tmp_path)
    assert any(f.endswith(".jpg") for f in _listing(dataset))
    _assert_same_files(dataset, again)


def test_cached_and_regenerated_when_incomplete(tmp_path):
    path = _generate(tmp_path)
    meta = os.path.join(path, "meta.json")
    jpg = os.path.join(path, "JPEGImages", "000000.jpg")
    stamps = os.stat(meta).st_mtime_ns, os.stat(jpg).st_mtime_ns
    assert _generate(tmp_path) == path
    assert (os.stat(meta).st_mtime_ns, os.stat(jpg).st_mtime_ns) == stamps

    # Without the completion marker the folder counts as half written.
    os.remove(meta)
    os.remove(jpg)
    with open(os.path.join(path, "stale.txt"), "w") as f:
        f.write("left over")
    assert _generate(tmp_path) == path
    assert os.path.isfile(meta) and os.path.isfile(jpg)
    assert not os.path.exists(os.path.join(path, "stale.txt"))


def test_the_generated_files_are_pinned(dataset):
    # Every benchmark number was measured on these bytes: a change of the generator (or of
    # the pinned Pillow and OpenCV) that alters them must come with a new GENERATOR_VERSION.
    # This small set includes text clutter, drawn through an 8-bit mask since OpenCV 5.
    digest = hashlib.sha256()
    for rel in _listing(dataset):
        digest.update(rel.encode())
        with open(os.path.join(dataset, rel), "rb") as f:
            digest.update(f.read())
    assert digest.hexdigest() == "ebb9e61e47f01461cf3e4477900c8acfa80d7dddd421763402a01edaf617e1c6"


def test_processes_generating_one_dataset_at_once_each_get_it_whole(dataset, tmp_path):
    # Parallel benchmark runs start by generating the same dataset: none may delete or
    # read another's half-written folder.
    with multiprocessing.get_context("fork").Pool(4) as pool:
        paths = pool.map(_generate, [tmp_path] * 4)
    assert len(set(paths)) == 1 and os.listdir(tmp_path) == [os.path.basename(paths[0])]
    _assert_same_files(dataset, paths[0])


def test_class_names():
    names20, names80 = shape_class_names(), shape_class_names(80)
    assert len(names20) == 20 and len(names80) == 80
    assert len(set(names80)) == 80
    assert names80[:20] == names20
    assert names20[:3] == ["circle_filled", "circle_outline", "square_filled"]
    assert {n.rsplit("_", 1)[1] for n in names20} == {"filled", "outline"}
    assert {n.rsplit("_", 1)[1] for n in names80} == {"filled", "outline", "striped", "dotted"}
    assert shape_class_names(7) == names20[:7]


@pytest.mark.parametrize("num_classes", [0, 81, -1])
def test_invalid_num_classes(num_classes, tmp_path):
    with pytest.raises(ValueError, match="1..80"):
        shape_class_names(num_classes)
    with pytest.raises(ValueError, match="1..80"):
        generate_shapes_dataset(str(tmp_path), num_classes=num_classes, progress=False)
    assert not os.listdir(tmp_path)
