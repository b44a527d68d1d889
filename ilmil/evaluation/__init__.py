"""Evaluation of class-incremental runs: per-class COCO and VOC AP after each stage,
old/new/all averages, forgetting and retention, and the files of a finished run."""
from .comparison import compare_runs
from .forgetting import add_forgetting, per_class_metrics
from .incremental_evaluator import (
    IncrementalEvaluator,
    class_agnostic_coco_ap,
    coco_ground_truth,
    per_class_coco_ap,
    summarize_old_new,
)
from .model_evaluation import evaluate_checkpoint, evaluate_model, evaluate_run
from .report import format_report, format_results_table
from .run_outputs import (
    PER_CLASS_CSV,
    NotARunError,
    finalize_run,
    load_run_results,
    read_results,
    run_folder,
    write_per_class_csv,
    write_run_outputs,
)
from .voc_ap import VOC_METRICS, voc_ap, voc_per_class_ap

__all__ = [
    "IncrementalEvaluator",
    "NotARunError",
    "PER_CLASS_CSV",
    "VOC_METRICS",
    "add_forgetting",
    "class_agnostic_coco_ap",
    "compare_runs",
    "coco_ground_truth",
    "evaluate_checkpoint",
    "evaluate_model",
    "evaluate_run",
    "finalize_run",
    "format_report",
    "format_results_table",
    "load_run_results",
    "per_class_coco_ap",
    "per_class_metrics",
    "read_results",
    "run_folder",
    "summarize_old_new",
    "voc_ap",
    "voc_per_class_ap",
    "write_per_class_csv",
    "write_run_outputs",
]
