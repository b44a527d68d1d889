"""The classes a detector checkpoint holds, checked against those it is used for."""
from ..checkpoint import CheckpointError, safe_load

__all__ = ["CheckpointClassesError", "TeacherMismatchError", "checkpoint_class_names", "load_checked_checkpoint"]


class CheckpointClassesError(ValueError):
    """A checkpoint does not hold the classes it is used for."""


class TeacherMismatchError(CheckpointClassesError):
    """The teacher checkpoint does not hold the classes the schedule expects."""


def checkpoint_class_names(checkpoint):
    """Class names recorded in an ilmil checkpoint, or None (a plain detectron2 one)."""
    return checkpoint.get("ilmil", {}).get("class_names")


_CLS_SCORE = "roi_heads.box_predictor.cls_score.weight"


def load_checked_checkpoint(
    weights,
    expected_classes=None,
    error=TeacherMismatchError,
    use="the schedule expects the {n} old classes",
    fix="give the checkpoint of the previous stage, or fix --stages / --class-order",
):
    """A detector checkpoint (``{"model": state dict, ...}``) and its class count,
    refused with ``error`` (naming both lists) when its class count or recorded
    class names differ from ``expected_classes``; ``use`` and ``fix`` word the message."""
    checkpoint = safe_load(weights)
    if "model" not in checkpoint:
        checkpoint = {"model": checkpoint}
    state = checkpoint["model"]
    if _CLS_SCORE not in state:
        raise CheckpointError(f"checkpoint {weights} holds no box classifier ({_CLS_SCORE}): not a Faster R-CNN "
                              "detector; fix: give a detector checkpoint written by ilmil's tools")
    num_classes = state[_CLS_SCORE].shape[0] - 1
    if expected_classes is not None:
        names = checkpoint_class_names(checkpoint)
        if num_classes != len(expected_classes) or (names is not None and list(names) != list(expected_classes)):
            found = list(names) if names is not None else f"{num_classes} unnamed classes"
            expected = use.format(n=len(expected_classes))
            raise error(f"checkpoint {weights} holds {found}, but {expected} {list(expected_classes)}: {fix}")
    return checkpoint, num_classes
