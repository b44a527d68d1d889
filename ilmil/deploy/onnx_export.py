"""ONNX export of a trained detector, its check against PyTorch, and running it
through ONNX Runtime as a detectron2-style model.

What the file holds, for every detector (Faster R-CNN, RetinaNet, FCOS, YOLO): the
whole detector, post-processing included, traced by ``torch.onnx.export``: input
``image``, a float32 [3, H, W] image in the config's ``INPUT.FORMAT`` (BGR for the
shapes configs) already resized as at test time (``preprocess``); outputs ``boxes``
[D, 4] (XYXY in the input's pixels), ``scores`` [D] and ``classes`` [D] (int64, the
index in the class list). Normalisation, the anchors, NMS (ONNX
``NonMaxSuppression``) and, for Faster R-CNN, the RPN and RoIAlign are in the graph;
only the resize to the input size and the rescale of the boxes to the original image
(``OnnxDetector``) stay outside. The file's metadata carries the class names, the
config and the input size, so it is self-contained.

Fixed size (the default): the graph takes [3, H, W] of the export size only; smaller
images are padded at the bottom and right with the pixel mean (what the model's own
padding gives after normalisation). ``dynamic``: any H, W (the graph pads to the
backbone's size divisibility itself).

detectron2 0.6's own exporter (``detectron2.export``) cannot be imported on this stack
(it imports caffe2), so ``torch.onnx.export`` is called directly; its TorchScript-based
path (``dynamo=False``) follows detectron2's tracing branches.
"""
import contextlib
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, Instances

from ..config import config_from_dump, config_overrides, config_value
from ..file_io import atomic_write
from .predict import DeployError
from .trained_model import TrainedModel, score_thresh_key

__all__ = ["ONNX_OPSET", "OnnxDetector", "check_export", "check_file", "check_onnx_opts", "export_onnx",
           "latency_ms", "load_onnx_model", "pad_to", "write_check"]

ONNX_OPSET = 17
# The export check (check_export): detections of this score or more must all be matched
# (PyTorch's by ONNX ones and ONNX's by PyTorch ones), and this share of every PyTorch detection.
CONFIDENT_SCORE = 0.5
MIN_MATCHED_SHARE = 0.99
# The largest score difference of a matched detection (the runtimes agree to ~1e-6).
SCORE_TOLERANCE = 1e-3
_METADATA = "ilmil"


class _Traceable(nn.Module):
    """The detector as a function of one image tensor, returning plain tensors."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image):
        instances = self.model([{"image": image}])[0]["instances"]
        return instances.pred_boxes.tensor, instances.scores, instances.pred_classes


def pad_to(image, size, pixel_mean):
    """``image`` [3, h, w] padded at the bottom and right to ``size`` (H, W) with ``pixel_mean``."""
    height, width = size
    if image.shape[1] > height or image.shape[2] > width:
        raise DeployError(f"an input of {image.shape[1]} x {image.shape[2]} px exceeds the model's fixed input size "
                          f"{height} x {width}; fix: export with --dynamic or a larger --input-size")
    mean = torch.as_tensor(pixel_mean, dtype=image.dtype).view(-1, 1, 1)
    return F.pad(image - mean, (0, width - image.shape[2], 0, height - image.shape[1])) + mean


def export_size(cfg, input_size=None):
    """The fixed (H, W) of an export: ``input_size``, else the test-time maximum size
    rounded up to the backbone's size divisibility (32 covers every detector here)."""
    if input_size:
        return tuple(int(x) for x in input_size)
    side = int(np.ceil(cfg.INPUT.MAX_SIZE_TEST / 32) * 32)
    return side, side


def export_onnx(trained, output, input_size=None, dynamic=False, opset=ONNX_OPSET):
    """Write ``trained`` (a :class:`TrainedModel`) to the ONNX file ``output``; returns its
    metadata (see the module docstring)."""
    import onnx

    cfg = trained.cfg
    height, width = export_size(cfg, input_size)
    divisibility = trained.model.backbone.size_divisibility or 1
    if height % divisibility or width % divisibility:
        raise DeployError(f"--input-size {height} {width}: the backbone needs multiples of {divisibility}; fix: "
                          f"e.g. {height + -height % divisibility} {width + -width % divisibility}")
    example = torch.as_tensor(cfg.MODEL.PIXEL_MEAN, dtype=torch.float32).view(-1, 1, 1).expand(3, height, width)
    example = example + torch.rand(3, height, width) * 64  # a plain image would give no detection to trace
    axes = {"image": {1: "height", 2: "width"}, "boxes": {0: "detections"}, "scores": {0: "detections"},
            "classes": {0: "detections"}}
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(_Traceable(trained.model).eval(), (example.contiguous(),), output, opset_version=opset,
                          dynamo=False, input_names=["image"], output_names=["boxes", "scores", "classes"],
                          dynamic_axes=axes if dynamic else {k: v for k, v in axes.items() if k != "image"})
    metadata = {"class_names": trained.class_names, "input_format": cfg.INPUT.FORMAT, "dynamic": bool(dynamic),
                "input_size": None if dynamic else [height, width], "pixel_mean": list(cfg.MODEL.PIXEL_MEAN),
                "size_divisibility": divisibility, "weights": os.path.abspath(trained.weights), "opset": opset}
    proto = onnx.load(output)
    for key, value in ((_METADATA, json.dumps(metadata)), (f"{_METADATA}.config", cfg.dump())):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, output)
    return metadata


class OnnxDetector:
    """An exported detector run by ONNX Runtime, called like a detectron2 model: a list
    of inputs (``image`` [3, h, w] resized as at test time, optional ``height``, ``width``
    of the original) -> a list of ``{"instances": Instances}`` at the original size.

    ``threads``: ONNX Runtime's intra-op threads (None: its default, all cores).
    """

    def __init__(self, path, threads=None):
        import onnxruntime

        if not os.path.isfile(path):
            raise DeployError(f"{path}: no such ONNX file; fix: export one with tools/export.py")
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        try:
            self.session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own Fail / InvalidGraph / ... types
            raise DeployError(f"{path} is not a loadable ONNX model ({type(e).__name__}: {e}); fix: export it again "
                              "with tools/export.py") from None
        props = self.session.get_modelmeta().custom_metadata_map
        if _METADATA not in props:
            raise DeployError(f"{path} was not exported by ilmil (no '{_METADATA}' metadata): its classes and input "
                              "size are unknown; fix: export it with tools/export.py")
        self.path = path
        try:
            self.metadata = json.loads(props[_METADATA])
        except json.JSONDecodeError as e:
            raise DeployError(f"{path}: its '{_METADATA}' metadata is not valid JSON ({e}); fix: export it again "
                              "with tools/export.py") from None
        self.config_text = props.get(f"{_METADATA}.config", "")
        if not self.config_text:
            raise DeployError(f"{path} holds no '{_METADATA}.config' metadata, so its input size and data are unknown; "
                              "fix: export it again with tools/export.py")
        self.class_names = self.metadata["class_names"]
        # Limits applied to the graph's outputs (None: the file's own); see load_onnx_model.
        self.score_thresh = self.max_detections = None

    def config(self, opts=()):
        """The config the model was exported with (and ``opts``), whole in the file: the run's
        ``ILMIL.PLUGINS`` need not be importable where the file runs."""
        return config_from_dump(self.config_text, opts)

    @property
    def fixed_input_size(self):
        """The graph's fixed (H, W), or None for a dynamic one."""
        size = self.metadata["input_size"]
        return None if size is None else tuple(size)

    def graph_input(self, image):
        """The model input [3, h, w] as the graph takes it: padded to the fixed size if the
        export has one."""
        size = self.fixed_input_size
        return image if size is None else pad_to(image, size, self.metadata["pixel_mean"])

    def run(self, image):
        """(boxes, scores, classes) numpy arrays of one model input [3, h, w] (the boxes are
        in the input's pixels)."""
        boxes, scores, classes = self.session.run(None, {"image": self.graph_input(image).numpy().astype(np.float32)})
        return boxes, scores, classes

    def __call__(self, batched_inputs):
        outputs = []
        for x in batched_inputs:
            image = x["image"].float()
            boxes, scores, classes = self.run(image)
            size = tuple(image.shape[-2:])
            instances = Instances(size, pred_boxes=Boxes(torch.from_numpy(boxes)),
                                  scores=torch.from_numpy(scores), pred_classes=torch.from_numpy(classes).long())
            instances.pred_boxes.clip(size)
            if self.score_thresh is not None:
                instances = instances[instances.scores >= self.score_thresh]
            if self.max_detections is not None:
                instances = instances[instances.scores.argsort(descending=True)[: self.max_detections]]
            outputs.append({"instances": detector_postprocess(instances, x.get("height", size[0]),
                                                              x.get("width", size[1]))})
        return outputs


def check_onnx_opts(path, opts):
    """``opts`` for running the exported model ``path``: the keys its graph holds (the
    detector, its score threshold, its detections per image) would change nothing, so
    they are refused rather than silently ignored; ``MODEL.DEVICE`` is left to the caller."""
    baked = [key for key in config_overrides(opts)[::2] if (key.startswith("MODEL.") and key != "MODEL.DEVICE")
             or key == "TEST.DETECTIONS_PER_IMAGE"]
    if baked:
        raise DeployError(f"{', '.join(baked)}: {path} holds the model as exported, so these keys would change "
                          "nothing; fix: export the checkpoint again with them (tools/export.py ... KEY VALUE)")


def load_onnx_model(path, opts=(), score_thresh=None, max_detections=None, threads=None):
    """The exported model ``path`` as a :class:`TrainedModel` run by ONNX Runtime (what
    ``predict_images`` takes). ``score_thresh`` / ``max_detections`` filter its outputs:
    they can only tighten the limits the file was exported with (looser ones are refused,
    naming the key to export again with); None keeps the file's."""
    check_onnx_opts(path, opts)
    detector = OnnxDetector(path, threads)
    cfg = detector.config(opts)
    key = score_thresh_key(cfg)
    for flag, value, exported_key, looser in (
            ("--score-thresh", score_thresh, key, lambda v, e: v < e),
            ("--max-detections", max_detections, "TEST.DETECTIONS_PER_IMAGE", lambda v, e: v > e)):
        exported = config_value(cfg, exported_key)
        if value is not None and looser(value, exported):
            raise DeployError(f"{flag} {value}: {path} was exported with {exported_key} {exported}, which the "
                              f"file's outputs already apply; fix: {flag} {exported} or tighter, or export the "
                              f"checkpoint again with {exported_key} {value}")
    detector.score_thresh, detector.max_detections = score_thresh, max_detections
    cfg.freeze()
    return TrainedModel(detector, cfg, list(detector.class_names), path)


def _closest(boxes, classes, box, label):
    """(index, relative box difference) of the detection among ``boxes`` of class ``label``
    closest to ``box`` (relative to its largest coordinate, at least 1 px), or None."""
    same_class = np.flatnonzero(classes == label)
    if not len(same_class):
        return None
    diffs = np.abs(boxes[same_class] - box).max(axis=1) / max(float(np.abs(box).max()), 1.0)
    best = int(diffs.argmin())
    return int(same_class[best]), float(diffs[best])


@contextlib.contextmanager
def _without_tf32():
    """Full float32 convolutions and matrix products on a GPU: cuDNN's TF32 (on by default)
    keeps 10 mantissa bits, which can move a score by more than SCORE_TOLERANCE against
    ONNX Runtime's float32 in a correct file."""
    backends = torch.backends
    saved = backends.cudnn.allow_tf32, backends.cuda.matmul.allow_tf32
    backends.cudnn.allow_tf32 = backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        backends.cudnn.allow_tf32, backends.cuda.matmul.allow_tf32 = saved


def check_export(trained, detector, images, tolerance=1e-3):
    """Compare the ONNX Runtime outputs of ``detector`` with ``trained``'s PyTorch model on
    ``images`` (model inputs [3, h, w], each as PyTorch takes it: a fixed-size graph gets it
    padded, and where the padding changes the detections, as it may on images smaller than
    the fixed size, the check fails); returns the figures and whether they pass.

    A PyTorch detection above the score threshold plus a margin (a score right at the
    threshold may fall either side of it in another runtime) is matched when an ONNX
    detection of the same class has a box within ``tolerance`` relative to the box's
    largest coordinate (at least 1 px) and a score within ``SCORE_TOLERANCE``. The check
    passes when every confident detection (score >= ``CONFIDENT_SCORE``) and at least
    ``MIN_MATCHED_SHARE`` of all are matched, and every confident ONNX detection matches a
    PyTorch one the same way (the graph adds none): where two of Faster R-CNN's proposals
    score within float noise of each other, the runtimes' sorts may keep a different one,
    and a low-scoring detection differs (seen: 1 of 349 on 8 shapes images, with the same
    AP50 through both runtimes).
    """
    margin = 1e-4  # scores agree to ~1e-6 between the runtimes
    worst_box, worst_score, matched, compared = 0.0, 0.0, 0, 0
    confident_compared = confident_matched = onnx_confident = onnx_confident_unmatched = 0
    counts = []
    threshold = config_value(trained.cfg, score_thresh_key(trained.cfg)) + margin
    for image in images:
        # PyTorch as it runs unexported (a fixed-size graph's padding must not change the result), in float32.
        with torch.no_grad(), _without_tf32():
            reference = trained.model([{"image": image}])[0]["instances"]
        boxes, scores, classes = detector.run(image)
        # Clipped to the image, as OnnxDetector does (a fixed-size graph clips to its padded size only).
        boxes = np.clip(boxes, 0, [image.shape[2], image.shape[1]] * 2) if len(boxes) else boxes
        counts.append((len(reference), len(boxes)))
        reference = reference.to("cpu")  # a model on a GPU
        ref_boxes, ref_scores = reference.pred_boxes.tensor.numpy(), reference.scores.numpy()
        ref_classes = reference.pred_classes.numpy()
        for box, score, label in zip(ref_boxes, ref_scores, ref_classes):
            if score < threshold:
                continue
            compared += 1
            confident = score >= CONFIDENT_SCORE
            confident_compared += confident
            closest = _closest(boxes, classes, box, label)
            if closest is None:
                continue
            index, box_difference = closest
            worst_box = max(worst_box, box_difference)  # a box out of tolerance too: the figure says by how much
            if box_difference > tolerance:
                continue
            score_difference = float(abs(scores[index] - score))
            worst_score = max(worst_score, score_difference)
            if score_difference <= SCORE_TOLERANCE:
                matched += 1
                confident_matched += confident
        for box, score, label in zip(boxes, scores, classes):
            if score < CONFIDENT_SCORE:
                continue
            onnx_confident += 1
            closest = _closest(ref_boxes, ref_classes, box, label)
            onnx_confident_unmatched += (closest is None or closest[1] > tolerance
                                         or abs(ref_scores[closest[0]] - score) > SCORE_TOLERANCE)
    return {
        "images": len(images),
        "detections_compared": compared,
        "detections_matched": matched,
        "max_relative_box_difference": worst_box,
        "max_score_difference": worst_score,
        "tolerance": tolerance,
        "score_tolerance": SCORE_TOLERANCE,
        "confident_detections_compared": int(confident_compared),
        "confident_detections_matched": int(confident_matched),
        "confident_onnx_detections": int(onnx_confident),
        "confident_onnx_detections_unmatched": int(onnx_confident_unmatched),
        "detections_per_image_pytorch_onnx": counts,
        "passed": (confident_matched == confident_compared and matched >= MIN_MATCHED_SHARE * compared
                   and not onnx_confident_unmatched),
    }


def latency_ms(fn, repeats=50, warmup=5):
    """Median wall time of ``fn()`` in ms over ``repeats`` calls after ``warmup`` ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def check_file(path):
    """Where the check's figures of the model ``path`` go (``model.onnx`` -> ``model.check.json``)."""
    return os.path.splitext(path)[0] + ".check.json"


def write_check(path, figures):
    """The check's figures as json next to the model (``check_file``); the file written."""
    target = check_file(path)
    atomic_write(target, lambda f: json.dump(figures, f, indent=2), mode="w")
    return target
