"""Structured pruning of a model: a smaller student that still remembers (channels.py),
and its size / speed measured (measure.py). Model-level only: pruning a checkpoint at
a stage boundary, with fine-tuning by the trainer, is ``ilmil.engine.pruning_stage``."""
from .channels import PruningError, apply_channel_layout, channel_layout, prunable_layers, prune_l1
from .measure import format_pruning_table, measure_model

__all__ = [
    "PruningError",
    "apply_channel_layout",
    "channel_layout",
    "format_pruning_table",
    "measure_model",
    "prunable_layers",
    "prune_l1",
]
