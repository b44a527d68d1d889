"""Structured pruning: a smaller student that still remembers (channels.py), and
its size / speed measured (measure.py). The stage-boundary workflow (prune,
fine-tune, report) is in ``ilmil.pruning.workflow``, which needs the engine."""
from .channels import PruningError, apply_channel_layout, channel_layout, prunable_layers, prune_l1
from .measure import format_pruning_table, measure_model

__all__ = [
    "PruningError",
    "apply_channel_layout",
    "channel_layout",
    "checkpoint_channel_layout",
    "format_pruning_table",
    "measure_model",
    "prunable_layers",
    "prune_l1",
]


def checkpoint_channel_layout(checkpoint):
    """The channel layout an ilmil checkpoint records ({} for one saved unpruned
    before layouts were recorded, or by plain detectron2)."""
    return dict(checkpoint.get("ilmil", {}).get("channel_layout") or {})
