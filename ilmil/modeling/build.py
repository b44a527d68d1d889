"""Building a detector in the channel layout of a (possibly pruned) checkpoint."""
from detectron2.modeling import build_model

from ..pruning import apply_channel_layout, checkpoint_channel_layout

__all__ = ["build_detector", "with_checkpoint_layout"]


def build_detector(cfg):
    """detectron2's ``build_model``, reshaped to ``cfg.ILMIL.PRUNING.CHANNELS``."""
    model = build_model(cfg)
    return apply_channel_layout(model, dict(cfg.ILMIL.PRUNING.CHANNELS))


def with_checkpoint_layout(cfg, checkpoint):
    """A copy of ``cfg`` whose ``ILMIL.PRUNING.CHANNELS`` is the layout ``checkpoint`` records."""
    cfg = cfg.clone()
    frozen = cfg.is_frozen()
    cfg.defrost()
    cfg.ILMIL.PRUNING.CHANNELS = [[name, int(width)] for name, width in checkpoint_channel_layout(checkpoint).items()]
    if frozen:
        cfg.freeze()
    return cfg
