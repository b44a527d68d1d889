from .cli import add_run_arguments, run_tool_main, setup_run, tool_parser
from .compression import CompressionChain, CompressionRun, compression_run, run_compression
from .launch import init_distributed, main_process_first
from .run_dir import RUN_RECORDS, RunDirError, RunValidationError, require_output_dir
from .runner import RUN_ERRORS, IncrementalRun, resolve_class_order, run_incremental
from .trainer import IncrementalTrainer, NonFiniteLossError

__all__ = [
    "add_run_arguments",
    "CompressionChain",
    "CompressionRun",
    "compression_run",
    "RUN_ERRORS",
    "RUN_RECORDS",
    "IncrementalRun",
    "IncrementalTrainer",
    "init_distributed",
    "main_process_first",
    "NonFiniteLossError",
    "RunDirError",
    "RunValidationError",
    "require_output_dir",
    "resolve_class_order",
    "run_compression",
    "run_incremental",
    "run_tool_main",
    "setup_run",
    "tool_parser",
]
