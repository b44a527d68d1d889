"""Building a detector in the layout of a checkpoint: the channel widths of a (possibly
pruned) model, and a YOLO model's anchors."""
from detectron2.modeling import build_model

from ..checkpoint import (CheckpointError, IncrementalCheckpointer, checkpoint_anchors, checkpoint_channel_layout,
                          safe_load, unwrapped_state)
from ..config import ConfigError, derived_cfg
from ..pruning import PruningError, apply_channel_layout

__all__ = ["build_detector", "load_detector", "with_checkpoint_layout"]


def build_detector(cfg):
    """detectron2's ``build_model``, reshaped to ``cfg.ILMIL.PRUNING.CHANNELS``. A MODEL
    key the model cannot be built with (detectron2 asserts, or looks the value up in a
    table) is a :class:`ConfigError` that gives detectron2's reason."""
    try:
        model = build_model(cfg)
    except ConfigError:
        raise
    except (AssertionError, KeyError, ValueError) as e:
        if _raised_in_package(e):  # a bug of ours, not a key the libraries refuse: its traceback
            raise
        raise ConfigError(f"MODEL.META_ARCHITECTURE {cfg.MODEL.META_ARCHITECTURE} cannot be built from the config's "
                          f"MODEL keys ({type(e).__name__}: {e}); fix: check the MODEL keys of the config file and "
                          "the overrides") from e
    return apply_channel_layout(model, dict(cfg.ILMIL.PRUNING.CHANNELS))


def _raised_in_package(error):
    """Whether ``error`` was raised by ilmil's own code: its innermost frame's module (a
    module name, unlike a file path, does not depend on how the package was installed)."""
    frame = error.__traceback__
    while frame.tb_next is not None:
        frame = frame.tb_next
    return frame.tb_frame.f_globals.get("__name__", "").split(".")[0] == __name__.split(".")[0]


def load_detector(cfg, weights, checkpoint=None):
    """The detector of ``cfg`` in the channel layout of ``weights``, its weights loaded
    (leniently, as detectron2 does: a student's distillation state is skipped).
    ``checkpoint``: the file's contents, when the caller has read them already."""
    if checkpoint is None:
        checkpoint = safe_load(weights)
    try:
        model = build_detector(with_checkpoint_layout(cfg, checkpoint))
    except PruningError as e:  # a layout of another architecture's layers: a checkpoint of another model
        raise CheckpointError(f"checkpoint {weights} does not fit the config's model: {e}; fix: give the "
                              "--config-file the model was trained with (a run's config.yaml)") from None
    if not weights.endswith(".pkl"):  # model-zoo names are matched to the model's only when loading
        _check_architecture(model, checkpoint.get("model", checkpoint), weights)
    IncrementalCheckpointer(model).load(weights)
    return model


def _check_architecture(model, state, weights):
    """Refuse weights of another architecture: detectron2 would only warn and leave
    the layers that do not fit at their random initialisation."""
    own = model.state_dict()
    state = unwrapped_state(state)
    found = {name: tuple(getattr(state[name], "shape", ())) if name in state else "missing" for name in own}
    misfits = [(name, found[name]) for name, value in own.items() if found[name] != tuple(value.shape)]
    if misfits:
        name, there = misfits[0]
        raise CheckpointError(
            f"checkpoint {weights} does not fit the config's model: {len(misfits)} of the model's {len(own)} "
            f"tensors are missing or of another shape (e.g. {name}: {there} in the checkpoint, "
            f"{tuple(own[name].shape)} in the model); fix: give the --config-file the model was trained with "
            "(a run's config.yaml)"
        )


def with_checkpoint_layout(cfg, checkpoint):
    """A copy of ``cfg`` whose ``ILMIL.PRUNING.CHANNELS`` is the layout ``checkpoint``
    records, and whose ``MODEL.YOLO.ANCHORS`` are its anchors if it records them (a
    YOLO model decodes its boxes with the anchors it was trained with, whatever the
    config says)."""
    layout = checkpoint_channel_layout(checkpoint)
    changes = {"ILMIL.PRUNING.CHANNELS": [[name, int(width)] for name, width in layout.items()]}
    anchors = checkpoint_anchors(checkpoint)
    if anchors:
        changes["MODEL.YOLO.ANCHORS"] = anchors
    return derived_cfg(cfg, changes)
