"""Building a detector in the channel layout of a (possibly pruned) checkpoint."""
from detectron2.modeling import build_model

from ..checkpoint import IncrementalCheckpointer, safe_load
from ..pruning import apply_channel_layout, checkpoint_channel_layout

__all__ = ["build_detector", "load_detector", "with_checkpoint_layout"]


def build_detector(cfg):
    """detectron2's ``build_model``, reshaped to ``cfg.ILMIL.PRUNING.CHANNELS``."""
    model = build_model(cfg)
    return apply_channel_layout(model, dict(cfg.ILMIL.PRUNING.CHANNELS))


def load_detector(cfg, weights, checkpoint=None):
    """The detector of ``cfg`` in the channel layout of ``weights``, its weights loaded
    (leniently, as detectron2 does: a student's distillation state is skipped).
    ``checkpoint``: the file's contents, when the caller has read them already."""
    if checkpoint is None:
        checkpoint = safe_load(weights)
    model = build_detector(with_checkpoint_layout(cfg, checkpoint))
    IncrementalCheckpointer(model).load(weights)
    return model


def with_checkpoint_layout(cfg, checkpoint):
    """A copy of ``cfg`` whose ``ILMIL.PRUNING.CHANNELS`` is the layout ``checkpoint`` records."""
    cfg = cfg.clone()
    frozen = cfg.is_frozen()
    cfg.defrost()
    cfg.ILMIL.PRUNING.CHANNELS = [[name, int(width)] for name, width in checkpoint_channel_layout(checkpoint).items()]
    if frozen:
        cfg.freeze()
    return cfg
