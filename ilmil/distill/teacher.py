"""The teacher: a frozen detector built from its own config and weights.

A teacher may be any detector the toolkit builds, of any depth or width: the
previous stage's model (incremental runs, the default: the student's config with
the checkpoint's class count) or a larger model of the same classes
(``ILMIL.TEACHER.CONFIG_FILE``). Its weights are loaded strictly: a missing,
unexpected or mis-shaped key is an error naming the keys, never a partly random
teacher. It normalises its input with its own pixel mean and std, runs in eval
mode without gradients (BatchNorm folded into the convolutions, optionally under
reduced precision), and is held outside the student's module tree: not in its
state dict, its optimizer or DistributedDataParallel.
"""
import os

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from detectron2.layers import Conv2d, FrozenBatchNorm2d
from detectron2.modeling import META_ARCH_REGISTRY

from ..checkpoint import DISTILLATION_STATE_PREFIXES, CheckpointError, load_checked_checkpoint, unwrapped_state
from ..config import ConfigError, check_choice, get_ilmil_cfg, set_num_classes
from ..modeling.build import load_detector
from .precision import autocast_off

__all__ = ["TEACHER_PRECISIONS", "FrozenTeacher", "build_teacher", "detector_architecture", "fold_batchnorm",
           "teacher_cfg"]

# ILMIL.TEACHER.PRECISION -> the autocast dtype of the teacher pass (None: no autocast).
TEACHER_PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def fold_batchnorm(model):
    """Fold each BatchNorm that follows a convolution into that convolution.

    Only for a model that never trains again (the teacher): in eval mode its
    BatchNorm is a fixed affine map, and folding it away saves ~8 % of the
    backbone's forward time on CPU.
    """
    for module in model.modules():
        if isinstance(module, Conv2d) and isinstance(module.norm, (nn.BatchNorm2d, FrozenBatchNorm2d)):
            norm = module.norm
            module.weight, module.bias = fuse_conv_bn_weights(
                module.weight, module.bias, norm.running_mean, norm.running_var, norm.eps, norm.weight, norm.bias
            )
            module.norm = None
    return model


def detector_architecture(name):
    """The detector a student meta-architecture extends (IncrementalRCNN: GeneralizedRCNN);
    any other name as it is."""
    if name not in META_ARCH_REGISTRY:
        return name
    return getattr(META_ARCH_REGISTRY.get(name), "detector_architecture", name)


def teacher_cfg(cfg, num_classes):
    """The teacher's config: ``ILMIL.TEACHER.CONFIG_FILE`` (else the student's), as a
    plain detector of ``num_classes`` classes without distillation of its own."""
    config_file = cfg.ILMIL.TEACHER.CONFIG_FILE
    if config_file:
        if not os.path.isfile(config_file):
            raise ConfigError(f"ILMIL.TEACHER.CONFIG_FILE {config_file}: no such file; fix: give the config the "
                              "teacher was trained with (a run's config.yaml), or leave it empty for the student's")
        teacher = get_ilmil_cfg(config_file, method="finetune",
                                given_as="ILMIL.TEACHER.CONFIG_FILE (--teacher-config)")
        teacher.MODEL.DEVICE = cfg.MODEL.DEVICE
    else:
        teacher = cfg.clone()
        teacher.defrost()
    teacher.MODEL.META_ARCHITECTURE = detector_architecture(teacher.MODEL.META_ARCHITECTURE)
    set_num_classes(teacher, num_classes)
    teacher.MODEL.WEIGHTS = ""
    teacher.ILMIL.TEACHER.WEIGHTS = ""
    teacher.freeze()
    return teacher


def _check_no_unexpected_keys(model, state, weights):
    """Refuse checkpoint tensors the teacher has no place for (detectron2 would drop them
    with a warning): weights of another model, or a teacher config that does not fit."""
    own = model.state_dict()
    state = unwrapped_state(state)
    unexpected = [name for name in state if name not in own and not name.startswith(DISTILLATION_STATE_PREFIXES)]
    if unexpected:
        listed = ", ".join(unexpected[:5]) + (", ..." if len(unexpected) > 5 else "")
        raise CheckpointError(f"teacher checkpoint {weights} holds {len(unexpected)} tensor(s) the teacher's "
                              f"config has no place for ({listed}); fix: give the config the teacher was trained "
                              "with as ILMIL.TEACHER.CONFIG_FILE (a run's config.yaml)")


def build_teacher(cfg, weights, expected_classes=None):
    """The frozen teacher of ``cfg`` with ``weights`` (see the module docstring).

    Refuses a checkpoint whose class count (or recorded class names) differs from
    ``expected_classes``, naming both, and one that does not fit the teacher's config.
    """
    checkpoint, num_classes = load_checked_checkpoint(weights, expected_classes)
    t_cfg = teacher_cfg(cfg, num_classes)
    teacher = load_detector(t_cfg, weights, checkpoint)  # missing or mis-shaped keys; a pruned teacher keeps its widths
    _check_no_unexpected_keys(teacher, checkpoint.get("model", checkpoint), weights)
    teacher.eval()
    fold_batchnorm(teacher)
    teacher.requires_grad_(False)
    return teacher


class FrozenTeacher:
    """Holds the teacher without registering it as a submodule of the student, and
    runs it: its own input normalisation, no gradients, the configured precision."""

    def __init__(self, module, precision="float32"):
        check_choice("ILMIL.TEACHER.PRECISION", precision, TEACHER_PRECISIONS)
        self.module = module
        self.dtype = TEACHER_PRECISIONS[precision]
        if self.dtype is not None:
            # Reduced-precision convolutions (oneDNN's, cuDNN's) run fastest on channels-last
            # weights: ~18 % off the YOLO teacher's bfloat16 pass on a CPU (0.118 -> 0.097 s a batch).
            module.to(memory_format=torch.channels_last)

    def images(self, batched_inputs, student_images, student):
        """The teacher's input: the student's ``ImageList`` when both normalise and pad
        alike, else the raw images normalised the teacher's way."""
        teacher = self.module
        same = (torch.equal(teacher.pixel_mean, student.pixel_mean) and torch.equal(teacher.pixel_std, student.pixel_std)
                and teacher.backbone.size_divisibility == student.backbone.size_divisibility)
        return student_images if same else teacher.preprocess_image(batched_inputs)

    def autocast(self):
        """The context of a teacher pass at the configured precision: float32 means autocast
        off, also inside mixed-precision training."""
        if self.dtype is None:
            return autocast_off()
        return torch.autocast(self.module.device.type, dtype=self.dtype)
