from .incremental_evaluator import IncrementalEvaluator, coco_ground_truth, per_class_coco_ap, summarize_old_new
from .report import format_results_table

__all__ = [
    "IncrementalEvaluator",
    "coco_ground_truth",
    "format_results_table",
    "per_class_coco_ap",
    "summarize_old_new",
]
