"""Precision of the distillation passes. Under mixed precision (``SOLVER.AMP.ENABLED``,
detectron2's AMPTrainer) or a reduced-precision teacher (``ILMIL.TEACHER.PRECISION``)
tensors come out of a pass in float16 / bfloat16; what is computed from them (the
terms, the teacher's detections) is computed in float32, with autocast off: a sum
over a map overflows in float16, and torch refuses some ops on mixed dtypes."""
import contextlib

import torch

__all__ = ["as_float32", "autocast_off"]


def as_float32(value):
    """``value`` (a tensor, or dicts / lists / tuples of them) with its floating tensors
    in float32; other values (``Instances``, ints) as they are."""
    if torch.is_tensor(value):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, dict):
        return {key: as_float32(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(as_float32(item) for item in value)
    return value


@contextlib.contextmanager
def autocast_off():
    """Autocast off on every device where it is on."""
    with contextlib.ExitStack() as stack:
        for device in ("cpu", "cuda"):
            if torch.is_autocast_enabled(device):
                stack.enter_context(torch.autocast(device, enabled=False))
        yield
