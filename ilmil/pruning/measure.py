"""Size and speed of a detector: parameters, GFLOPs (fvcore's counter) and latency
per image on the device it is on."""
import statistics
import time

import torch
from fvcore.nn import FlopCountAnalysis
from torch import nn

__all__ = ["format_pruning_table", "measure_model"]


def measure_model(model, image, latency_repeats=20, skip_prefixes=()):
    """Parameters, GFLOPs and median latency of ``model`` (eval mode) on one image.

    Args:
        image: a CHW uint8/float tensor, e.g. a test image at the config's test size.
        skip_prefixes: parameter names of modules that are no part of the deployed
            model (a student's distillation modules), left out of ``params``.
    Returns:
        dict with ``params``, ``gflops`` (whole detector: backbone, FPN, RPN, box
        head on the proposals of this image), ``gflops_backbone`` (backbone + FPN,
        independent of the proposals), ``latency_ms`` (median of
        ``latency_repeats`` timed passes after 2 warm-up passes) and
        ``latency_device`` (``cpu`` or ``cuda``: the model's device).
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    inputs = [{"image": image, "height": image.shape[1], "width": image.shape[2]}]
    try:
        with torch.no_grad():
            gflops = _flops(_TensorsOnly(model, lambda image: model([dict(inputs[0], image=image)])), image)
            gflops_backbone = _flops(_TensorsOnly(model.backbone, model.backbone), model.preprocess_image(inputs).tensor)
            times = []
            for i in range(latency_repeats + 2):
                start = time.perf_counter()
                model(inputs)
                if device.type == "cuda":  # CUDA runs asynchronously: the pass ends when the GPU is done
                    torch.cuda.synchronize(device)
                if i >= 2:
                    times.append(time.perf_counter() - start)
        return {
            "params": sum(p.numel() for name, p in model.named_parameters() if not name.startswith(skip_prefixes)),
            "gflops": gflops,
            "gflops_backbone": gflops_backbone,
            "latency_ms": 1000 * statistics.median(times),
            "latency_device": device.type,
        }
    finally:
        model.train(was_training)


class _TensorsOnly(nn.Module):
    """``fn``'s output flattened to a tuple of tensors, as jit tracing (fvcore's
    counter) needs. detectron2 0.6's own adapter (``detectron2.utils.analysis``)
    cannot be imported on this stack: ``detectron2.export`` imports caffe2."""

    def __init__(self, module, fn):
        super().__init__()
        self.module, self.fn = module, fn

    def forward(self, x):
        return tuple(_tensors(self.fn(x)))


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)
    elif hasattr(value, "get_fields"):  # detectron2 Instances
        yield from _tensors(value.get_fields())
    elif hasattr(value, "tensor"):  # detectron2 Boxes
        yield value.tensor


def _flops(module, x):
    analysis = FlopCountAnalysis(module, (x,)).unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return analysis.total() / 1e9


def format_pruning_table(summary):
    """A markdown table of a pruning summary: before, after, change."""
    rows = [("parameters (M)", "params", 1e-6), ("GFLOPs, whole detector", "gflops", 1),
            ("GFLOPs, backbone + FPN", "gflops_backbone", 1),
            (f"{summary['before'].get('latency_device', 'cpu').upper()} latency (ms / image)", "latency_ms", 1),
            ("AP50 (all classes)", "AP50", 1)]
    lines = ["| | before | after | change |", "|---|---|---|---|"]
    for label, key, scale in rows:
        b, a = summary["before"].get(key), summary["after"].get(key)
        if b is None or a is None:
            lines.append(f"| {label} | n/a | n/a | |")
            continue
        change = f"{a - b:+.1f} points" if key == "AP50" else f"{100 * (a - b) / b:+.1f} %"
        lines.append(f"| {label} | {b * scale:.3g} | {a * scale:.3g} | {change} |")
    return "\n".join(lines)
