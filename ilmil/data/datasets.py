"""Datasets: VOC-XML and COCO-json loaders, built-in names, validation, registration.

Loaders return detectron2 dataset dicts whose annotations carry ``category_name``
(the stage protocol assigns contiguous ``category_id`` later, see ``stages.py``)
and whose records name the annotation file they came from, so every problem can
be reported with its file and field. Built-in names resolve under the datasets
root, ``$ILMIL_DATASETS`` (default ``./datasets``); ``datasets/README.md`` gives
the layouts.
"""
import json
import logging
import math
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from PIL import Image
from tqdm import tqdm

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from ..config import ConfigError, check_choice, default_cfg
from .shapes import MAX_CLASSES as MAX_SHAPE_CLASSES
from .shapes import DIFFICULTIES, generate_shapes_dataset
from .stages import StageSpecError, parse_stage_spec, stage_test_dicts, stage_train_dicts

__all__ = [
    "VOC_CLASSES",
    "BUILTIN_DATASETS",
    "DATA_PROBLEMS_FIX",
    "DEFAULT_CLASS_ORDER",
    "MAX_LISTED_PROBLEMS",
    "DatasetError",
    "DatasetSource",
    "dataset_problems_error",
    "datasets_root",
    "shapes_num_classes",
    "load_voc_split",
    "load_coco_json",
    "load_dataset_source",
    "problem_lines",
    "register_stage_datasets",
    "with_every_class_old",
]

logger = logging.getLogger(__name__)

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip

BUILTIN_DATASETS = ("shapes", "voc_2007", "voc_2012", "voc_07_12", "coco_2017", "voc_folder", "coco_json")
# How each dataset orders its classes when ILMIL.CLASS_ORDER is not given (the runner logs it).
DEFAULT_CLASS_ORDER = {
    "shapes": "the generator's order",
    "voc_2007": "VOC's canonical order",
    "voc_2012": "VOC's canonical order",
    "voc_07_12": "VOC's canonical order",
    "coco_2017": "category-id order",
    "voc_folder": "sorted names",
    "coco_json": "category-id order",
}



# Problems listed in an error message; the rest are counted.
MAX_LISTED_PROBLEMS = 20
_PROGRESS_MIN_IMAGES = 1000  # smaller splits are checked without a progress bar
# EXIF orientation tag and the values that turn an image by a quarter (width and height swap).
_EXIF_ORIENTATION = 0x0112
_EXIF_QUARTER_TURNS = (5, 6, 7, 8)
DATA_PROBLEMS_FIX = "correct the files, or set ILMIL.DATA.SKIP_BAD_ANNOTATIONS True to skip them"


class DatasetError(ValueError):
    """Missing or malformed dataset files; the message names the file and the fix."""


@dataclass
class DatasetSource:
    """A dataset's class names (canonical order) and its train and test records."""

    name: str
    class_names: tuple
    train: list
    test: list
    is_voc: bool  # VOC-format ground truth: VOC AP is reported besides COCO AP


def datasets_root():
    return os.environ.get("ILMIL_DATASETS", "datasets")


def _require(path, what, hint, folder=False):
    """``path``, refused unless it is a file (a folder with ``folder``)."""
    if not os.path.exists(path):
        raise DatasetError(f"{what} not found: {path}; fix: {hint}")
    if os.path.isdir(path) != folder:
        raise DatasetError(f"{what} {path} is {'a file' if folder else 'a folder'}; fix: {hint}")
    return path


def _xml_text(node, tag, xml_file):
    child = node.find(tag)
    text = "" if child is None or child.text is None else child.text.strip()
    if not text:  # blank too: a class named "" would be trained
        raise DatasetError(f"{xml_file}: {'empty' if child is not None else 'missing'} field <{tag}>; fix: give its "
                           "value, as VOC's annotation files do")
    return text


def _xml_number(node, tag, xml_file, kind=float):
    """The number in ``<tag>``; a ``kind`` int field may be written as a float (``64.0``, as
    some exporters write it), as the COCO loader takes it, but must be a whole number."""
    text = _xml_text(node, tag, xml_file)
    try:
        value = float(text)
    except ValueError:
        raise DatasetError(f"{xml_file}: field <{tag}> {text!r} is not a number; fix: correct the file") from None
    if kind is int and not value.is_integer():
        raise DatasetError(f"{xml_file}: field <{tag}> {text!r} is not a whole number; fix: correct the file")
    return kind(value)


# A line of VOC's per-class split files: the id, then -1, 0 or 1 (whether the class is there).
_FLAGGED_ID = re.compile(r"(.+?)\s+(-1|0|1)")


def _split_file_ids(split_file, voc_dir):
    """The image ids a VOC split file lists, in order, refused if one is listed twice (its
    copy would be scored without the boxes the first took). A line is ``ID`` or, in VOC's
    per-class files, ``ID FLAG``; an id may hold spaces where its XML file is so named."""
    ids, first_line = [], {}
    try:
        with open(split_file, encoding="utf-8-sig") as f:  # -sig: a byte-order mark (Windows editors) is read past
            lines = f.readlines()
    except UnicodeDecodeError as e:
        raise DatasetError(f"{split_file}: not UTF-8 text ({e}); fix: save it as UTF-8") from None
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        flagged = _FLAGGED_ID.fullmatch(line)
        # An id that ends like a flag ("img 1") is one where its XML file is so named.
        if flagged and not os.path.isfile(os.path.join(voc_dir, "Annotations", f"{line}.xml")):
            file_id = flagged.group(1)
        else:
            file_id = line
        if file_id in first_line:
            raise DatasetError(f"{split_file}: lines {first_line[file_id]} and {number} both list {file_id!r}; "
                               "fix: list each image once")
        first_line[file_id] = number
        ids.append(file_id)
    return ids


def _voc_image_file(voc_dir, file_id, tree):
    """The image of ``file_id``: JPEGImages/ID.jpg, or where there is none, the file the
    XML's <filename> names there (a .png, say). ID.jpg comes first: an XML copied from
    another image's often keeps that image's <filename>."""
    path = os.path.join(voc_dir, "JPEGImages", f"{file_id}.jpg")
    named = tree.findtext("filename", "").strip()
    if not os.path.isfile(path) and named:
        other = os.path.join(voc_dir, "JPEGImages", os.path.basename(named))
        if os.path.splitext(os.path.basename(named))[0] == file_id and os.path.isfile(other):
            return other
    return path


def load_voc_split(voc_dir, split, require_images=True):
    """Records of ``ImageSets/Main/{split}.txt`` of a Pascal-VOC-layout folder; without
    ``require_images``, of a folder whose images may be elsewhere (read for its names)."""
    layout_hint = "a VOC folder holds Annotations/, JPEGImages/ and ImageSets/Main/ (datasets/README.md)"
    split_file = _require(os.path.join(voc_dir, "ImageSets", "Main", f"{split}.txt"), "VOC split file", layout_hint)
    if require_images:
        _require(os.path.join(voc_dir, "JPEGImages"), "VOC image folder", layout_hint, folder=True)
    file_ids = _split_file_ids(split_file, voc_dir)
    missing = [i for i in file_ids if not os.path.isfile(os.path.join(voc_dir, "Annotations", f"{i}.xml"))]
    if missing:
        listed = ", ".join(os.path.join(voc_dir, "Annotations", f"{i}.xml") for i in missing[:3])
        raise DatasetError(f"{split_file}: {len(missing)} listed image(s) have no annotation file ({listed}"
                           f"{', ...' if len(missing) > 3 else ''}); fix: add them, or remove their ids from the "
                           "split file")
    records = []
    for file_id in file_ids:
        xml_file = os.path.join(voc_dir, "Annotations", f"{file_id}.xml")
        try:
            tree = ET.parse(xml_file).getroot()
        except ET.ParseError as e:
            raise DatasetError(f"{xml_file}: not valid XML ({e}); fix: correct the file or remove "
                               f"{file_id} from {split_file}") from None
        if tree.tag != "annotation":
            raise DatasetError(f"{xml_file}: top-level element <{tree.tag}>, not <annotation>: not a VOC "
                               "annotation; fix: give VOC XML files in Annotations/")
        size = tree.find("size")
        if size is None:
            raise DatasetError(f"{xml_file}: missing field <size>; fix: add <size><width>W</width><height>H"
                               "</height></size> with the image's size in pixels")
        annotations = []
        for obj in tree.findall("object"):
            bndbox = obj.find("bndbox")
            if bndbox is None:
                raise DatasetError(f"{xml_file}: an <object> has no <bndbox>; fix: give it <bndbox> with <xmin>, "
                                   "<ymin>, <xmax> and <ymax> in pixels")
            # VOC pixel indices are 1-based and inclusive; detectron2 boxes are 0-based.
            corners = ("xmin", "ymin", "xmax", "ymax")
            x0, y0, x1, y1 = (_xml_number(bndbox, t, xml_file) for t in corners)
            difficult = obj.find("difficult")
            annotations.append(
                {
                    "category_name": _xml_text(obj, "name", xml_file),
                    "bbox": [x0 - 1.0, y0 - 1.0, x1, y1],
                    "bbox_mode": BoxMode.XYXY_ABS,
                    "source_bbox": " ".join(f"<{t}> {bndbox.findtext(t).strip()}" for t in corners)
                    + " (VOC pixels, from 1)",
                    "difficult": _xml_number(obj, "difficult", xml_file, int)
                    if difficult is not None and difficult.text else 0,
                }
            )
        records.append(
            {
                "file_name": _voc_image_file(voc_dir, file_id, tree),
                "image_id": file_id,
                "height": _xml_number(size, "height", xml_file, int),
                "width": _xml_number(size, "width", xml_file, int),
                "annotations": annotations,
                "annotation_file": xml_file,
            }
        )
    return records


def load_coco_json(json_file, image_root, require_images=True):
    """Records and category names (in category-id order) of a COCO-format json; without
    ``require_images``, of one whose image folder may be elsewhere (read for its names)."""
    _require(json_file, "COCO annotation file", "give the path of an instances json (datasets/README.md)")
    if require_images:
        _require(image_root, "COCO image folder", "give the folder that the json's file_name entries are relative "
                 "to", folder=True)
    data = _read_coco_json(json_file)
    categories = sorted(data["categories"], key=lambda c: c["id"])
    id_to_name = {c["id"]: c["name"] for c in categories}
    records, by_image = [], {}
    for image in data["images"]:
        record = {
            "file_name": os.path.join(image_root, image["file_name"]),
            "image_id": image["id"],
            "height": image["height"],
            "width": image["width"],
            "annotations": [],
            "annotation_file": json_file,
        }
        records.append(record)
        by_image[image["id"]] = record
    orphans = [ann for ann in data["annotations"] if ann["image_id"] not in by_image]
    if orphans:
        listed = ", ".join(f"id {a.get('id')} -> image_id {a['image_id']!r}" for a in orphans[:5])
        raise DatasetError(f"{json_file}: {len(orphans)} annotation(s) refer to an image_id no image has ({listed}"
                           f"{', ...' if len(orphans) > 5 else ''}); fix: give each annotation the id of its "
                           "entry in 'images', or remove it")
    for i, ann in enumerate(data["annotations"]):
        record = by_image[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        record["annotations"].append(
            {
                "category_name": id_to_name.get(ann["category_id"], f"<unknown category_id {ann['category_id']}>"),
                "bbox": [x, y, x + w, y + h],
                "bbox_mode": BoxMode.XYXY_ABS,
                "iscrowd": int(ann.get("iscrowd", 0)),
                # Where a problem is reported: the entry's id, or its place where it has none.
                "annotation_ref": f"annotation id {ann['id']}" if "id" in ann else f"annotations[{i}]",
                "source_bbox": f"'bbox' {ann['bbox']} (x, y, width, height)",
            }
        )
    return records, tuple(id_to_name.values())


# The fields of a COCO instances json that the loader reads.
_COCO_FIELDS = {"images": ("id", "file_name", "width", "height"), "annotations": ("image_id", "category_id", "bbox"),
                "categories": ("id", "name")}


# The kinds of the fields read ("iscrowd" only where present): "int" an integer, "id" an
# integer or a string (image ids of some exporters), "text" a string, "flag" 0 or 1, "box"
# a list of 4 numbers (x, y, w, h).
_COCO_KINDS = {"images": {"id": "id", "file_name": "text", "width": "int", "height": "int"},
               "annotations": {"image_id": "id", "category_id": "id", "bbox": "box", "iscrowd": "flag"},
               "categories": {"id": "id", "name": "text"}}
_COCO_KIND_NAMES = {"int": "an integer", "id": "an integer or a string", "text": "a string", "flag": "0 or 1",
                    "box": "a list of 4 numbers [x, y, width, height]"}


def _of_kind(value, kind):
    def number(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    if kind == "int":
        return number(value) and float(value).is_integer()
    if kind == "id":
        return isinstance(value, str) or (number(value) and float(value).is_integer())
    if kind == "text":
        return isinstance(value, str) and value.strip() != ""
    if kind == "flag":
        return value in (0, 1)  # true / false too
    return isinstance(value, list) and len(value) == 4 and all(map(number, value))


def _read_coco_json(json_file):
    """The contents of a COCO instances json, refused (naming the file, the field and
    the fix) unless it is one: valid JSON, the three lists, their fields, unique categories."""
    fix = "fix: give a COCO instances json (datasets/README.md)"
    try:
        with open(json_file, encoding="utf-8-sig") as f:  # -sig: a byte-order mark (Windows editors) is read past
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        empty = os.path.getsize(json_file) == 0
        raise DatasetError(f"{json_file}: {'empty file' if empty else f'not valid JSON ({e})'}; {fix}") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{json_file}: the top level is a {type(data).__name__}, not an object with images, "
                           f"annotations and categories; {fix}")
    for key, fields in _COCO_FIELDS.items():
        entries = data.get(key)
        if not isinstance(entries, list):
            found = "missing" if entries is None else f"a {type(entries).__name__}, not a list"
            raise DatasetError(f"{json_file}: top-level field {key!r} is {found}; {fix}")
        for i, entry in enumerate(entries):
            missing = [field for field in fields if not isinstance(entry, dict) or field not in entry]
            if missing:
                raise DatasetError(f"{json_file}: {key}[{i}] lacks field(s) {', '.join(map(repr, missing))}; {fix}")
            for field, kind in _COCO_KINDS[key].items():
                if field in entry and not _of_kind(entry[field], kind):
                    raise DatasetError(f"{json_file}: {key}[{i}] field {field!r} {entry[field]!r} is not "
                                       f"{_COCO_KIND_NAMES[kind]}; {fix}")
    if len({isinstance(c["id"], str) for c in data["categories"]}) > 1:  # the class order is the ids' order
        raise DatasetError(f"{json_file}: the categories' ids mix integers and strings, which have no order; fix: "
                           "give every category an integer id")
    # One entry per image: a second would take the first's boxes, and its copy would be scored without them.
    for field in ("id", "file_name"):
        first = {}
        for i, image in enumerate(data["images"]):
            if image[field] in first:
                raise DatasetError(f"{json_file}: images[{first[image[field]]}] and images[{i}] share the {field} "
                                   f"{image[field]!r}; fix: list each image once, with its own id")
            first[image[field]] = i
    for field, other in (("id", "name"), ("name", "id")):
        seen = {}
        for category in data["categories"]:
            value = category[field]
            if value in seen:
                raise DatasetError(
                    f"{json_file}: categories with {other}s {seen[value]!r} and {category[other]!r} share the "
                    f"{field} {value!r}; fix: give each category its own id and name")
            seen[value] = category[other]
    return data


def _annotation_problem(record, ann, class_names, clip_boxes):
    """Why ``ann`` is malformed, or None; with ``clip_boxes`` a box sticking out of
    the image is clipped to it (in place) instead."""
    coco = "annotation_ref" in ann
    where = f"{record['annotation_file']} {ann['annotation_ref'] if coco else 'object ' + repr(ann['category_name'])}"
    if ann["category_name"] not in class_names:
        field = "category_id" if coco else "name"
        return f"{where}: field '{field}': unknown class {ann['category_name']!r} (known: {', '.join(class_names)})"
    # The box as the file writes it (the record's is 0-based corners).
    box = ann.get("source_bbox", f"'bbox' {ann['bbox']} (x0, y0, x1, y1)")
    if not all(math.isfinite(v) for v in ann["bbox"]):
        return f"{where}: field {box} is not finite"
    width, height = record["width"], record["height"]
    x0, y0, x1, y1 = ann["bbox"]
    if clip_boxes:
        x0, x1 = min(max(x0, 0.0), width), min(max(x1, 0.0), width)
        y0, y1 = min(max(y0, 0.0), height), min(max(y1, 0.0), height)
    if x1 <= x0 or y1 <= y0:
        clipped = " after clipping to the image" if clip_boxes else ""
        return f"{where}: field {box} has zero or negative area{clipped}"
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        return (f"{where}: field {box} lies outside the {width}x{height} image (ILMIL.DATA.CLIP_BOXES True clips "
                "such boxes)")
    ann["bbox"] = [x0, y0, x1, y1]
    return None


def _exif_orientation(image, decode):
    """The EXIF orientation of an opened image. Pillow's ``getexif`` decodes a whole PNG
    to look for an eXIf chunk after its pixels; without ``decode`` only the one before
    them (where writers put it) is read."""
    if decode or image.format != "PNG":
        return image.getexif().get(_EXIF_ORIENTATION)
    exif = Image.Exif()
    if "exif" in image.info:
        exif.load(image.info["exif"])
    return exif.get(_EXIF_ORIENTATION)


def _image_problem(record, decode):
    """Why the image file of ``record`` cannot be used, or None: missing, or of another size
    than the annotation says (read from its header: the data loader would stop on it
    mid-training); ``decode``: also check that it decodes."""
    path, where = record["file_name"], record["annotation_file"]
    if not os.path.isfile(path):
        return f"{where}: image file missing: {path}"
    try:
        with Image.open(path) as image:
            size = image.size
            rotated = _exif_orientation(image, decode) in _EXIF_QUARTER_TURNS
            if decode:
                # JPEG: decode at 1/8 scale, several times faster and still reads every byte.
                image.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
                image.load()
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... on bad files
        return f"{where}: image file {path} does not decode ({e}): replace it or remove it from the split"
    if rotated:  # the loader turns the image as its EXIF orientation says: the boxes are on the turned one
        size = size[::-1]
    if size != (record["width"], record["height"]):
        turned = " once turned as its EXIF orientation says" if rotated else ""
        return (f"{where}: fields 'width', 'height' say {record['width']}x{record['height']}, "
                f"but image file {path} is {size[0]}x{size[1]}{turned}")
    return None


def validate_records(records, class_names, split_desc, clip_boxes=False, check_images=True):
    """Check every image file and annotation; returns ``(good_records, problems)``.

    ``good_records`` leaves out the bad annotations and the images that are missing
    or unreadable; ``problems`` lists each with its file and field.
    """
    known = set(class_names)
    problems, kept = [], []
    desc = f"checking {split_desc} images"
    for record in tqdm(records, desc=desc, disable=not check_images or len(records) < _PROGRESS_MIN_IMAGES):
        problem = _image_problem(record, decode=check_images)
        if problem is not None:
            problems.append(problem)
            continue
        annotations = [dict(a, bbox=list(a["bbox"])) for a in record["annotations"]]
        good = []
        for ann in annotations:
            problem = _annotation_problem(record, ann, known, clip_boxes)
            if problem is None:
                good.append(ann)
            else:
                problems.append(problem)
        kept.append(dict(record, annotations=good))
    return kept, problems


def problem_lines(problems, bullet="", report=None):
    """The first ``MAX_LISTED_PROBLEMS`` of ``problems`` as indented message lines,
    then how many more there are (and ``report``, the file that holds them all)."""
    lines = [f"  {bullet}{p}" for p in problems[:MAX_LISTED_PROBLEMS]]
    more = len(problems) - MAX_LISTED_PROBLEMS
    if more > 0:
        lines.append(f"  ... and {more} more" + (f": all of them are in {report}" if report else ""))
    return lines


def dataset_problems_error(problems, what):
    """The error listing (up to a screenful of) ``problems`` found in ``what``."""
    if len(problems) == 1:  # one problem, one line
        return DatasetError(f"{problems[0]} (in {what}); fix: {DATA_PROBLEMS_FIX}")
    listed = "\n".join(problem_lines(problems))
    return DatasetError(
        f"{len(problems)} malformed annotation(s) or image(s) in {what}:\n{listed}\n  fix: {DATA_PROBLEMS_FIX}"
    )


def shapes_num_classes(shapes_cfg, stages):
    """The classes of the shapes data a run of stage spec ``stages`` trains on:
    ``ILMIL.SHAPES.NUM_CLASSES``, or with 0 as many as the spec needs, at least 20."""
    return shapes_cfg.NUM_CLASSES or max(20, sum(parse_stage_spec(stages, MAX_SHAPE_CLASSES)))


def _default_shapes():
    return default_cfg().ILMIL.SHAPES


def _shapes_source(cfg):
    shapes = cfg.ILMIL.SHAPES
    if not 0 <= shapes.NUM_CLASSES <= MAX_SHAPE_CLASSES:
        raise ConfigError(f"ILMIL.SHAPES.NUM_CLASSES {shapes.NUM_CLASSES}: the shapes dataset has 1 to "
                          f"{MAX_SHAPE_CLASSES} classes (0: as many as ILMIL.STAGES needs); fix: e.g. 0")
    num_classes = shapes_num_classes(shapes, cfg.ILMIL.STAGES)
    if num_classes > MAX_SHAPE_CLASSES:
        raise StageSpecError(
            f"ILMIL.STAGES {cfg.ILMIL.STAGES!r} needs {num_classes} classes; the shapes dataset has at most "
            f"{MAX_SHAPE_CLASSES}: lower the counts"
        )
    for key in ("NUM_TRAIN", "NUM_TEST", "SEED"):
        if shapes[key] < 0:
            raise ConfigError(f"ILMIL.SHAPES.{key} {shapes[key]}: a count or seed of 0 or more; fix: e.g. "
                              f"{_default_shapes()[key]}")
    if shapes.IMAGE_SIZE < 64:
        raise ConfigError(f"ILMIL.SHAPES.IMAGE_SIZE {shapes.IMAGE_SIZE}: the shapes are drawn on images of 64 px or "
                          f"more; fix: e.g. {_default_shapes().IMAGE_SIZE}")
    root = generate_shapes_dataset(
        os.path.join(datasets_root(), "shapes"),
        num_classes=num_classes,
        num_train=shapes.NUM_TRAIN,
        num_test=shapes.NUM_TEST,
        image_size=shapes.IMAGE_SIZE,
        seed=shapes.SEED,
        difficulty=check_choice("ILMIL.SHAPES.DIFFICULTY", shapes.DIFFICULTY, tuple(DIFFICULTIES)),
    )
    images = os.path.join(root, "JPEGImages")
    train, class_names = load_coco_json(os.path.join(root, "annotations", "instances_train.json"), images)
    test, _ = load_coco_json(os.path.join(root, "annotations", "instances_test.json"), images)
    return class_names, train, test, False


def _voc_source(train_parts, test_part, train_images=True):
    root = datasets_root()
    train = [r for year, split in train_parts
             for r in load_voc_split(os.path.join(root, f"VOC{year}"), split, train_images)]
    year, split = test_part
    return VOC_CLASSES, train, load_voc_split(os.path.join(root, f"VOC{year}"), split), True


def _coco_pair(train_json, train_images, test_json, test_images, require_train_images=True):
    train, class_names = load_coco_json(train_json, train_images, require_train_images)
    test, test_classes = load_coco_json(test_json, test_images)
    if test_classes != class_names:
        missing = [c for c in class_names if c not in test_classes]
        extra = [c for c in test_classes if c not in class_names]
        how = "; ".join(part for part in (f"missing: {', '.join(missing)}" if missing else "",
                                          f"not in the train json: {', '.join(extra)}" if extra else "") if part)
        raise DatasetError(f"{test_json}: its categories differ from those of {train_json} "
                           f"({how or 'the same names in another id order'}); fix: give both files the same "
                           "'categories' list (ids and names)")
    return class_names, train, test, False


def _warn_of_case_twins(class_names, where):
    """Names that differ only in case are two classes: usually one class written two ways."""
    by_lower = {}
    for name in class_names:
        by_lower.setdefault(name.lower(), []).append(name)
    for names in by_lower.values():
        if len(names) > 1:
            logger.warning("%s: object names %s differ only in case and are %d classes; correct the files if "
                           "they are one", where, ", ".join(map(repr, names)), len(names))


def _required_key(cfg, key):
    value = cfg.ILMIL.DATA.get(key)
    if not value:
        raise DatasetError(f"ILMIL.DATASET {cfg.ILMIL.DATASET} needs ILMIL.DATA.{key}; fix: give it (README, "
                           "Datasets)")
    return value


def _test_split_and_fix(cfg):
    """Where the test images of ``cfg``'s dataset are listed, and how to give some."""
    data, name = cfg.ILMIL.DATA, cfg.ILMIL.DATASET
    if name == "coco_json":
        return data.TEST_JSON, f"list the test images in its 'images', their files under {data.TEST_IMAGES}"
    if name == "voc_folder":
        return (os.path.join(data.ROOT, "ImageSets", "Main", f"{data.TEST_SPLIT}.txt"),
                "list the test image ids in it, or name another split (ILMIL.DATA.TEST_SPLIT)")
    if name == "shapes":
        return "ILMIL.SHAPES.NUM_TEST 0", "ILMIL.SHAPES.NUM_TEST 1 or more"
    return f"the {name} test split", f"put its files under {datasets_root()} (datasets/README.md)"


def load_dataset_source(cfg, problems=None, splits=("train", "test")):
    """Load (and validate) the train and test records named by ``cfg.ILMIL.DATASET``.

    Malformed annotations and unusable images raise one :class:`DatasetError`
    listing them all, or are appended to ``problems`` when a list is given (the
    run's pre-flight check reports them with its own findings); with
    ``ILMIL.DATA.SKIP_BAD_ANNOTATIONS`` they are dropped and counted instead.
    A test split with no usable image is refused. ``splits``: those whose images
    are checked and returned; the other's records are read for the class names
    only and left out (evaluating needs no training image).
    """
    name = cfg.ILMIL.DATASET
    root = datasets_root()
    train_images = "train" in splits  # else the training files are read for the class names only
    if name == "shapes":
        class_names, train, test, is_voc = _shapes_source(cfg)
    elif name == "voc_2007":
        class_names, train, test, is_voc = _voc_source([("2007", "trainval")], ("2007", "test"), train_images)
    elif name == "voc_2012":
        # VOC2012 test annotations are not public: val is the test split.
        class_names, train, test, is_voc = _voc_source([("2012", "train")], ("2012", "val"), train_images)
    elif name == "voc_07_12":
        class_names, train, test, is_voc = _voc_source([("2007", "trainval"), ("2012", "trainval")], ("2007", "test"),
                                                       train_images)
    elif name == "coco_2017":
        coco = os.path.join(root, "coco")
        class_names, train, test, is_voc = _coco_pair(
            os.path.join(coco, "annotations", "instances_train2017.json"),
            os.path.join(coco, "train2017"),
            os.path.join(coco, "annotations", "instances_val2017.json"),
            os.path.join(coco, "val2017"),
            train_images,
        )
    elif name == "voc_folder":
        voc_dir = _required_key(cfg, "ROOT")
        train = load_voc_split(voc_dir, cfg.ILMIL.DATA.TRAIN_SPLIT, train_images)
        test = load_voc_split(voc_dir, cfg.ILMIL.DATA.TEST_SPLIT)
        # A custom VOC folder has its own classes: the names of its training objects,
        # sorted, so the order (and the stages it makes) never depends on file order.
        class_names = tuple(sorted({a["category_name"] for r in train for a in r["annotations"]}))
        _warn_of_case_twins(class_names, voc_dir)
        is_voc = True
    elif name == "coco_json":
        class_names, train, test, is_voc = _coco_pair(
            *(_required_key(cfg, k) for k in ("TRAIN_JSON", "TRAIN_IMAGES", "TEST_JSON", "TEST_IMAGES")), train_images)
    else:
        raise DatasetError(f"unknown dataset {name!r}; choose one of: {', '.join(BUILTIN_DATASETS)}")
    data = cfg.ILMIL.DATA
    listed_tests = len(test)
    train, train_problems = validate_records(train, class_names, f"{name} train", data.CLIP_BOXES,
                                             data.CHECK_IMAGES) if "train" in splits else ([], [])
    test, test_problems = validate_records(test, class_names, f"{name} test", data.CLIP_BOXES,
                                           data.CHECK_IMAGES) if "test" in splits else ([], [])
    bad = train_problems + test_problems
    if "test" in splits and not test:
        # Found before a stage trains: the evaluation after it would stop on an empty dataset.
        where, fix = _test_split_and_fix(cfg)
        if listed_tests:  # every listed image unusable (skipped, or reported with the rest below)
            where, fix = f"{where}: none of its {listed_tests} test images is usable", "correct them"
        else:
            where += ": no test image"
        # The training data's problems too: all of them found in one go, as when a run checks its data.
        listed = problem_lines(bad)
        raise DatasetError(f"{where}; fix: {fix}" + (" (and the problems below):\n" + "\n".join(listed)
                                                     if listed else ""))
    if bad and data.SKIP_BAD_ANNOTATIONS:
        logger.warning("Skipped %d malformed annotation(s) or unusable image(s) in the %s data", len(bad), name)
    elif bad and problems is None:
        raise dataset_problems_error(bad, f"the {name} data")
    elif bad:
        problems.extend(bad)
    return DatasetSource(name, tuple(class_names), train, test, is_voc)


def _register(name, get_dicts):
    """``name`` in detectron2's catalogs, replacing a dataset of that name and its metadata."""
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, get_dicts)


def register_stage_datasets(prefix, source, stage, exclusive=None):
    """Register ``{prefix}_stage{k}_train`` / ``_test`` in detectron2's catalogs;
    with ``exclusive`` (an ``ExclusiveStageImages``) the training images are those
    that rule gives to ``stage``.

    Returns the two names. Re-registering a name replaces it, so several runs can
    share one process.
    """
    names = {}
    for split, dicts in (
        ("train", stage_train_dicts(source.train, stage, exclusive)),
        ("test", stage_test_dicts(source.test, stage)),
    ):
        name = f"{prefix}_stage{stage.index}_{split}"
        _register(name, lambda dicts=dicts: dicts)
        MetadataCatalog.get(name).set(
            thing_classes=list(stage.seen_classes),
            old_classes=list(stage.old_classes),
            new_classes=list(stage.new_classes),
            is_voc=source.is_voc,
            evaluator_type="ilmil",
        )
        names[split] = name
    return names["train"], names["test"]


def with_every_class_old(train_dataset):
    """``train_dataset`` under a second name whose classes are all old: the data of a
    student whose teacher holds every class (a compression run, a pruned model's
    fine-tuning with its unpruned self), which a student checks its teacher against."""
    name = f"{train_dataset}_every_class_old"
    _register(name, lambda: DatasetCatalog.get(train_dataset))
    meta = {k: v for k, v in MetadataCatalog.get(train_dataset).as_dict().items() if k != "name"}
    MetadataCatalog.get(name).set(**{**meta, "old_classes": list(meta["thing_classes"]), "new_classes": []})
    return name
