from .datasets import (
    BUILTIN_DATASETS,
    VOC_CLASSES,
    DATA_PROBLEMS_FIX,
    MAX_LISTED_PROBLEMS,
    DatasetError,
    DatasetSource,
    datasets_root,
    load_coco_json,
    load_dataset_source,
    load_voc_split,
    problem_lines,
    register_stage_datasets,
)
from .shapes import generate_shapes_dataset, shape_class_names
from .stages import Stage, StageSpecError, build_schedule, parse_stage_spec, stage_test_dicts, stage_train_dicts

__all__ = [
    "BUILTIN_DATASETS",
    "VOC_CLASSES",
    "DATA_PROBLEMS_FIX",
    "MAX_LISTED_PROBLEMS",
    "DatasetError",
    "DatasetSource",
    "Stage",
    "StageSpecError",
    "build_schedule",
    "datasets_root",
    "generate_shapes_dataset",
    "load_coco_json",
    "load_dataset_source",
    "load_voc_split",
    "parse_stage_spec",
    "problem_lines",
    "register_stage_datasets",
    "shape_class_names",
    "stage_test_dicts",
    "stage_train_dicts",
]
