from .runner import IncrementalRun, resolve_class_order, run_incremental
from .trainer import IncrementalTrainer

__all__ = ["IncrementalRun", "IncrementalTrainer", "resolve_class_order", "run_incremental"]
