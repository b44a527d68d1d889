"""Checkpoint files: atomic writes, loads that never run code, fallback past a corrupt file.

``IncrementalCheckpointer`` is detectron2's ``DetectionCheckpointer`` with three
differences, each needed for long incremental runs:

* every file (checkpoint, ``last_checkpoint`` tag) is written atomically
  (``ilmil.file_io.atomic_write``): a crash or a kill leaves either the old file
  or the new one, never half of one;
* loading never executes code from the file: ``.pth`` through
  ``torch.load(weights_only=True)``, detectron2 / Caffe2 model-zoo ``.pkl``
  through an unpickler that only builds containers and numpy arrays;
* ``resume_or_load(resume=True)`` resumes from the newest checkpoint that loads;
  a truncated or corrupt one is skipped with a warning naming both files.

The checkpoint's ``ilmil`` record (the model's classes in logit order, its channel
layout, the schedule it belongs to) is written, read and checked here only:
:class:`StageRecord` writes it, :func:`checkpoint_class_names` and
:func:`checkpoint_channel_layout` read it, :func:`load_checked_checkpoint` refuses
a checkpoint of other classes.
"""
import logging
import os
import pickle
import random
import re

import numpy as np
import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils import comm

from .file_io import atomic_write
from .pruning.channels import channel_layout

__all__ = [
    "CLASSIFIER_KEYS",
    "dense_classifiers",
    "DISTILLATION_STATE_PREFIXES",
    "CheckpointClassesError",
    "CheckpointError",
    "IncrementalCheckpointer",
    "LossNormalizer",
    "ProcessBuffers",
    "RNGStates",
    "StageRecord",
    "TeacherMismatchError",
    "checkpoint_anchors",
    "checkpoint_channel_layout",
    "checkpoint_class_names",
    "is_onnx_file",
    "load_checked_checkpoint",
    "require_checkpoint_file",
    "safe_load",
    "state_dict_num_classes",
    "unwrapped_state",
]

logger = logging.getLogger(__name__)

# State dict prefixes of a student's distillation state (``ilmil.distill.Distiller``:
# connectors, learned term weights, the adaptive layer weights' running average). It
# is saved with the student so that --resume continues it, but it is no part of the
# detector: a model without it (a teacher, an evaluated or deployed model, the next
# stage's student) skips it. The other prefixes are where checkpoints written before
# the distiller kept that state.
DISTILLATION_STATE_PREFIXES = ("distiller.", "feature_loss.", "rpn_loss.", "rcn_loss.")

_PERIODIC_NAME = re.compile(r"model_(\d+)\.pth$")


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read (truncated, corrupt, or not a checkpoint)."""


class CheckpointClassesError(ValueError):
    """A checkpoint does not hold the classes it is used for."""


class TeacherMismatchError(CheckpointClassesError):
    """The teacher checkpoint does not hold the classes the schedule expects."""


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Builds dicts, lists, numbers, strings and numpy arrays; refuses every other
    global, so a crafted ``.pkl`` cannot run code (``pickle.load`` would)."""

    _ALLOWED = {
        ("collections", "OrderedDict"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only arrays are allowed in a weights file")
        return super().find_class(module, name)


def is_onnx_file(path):
    """Whether ``path`` names an exported ONNX model (``.onnx`` in any case) rather than a checkpoint."""
    return path.lower().endswith(".onnx")


def require_checkpoint_file(path):
    """Raise :class:`CheckpointError` naming ``path`` when no file is there to load."""
    if not os.path.isfile(path):
        what = "is a folder, not a file" if os.path.isdir(path) else "not found"
        raise CheckpointError(f"checkpoint {path} {what}; fix: give the path of a .pth written by ilmil's tools "
                              "(e.g. OUT/stage_0/model_final.pth)")


def safe_load(path):
    """The contents of a checkpoint file, loaded without executing code from it.

    Raises :class:`CheckpointError` naming the file when it is missing or cannot be read.
    """
    if is_onnx_file(path):
        raise CheckpointError(f"{path}: an exported ONNX model, and this takes a .pth checkpoint; fix: give the "
                              "checkpoint it was exported from (an ONNX model runs in tools/predict.py and "
                              "tools/eval_incremental.py)")
    require_checkpoint_file(path)
    try:
        if path.endswith(".pkl"):
            with open(path, "rb") as f:
                data = _ArraysOnlyUnpickler(f, encoding="latin1").load()
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError / UnpicklingError / EOFError / ... on bad files
        message = str(e)
        if "WeightsUnpickler error:" in message:
            # torch's safe loader wraps its reason in advice to load the file unsafely: the reason alone.
            message = message.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
            unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", message)
            if unsafe:
                message = f"it holds a {unsafe.group(1)}, which is not weights and is not loaded"
        reason = " ".join(f"{type(e).__name__}: {message}".split())[:300]  # torch's messages run to many lines
        raise CheckpointError(f"cannot read checkpoint {path} ({reason}): the file is truncated, corrupt or "
                              "not a checkpoint; fix: give a complete checkpoint file") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(data).__name__}, not a dict of weights; "
                              "fix: give a checkpoint written by ilmil's tools or detectron2")
    return data


def _own_state(state):
    """This process's part of a per-process checkpointable's saved state: the list holds one
    per process of the run that saved it; a resume with more processes than that gives the
    extra ones the main process's, a checkpoint of before the list holds one state for all."""
    if not isinstance(state, list):
        return state
    rank = comm.get_rank()
    return state[rank] if rank < len(state) else state[0]


class RNGStates:
    """Checkpointable Python / numpy / torch (CPU and CUDA) random states, so a
    resumed stage continues the random streams instead of restarting them. Each
    process of a torchrun run has its own, saved and restored as its own."""

    per_process = True

    def state_dict(self):
        _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
        version, python_state, gauss_next = random.getstate()
        return {
            # The RCN term's proposal sampling draws from the model's device's generator.
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "torch": torch.get_rng_state(),
            # As tensors and plain numbers: ``weights_only`` loading refuses numpy objects.
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                      "has_gauss": has_gauss, "cached_gaussian": cached_gaussian},
            "python": {"version": version, "state": list(python_state), "gauss_next": gauss_next},
        }

    def load_state_dict(self, state):
        torch.set_rng_state(state["torch"])
        cuda_states = state.get("cuda", [])  # absent in older checkpoints
        if cuda_states and torch.cuda.is_available():
            for device, cuda_state in enumerate(cuda_states[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(cuda_state, device)
        n = state["numpy"]
        np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                             n["has_gauss"], n["cached_gaussian"]))
        p = state["python"]
        random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))


class ProcessBuffers:
    """Checkpointable buffers of the model that each process of a torchrun run updates
    from its own batches (BatchNorm statistics, with DDP's ``broadcast_buffers=False``;
    the adaptive feature weights' running average): the model's state_dict holds the
    main process's, this each process's own, restored to it on resume."""

    per_process = True

    def __init__(self, model):
        self.model = model

    def state_dict(self):
        return {name: buffer.detach().clone() for name, buffer in self.model.named_buffers()}

    def load_state_dict(self, state):
        buffers = dict(self.model.named_buffers())
        with torch.no_grad():
            for name, value in state.items():
                if name in buffers and buffers[name].shape == value.shape:
                    buffers[name].copy_(value)


class LossNormalizer:
    """Checkpointable running normaliser of a dense detector's losses: detectron2's RetinaNet
    and FCOS keep it as a plain attribute (``loss_normalizer``, their positives' moving
    average, per process), outside the state_dict, so a resumed stage restarted it from
    its initial value. Nothing for a detector without one."""

    per_process = True

    def __init__(self, model):
        self.model = model

    def state_dict(self):
        value = getattr(self.model, "loss_normalizer", None)
        return {} if value is None else {"loss_normalizer": float(value)}

    def load_state_dict(self, state):
        if "loss_normalizer" in state:
            self.model.loss_normalizer = state["loss_normalizer"]


class StageRecord:
    """Checkpointable record of the model's classes (in logit order), its channel
    layout, a YOLO detector's anchors and the schedule, saved under the ``ilmil`` key:
    the next stage checks its teacher against it, and every loader rebuilds a pruned
    model's shapes and a YOLO model's anchors from it."""

    def __init__(self, model, class_names, schedule):
        self.model = model
        self.class_names = list(class_names)
        self.schedule = dict(schedule)

    def state_dict(self):
        state = {"class_names": self.class_names, "channel_layout": channel_layout(self.model), **self.schedule}
        anchors = getattr(self.model, "anchors", None)  # YOLO's per-level [w, h] (MODEL.YOLO.ANCHORS)
        if anchors is not None:
            state["anchors"] = [[[float(v) for v in wh] for wh in level] for level in anchors]
        return state

    def load_state_dict(self, state):
        if list(state["class_names"]) != self.class_names:
            raise ValueError(
                f"checkpoint classes {state['class_names']} differ from this stage's {self.class_names}"
            )


def unwrapped_state(state):
    """``state`` without the ``module.`` prefix of a model saved from DistributedDataParallel."""
    if state and all(name.startswith("module.") for name in state):
        return {name[len("module."):]: value for name, value in state.items()}
    return state


def checkpoint_class_names(checkpoint):
    """Class names recorded in an ilmil checkpoint, or None (a plain detectron2 one)."""
    return checkpoint.get("ilmil", {}).get("class_names")


def checkpoint_channel_layout(checkpoint):
    """The channel layout an ilmil checkpoint records ({} for one saved unpruned
    before layouts were recorded, or by plain detectron2)."""
    return dict(checkpoint.get("ilmil", {}).get("channel_layout") or {})


def checkpoint_anchors(checkpoint):
    """The YOLO anchors an ilmil checkpoint records (per level, [w, h] each), or None
    (another detector, or one saved before anchors were recorded)."""
    return checkpoint.get("ilmil", {}).get("anchors")


# The classifier weight of each detector family, as a state dict names it: Faster R-CNN's
# box predictor, and the dense heads' (RetinaNet / FCOS: one conv shared by the levels;
# YOLO: one per level, head.cls_score.<level>), whose box convs give the anchors per location.
CLASSIFIER_KEYS = ("roi_heads.box_predictor.cls_score.weight", "head.cls_score.weight", "head.cls_score.0.weight")


def dense_classifiers(state):
    """``[(class conv, box conv)]`` name prefixes of a dense head's classifiers in ``state``:
    one pair for RetinaNet / FCOS, one per level for YOLO; [] for Faster R-CNN."""
    if "head.cls_score.weight" in state:
        return [("head.cls_score", "head.bbox_pred")]
    levels = 0
    while f"head.cls_score.{levels}.weight" in state:
        levels += 1
    return [(f"head.cls_score.{k}", f"head.bbox_pred.{k}") for k in range(levels)]


def state_dict_num_classes(state):
    """The class count of a detector's state dict, or None when it holds no classifier of
    ``CLASSIFIER_KEYS``: Faster R-CNN's ``cls_score`` rows less the background row; a
    dense head's ``cls_score`` channels divided by the anchors per location, which are
    its box conv's channels / 4."""
    box_predictor = CLASSIFIER_KEYS[0]
    if box_predictor in state:
        return state[box_predictor].shape[0] - 1
    for cls_score, bbox_pred in dense_classifiers(state)[:1]:
        return state[f"{cls_score}.weight"].shape[0] // (state[f"{bbox_pred}.weight"].shape[0] // 4)
    return None


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
    num_classes = state_dict_num_classes(state)
    if num_classes is None:
        raise CheckpointError(f"checkpoint {weights} holds no classifier ({' or '.join(CLASSIFIER_KEYS)}): not a "
                              "Faster R-CNN, RetinaNet, FCOS or YOLO detector; fix: give a detector checkpoint written by "
                              "ilmil's tools")
    if expected_classes is not None:
        names = checkpoint_class_names(checkpoint)
        if num_classes != len(expected_classes) or (names is not None and list(names) != list(expected_classes)):
            found = list(names) if names is not None else f"{num_classes} unnamed classes"
            expected = use.format(n=len(expected_classes))
            raise error(f"checkpoint {weights} holds {found}, but {expected} {list(expected_classes)}: {fix}")
    return checkpoint, num_classes


class IncrementalCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` with atomic saves, safe loads and corrupt-file fallback."""

    def save(self, name, **extra):
        # Every process's state of each per-process checkpointable: a training stage's
        # processes all call save (IncrementalTrainer's checkpointer hook), the main one writes.
        gathered = {key: comm.all_gather(obj.state_dict()) for key, obj in self.checkpointables.items()
                    if getattr(obj, "per_process", False)}
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        data.update({key: gathered[key] if key in gathered else obj.state_dict()
                     for key, obj in self.checkpointables.items()})
        data.update(extra)
        basename = f"{name}.pth"
        path = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to %s", path)
        atomic_write(path, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename):
        atomic_write(os.path.join(self.save_dir, "last_checkpoint"), lambda f: f.write(last_filename_basename), mode="w")

    def _load_file(self, filename):
        self._loading = filename
        data = safe_load(filename)
        if filename.endswith(".pkl"):
            # Model-zoo layouts, as detectron2 reads them: {"model": ..., "__author__": ...}
            # for its own zoo, a bare (or "blobs") dict of arrays from Caffe2 / Detectron1.
            if "model" in data and "__author__" in data:
                return data
            data = data.get("blobs", data)
            data = {k: v for k, v in data.items() if not k.endswith("_momentum")}
            return {"model": data, "__author__": "Caffe2", "matching_heuristics": True}
        data = data if "model" in data else {"model": data}
        # A per-process checkpointable saved one state per process (see save): this process's.
        for key, obj in self.checkpointables.items():
            if getattr(obj, "per_process", False) and key in data:
                data[key] = _own_state(data[key])
        return data

    def _load_model(self, checkpoint):
        own = self.model.state_dict()
        checkpoint["model"] = {
            key: value for key, value in checkpoint["model"].items()
            if key in own or not key.startswith(DISTILLATION_STATE_PREFIXES)
        }
        # Without this, detectron2 would skip every pruned layer's weights with a
        # shape warning and leave them random.
        recorded = checkpoint_channel_layout(checkpoint)
        current = channel_layout(self.model)
        differing = [name for name, width in recorded.items() if current.get(name) != width]
        if differing:
            name = differing[0]
            raise CheckpointError(
                f"checkpoint {self._loading} is pruned: {len(differing)} layer(s) differ in width from this model's "
                f"(e.g. {name}: {recorded[name]} in the checkpoint, {current.get(name)} in the model). Build the "
                "model in the checkpoint's layout: ilmil.modeling.build_detector(with_checkpoint_layout(cfg, "
                "checkpoint)); the toolkit's tools do this by themselves"
            )
        return super()._load_model(checkpoint)

    def resume_candidates(self):
        """Checkpoints to resume from, newest first: the tagged one, then the
        periodic ``model_NNNNNNN.pth`` files by iteration."""
        tagged = self.get_checkpoint_file() if self.has_checkpoint() else ""
        periodic = []
        if self.save_dir and os.path.isdir(self.save_dir):
            for name in os.listdir(self.save_dir):
                match = _PERIODIC_NAME.fullmatch(name)
                if match:
                    periodic.append((int(match.group(1)), os.path.join(self.save_dir, name)))
        ordered = [tagged] if tagged and os.path.isfile(tagged) else []
        ordered += [path for _, path in sorted(periodic, reverse=True) if path not in ordered]
        return ordered

    def resume_or_load(self, path, *, resume=True):
        """Resume from the newest readable checkpoint of ``save_dir`` (all states),
        else load only the model weights of ``path``."""
        if resume:
            skipped = []
            for candidate in self.resume_candidates():
                try:
                    checkpoint = self._load_file(candidate)
                    if "iteration" not in checkpoint:
                        raise CheckpointError(f"checkpoint {candidate} has no training iteration: not a resumable checkpoint")
                except CheckpointError as e:
                    skipped.append(candidate)
                    logger.warning("%s", e)
                    continue
                if skipped:
                    logger.warning(
                        "Skipped unreadable checkpoint(s) %s; resuming from the previous good one, %s",
                        ", ".join(skipped), candidate,
                    )
                # Read again by ``load``, which also syncs the ranks of a distributed run.
                return self.load(candidate)
            if skipped:
                logger.warning("No readable checkpoint in %s (unreadable: %s); starting the stage over",
                               self.save_dir, ", ".join(skipped))
        return self.load(path, checkpointables=[])

