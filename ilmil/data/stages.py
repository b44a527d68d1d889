"""Incremental stage schedules: spec parsing and the per-stage data protocol.

A spec such as ``15+1x5`` lists the number of new classes of each stage
(``NxM`` = M stages of N classes). Stage k learns its classes from the training
images that hold at least one non-difficult object of them, with only those
annotations kept (old and future objects in the images stay unlabeled). After
stage k the model is tested on the whole test split with the ground truth of
every class seen so far.

That standard protocol reuses an image in every stage whose classes it holds.
The exclusive rule (:class:`ExclusiveStageImages`, ``ILMIL.STAGE_IMAGES
exclusive``) gives each training image to exactly one of those stages instead.
"""
import copy
import random
import re
from collections import Counter
from dataclasses import dataclass

__all__ = [
    "STAGE_IMAGE_RULES",
    "ExclusiveStageImages",
    "Stage",
    "StageSpecError",
    "parse_stage_spec",
    "build_schedule",
    "shared_image_count",
    "stage_train_dicts",
    "stage_test_dicts",
]

# ILMIL.STAGE_IMAGES: which training images each stage gets (README, Leak-free stages).
STAGE_IMAGE_RULES = ("standard", "exclusive")

_TERM = re.compile(r"^(\d+)(?:\s*x\s*(\d+))?$")


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


def parse_stage_spec(spec, num_classes=None, classes_from="the dataset"):
    """``"15+1x5"`` -> ``[15, 1, 1, 1, 1, 1]``.

    With ``num_classes`` (the number of classes ``classes_from`` names), the counts
    must sum to at most it (fewer trains on a prefix of the class order).
    """
    text = str(spec).strip()
    if not text:
        raise StageSpecError("empty stage spec; fix: give class counts such as 10+10 or 15+1x5")
    terms = []
    for term in (part.strip() for part in text.split("+")):  # spaces around a + only: "1 1" is no 11
        match = _TERM.match(term)
        if match is None:
            raise StageSpecError(
                f"stage spec {spec!r}: term {term!r} is not a positive integer N or NxM "
                "(M stages of N classes); fix: e.g. 15+1x5"
            )
        size, repeat = int(match.group(1)), int(match.group(2) or 1)
        if size == 0 or repeat == 0:
            raise StageSpecError(f"stage spec {spec!r}: term {term!r} has a zero count; fix: every stage learns "
                                 "1 class or more, e.g. 10+10 or 15+1x5")
        terms.append((size, repeat))
    total = sum(size * repeat for size, repeat in terms)  # checked before a typo's 1x10000000000 is listed
    if num_classes is not None and total > num_classes:
        raise StageSpecError(
            f"stage spec {spec!r} needs {total} classes but {classes_from} has {num_classes}; "
            "fix: lower the counts" + ("" if classes_from == "the dataset" else " or name more classes")
        )
    return [size for size, repeat in terms for _ in range(repeat)]


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


def _stage_object_counts(record, class_stage):
    """``{stage index: the record's qualifying objects of that stage's new classes}``
    for the stages the record qualifies for; ``class_stage`` maps a class to its stage."""
    return Counter(class_stage[a["category_name"]] for a in record["annotations"]
                   if a["category_name"] in class_stage and not _ignored(a))


def _class_stages(schedule):
    return {name: stage.index for stage in schedule for name in stage.new_classes}


class ExclusiveStageImages:
    """The leak-free rule: every training image trains exactly one stage of ``schedule``.

    An image that qualifies for one stage (holds a non-difficult, non-crowd object
    of its new classes) goes to it. One that qualifies for several goes to one of
    them, drawn with probability proportional to its number of such objects of each
    stage's classes, by a generator seeded with ``(seed, image_id)``: an image's
    stage depends on neither the other images nor their order, and the same seed
    gives the same assignment.
    """

    def __init__(self, schedule, seed):
        self.seed = seed
        self._class_stage = _class_stages(schedule)

    def stage_of(self, record):
        """The index of the stage that trains on ``record``; None where it qualifies for none."""
        counts = _stage_object_counts(record, self._class_stage)
        stages = sorted(counts)
        if len(stages) <= 1:
            return stages[0] if stages else None
        # A string seed is hashed with SHA-512, not hash(): the same draw in every process.
        draw = random.Random(f"{self.seed}:{record['image_id']}")
        return draw.choices(stages, weights=[counts[k] for k in stages])[0]


def shared_image_count(dataset_dicts, schedule):
    """How many training images the standard rule puts in two or more stages."""
    class_stage = _class_stages(schedule)
    return sum(len(_stage_object_counts(record, class_stage)) > 1 for record in dataset_dicts)


def stage_train_dicts(dataset_dicts, stage, exclusive=None):
    """Training images of ``stage``: those with a non-difficult object of its new
    classes, keeping only new-class annotations (contiguous ids over the order).

    With ``exclusive`` (an :class:`ExclusiveStageImages` of the schedule), only the
    images that rule gives to ``stage``.
    """
    class_index = {name: i for i, name in enumerate(stage.seen_classes)}
    new = set(stage.new_classes)
    out = []
    for record in dataset_dicts:
        if exclusive is not None:
            qualifies = exclusive.stage_of(record) == stage.index
        else:
            qualifies = any(a["category_name"] in new and not _ignored(a) for a in record["annotations"])
        if qualifies:
            out.append(_relabel(record, new, class_index))
    return out


def stage_test_dicts(dataset_dicts, stage):
    """The whole test split, ground truth restricted to the classes seen so far."""
    class_index = {name: i for i, name in enumerate(stage.seen_classes)}
    seen = set(stage.seen_classes)
    return [_relabel(record, seen, class_index) for record in dataset_dicts]
