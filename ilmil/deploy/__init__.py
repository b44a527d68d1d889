"""Deployment: a trained model found from its checkpoint, run on one's own images,
exported to ONNX (checked against PyTorch) and run through ONNX Runtime."""
from .onnx_export import (ONNX_OPSET, OnnxDetector, check_export, check_file, check_onnx_opts, export_onnx,
                          latency_ms, load_onnx_model, pad_to, write_check)
from .predict import IMAGE_EXTENSIONS, DeployError, input_images, predict_images, preprocess
from .trained_model import TrainedModel, check_default_config_fits, load_trained_model, run_config_of, score_thresh_key

__all__ = [
    "IMAGE_EXTENSIONS",
    "ONNX_OPSET",
    "DeployError",
    "OnnxDetector",
    "TrainedModel",
    "check_export",
    "check_file",
    "check_default_config_fits",
    "check_onnx_opts",
    "export_onnx",
    "input_images",
    "latency_ms",
    "load_onnx_model",
    "load_trained_model",
    "pad_to",
    "predict_images",
    "preprocess",
    "run_config_of",
    "score_thresh_key",
    "write_check",
]
