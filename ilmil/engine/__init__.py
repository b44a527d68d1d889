from .run_dir import RunDirError, RunValidationError
from .runner import RUN_ERRORS, IncrementalRun, resolve_class_order, run_incremental
from .trainer import IncrementalTrainer, NonFiniteLossError

__all__ = [
    "RUN_ERRORS",
    "IncrementalRun",
    "IncrementalTrainer",
    "NonFiniteLossError",
    "RunDirError",
    "RunValidationError",
    "resolve_class_order",
    "run_incremental",
]
