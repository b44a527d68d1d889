"""A trained model, found from its checkpoint alone: its classes (the checkpoint's ilmil
record), its config (the ``config.yaml`` of the run folder the checkpoint lies in, or
one given) and its channel layout (a pruned model is rebuilt at its real widths)."""
import os
from dataclasses import dataclass

import torch

from ..checkpoint import CheckpointError, checkpoint_class_names, safe_load
from ..config import (ConfigError, check_device, check_test_input, config_overrides, config_value, derived_cfg,
                      get_ilmil_cfg, num_classes_changes)
from ..data import shape_class_names
from ..data.shapes import MAX_CLASSES
from ..modeling import load_detector

__all__ = ["TrainedModel", "check_default_config_fits", "load_trained_model", "run_config_of", "score_thresh_key"]

# The test-time score-threshold key of each one-stage detector ilmil builds, by the part of
# its meta-architecture's name (IncrementalRetinaNet is a RetinaNet); Faster R-CNN's otherwise.
_DENSE_SCORE_THRESH_KEYS = (("RetinaNet", "MODEL.RETINANET.SCORE_THRESH_TEST"), ("FCOS", "MODEL.FCOS.SCORE_THRESH_TEST"),
                            ("YOLO", "MODEL.YOLO.SCORE_THRESH_TEST"))
# Run folders hold checkpoints one or two levels down (OUT/stage_0/model_final.pth).
_RUN_DEPTH = 3


@dataclass
class TrainedModel:
    """A detector in eval mode, the frozen config it was built from and its class names."""

    model: object
    cfg: object
    class_names: list
    weights: str


def run_config_of(weights):
    """The ``config.yaml`` of the run folder holding ``weights`` (its folder or one of the
    ``_RUN_DEPTH - 1`` above), or None."""
    folder = os.path.dirname(os.path.abspath(weights))
    for _ in range(_RUN_DEPTH):
        candidate = os.path.join(folder, "config.yaml")
        if os.path.isfile(candidate):
            return candidate
        folder = os.path.dirname(folder)
    return None


def check_default_config_fits(weights, cfg):
    """For ``weights`` of no run, evaluated or pruned with the default config: when its data
    is the shapes set, refuse a checkpoint of other classes now (the shapes data would be
    generated and checked before the mismatch showed)."""
    if cfg.ILMIL.DATASET != "shapes":
        return
    others = [name for name in checkpoint_class_names(safe_load(weights)) or ()
              if name not in shape_class_names(MAX_CLASSES)]
    if others:
        raise CheckpointError(
            f"--weights {weights}: no config.yaml in its folder or the {_RUN_DEPTH - 1} above, and its classes "
            f"({', '.join(others[:5])}{', ...' if len(others) > 5 else ''}) are not the shapes data's, the default; "
            "fix: give --config-file (the config.yaml of the run it came from) or --dataset")


def score_thresh_key(cfg):
    """The config key of ``cfg``'s detector's test-time score threshold."""
    arch = cfg.MODEL.META_ARCHITECTURE
    return next((key for part, key in _DENSE_SCORE_THRESH_KEYS if part in arch), "MODEL.ROI_HEADS.SCORE_THRESH_TEST")


def load_trained_model(weights, config_file=None, opts=(), score_thresh=None, max_detections=None,
                       default_limits=None):
    """The model of the ilmil checkpoint ``weights`` (see the module docstring).

    Args:
        config_file: the config it was trained with; default its run's ``config.yaml``.
        opts: ``KEY VALUE`` config overrides.
        score_thresh, max_detections: the detector's test-time score threshold and
            detections per image (None: the config's); given with the detector's own key
            in ``opts`` too, refused (``--score-thresh`` / ``--max-detections`` in the message).
        default_limits: (score threshold, detections per image) in place of a None above,
            unless ``opts`` set that key.
    Raises :class:`CheckpointError` for weights of no known run, naming the fix.
    """
    checkpoint = safe_load(weights)
    class_names = checkpoint_class_names(checkpoint)
    if not class_names:
        raise CheckpointError(f"--weights {weights} records no class names: not a model trained by ilmil's tools; "
                              "fix: give a checkpoint of a run folder (e.g. OUT/stage_0/model_final.pth)")
    config_file = config_file or run_config_of(weights)
    if config_file is None:
        raise CheckpointError(f"--weights {weights}: no config.yaml in its folder or the {_RUN_DEPTH - 1} above, so "
                              "its detector is unknown; fix: give --config-file (the config.yaml of the run it came "
                              "from)")
    cfg = get_ilmil_cfg(config_file, opts)
    changes = {**num_classes_changes(len(class_names)), "MODEL.WEIGHTS": "", "ILMIL.TEACHER.WEIGHTS": ""}
    if "MODEL.DEVICE" not in config_overrides(opts)[::2] and not torch.cuda.is_available():
        changes["MODEL.DEVICE"] = "cpu"  # trained on a GPU, run here: the weights are the same
    given = config_overrides(opts)[::2]
    limits = (("--score-thresh", score_thresh_key(cfg), score_thresh),
              ("--max-detections", "TEST.DETECTIONS_PER_IMAGE", max_detections))
    for (flag, key, value), default in zip(limits, default_limits or (None, None)):
        if value is not None and key in given:
            raise ConfigError(f"{flag} {value} and {key} set the same limit; fix: give one of them")
        if value is None and key not in given:
            value = default
        if value is not None:
            changes[key] = type(config_value(cfg, key))(value)
    cfg = derived_cfg(cfg, changes)
    check_device(cfg)
    check_test_input(cfg)
    cfg.freeze()
    model = load_detector(cfg, weights, checkpoint).eval()
    return TrainedModel(model, cfg, list(class_names), weights)
