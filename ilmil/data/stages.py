"""Incremental stage schedules: spec parsing and the per-stage data protocol.

A spec such as ``15+1x5`` lists the number of new classes of each stage
(``NxM`` = M stages of N classes). Stage k learns its classes from the training
images that hold at least one non-difficult object of them, with only those
annotations kept (old and future objects in the images stay unlabeled). After
stage k the model is tested on the whole test split with the ground truth of
every class seen so far.
"""
import copy
import re
from dataclasses import dataclass

__all__ = [
    "Stage",
    "StageSpecError",
    "parse_stage_spec",
    "build_schedule",
    "stage_train_dicts",
    "stage_test_dicts",
]

_TERM = re.compile(r"^(\d+)(?:x(\d+))?$")


class StageSpecError(ValueError):
    """A stage spec or class order that cannot be scheduled."""


@dataclass(frozen=True)
class Stage:
    """One incremental stage: the classes known before it and the ones it adds."""

    index: int
    old_classes: tuple
    new_classes: tuple

    @property
    def seen_classes(self):
        return self.old_classes + self.new_classes


def parse_stage_spec(spec, num_classes=None):
    """``"15+1x5"`` -> ``[15, 1, 1, 1, 1, 1]``.

    With ``num_classes``, the counts must sum to at most it (fewer trains on a
    prefix of the class order).
    """
    text = str(spec).strip().replace(" ", "")
    if not text:
        raise StageSpecError("empty stage spec: give class counts such as 10+10 or 15+1x5")
    counts = []
    for term in text.split("+"):
        match = _TERM.match(term)
        if match is None:
            raise StageSpecError(
                f"stage spec {spec!r}: term {term!r} is not a positive integer N or NxM "
                "(M stages of N classes); example: 15+1x5"
            )
        size, repeat = int(match.group(1)), int(match.group(2) or 1)
        if size == 0 or repeat == 0:
            raise StageSpecError(f"stage spec {spec!r}: term {term!r} has a zero count")
        counts.extend([size] * repeat)
    total = sum(counts)
    if num_classes is not None and total > num_classes:
        raise StageSpecError(
            f"stage spec {spec!r} needs {total} classes but the dataset has {num_classes}: "
            "lower the counts"
        )
    return counts


def build_schedule(class_order, counts):
    """Split ``class_order`` into consecutive stages of the given sizes."""
    if sum(counts) > len(class_order):
        raise StageSpecError(
            f"the schedule needs {sum(counts)} classes but the class order has "
            f"{len(class_order)}"
        )
    stages, start = [], 0
    for index, count in enumerate(counts):
        stages.append(
            Stage(
                index=index,
                old_classes=tuple(class_order[:start]),
                new_classes=tuple(class_order[start : start + count]),
            )
        )
        start += count
    return stages


def _relabel(record, keep, class_index):
    """Copy of ``record`` keeping the annotations whose class name is in ``keep``,
    with ``category_id`` set to the class's index in the schedule's order."""
    out = copy.copy(record)
    out["annotations"] = []
    for ann in record["annotations"]:
        if ann["category_name"] in keep:
            ann = dict(ann, category_id=class_index[ann["category_name"]])
            out["annotations"].append(ann)
    return out


def _ignored(ann):
    """VOC "difficult" and COCO crowd boxes: kept as ground truth, but they do not
    qualify an image for a stage."""
    return ann.get("difficult", 0) or ann.get("iscrowd", 0)


def stage_train_dicts(dataset_dicts, stage):
    """Training images of ``stage``: those with a non-difficult object of its new
    classes, keeping only new-class annotations (contiguous ids over the order)."""
    class_index = {name: i for i, name in enumerate(stage.seen_classes)}
    new = set(stage.new_classes)
    out = []
    for record in dataset_dicts:
        if any(a["category_name"] in new and not _ignored(a) for a in record["annotations"]):
            out.append(_relabel(record, new, class_index))
    return out


def stage_test_dicts(dataset_dicts, stage):
    """The whole test split, ground truth restricted to the classes seen so far."""
    class_index = {name: i for i, name in enumerate(stage.seen_classes)}
    seen = set(stage.seen_classes)
    return [_relabel(record, seen, class_index) for record in dataset_dicts]
