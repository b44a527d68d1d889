"""Running a trained model on one's own images (``tools/predict.py``): each image
written with its boxes, class names and scores drawn, and all detections in one
COCO-format json (``images``, ``categories``, ``annotations`` with a ``score``), which
``pycocotools.coco.COCO`` loads."""
import json
import logging
import os

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from detectron2.data import detection_utils
from detectron2.data import transforms as T
from detectron2.utils.visualizer import Visualizer

from ..file_io import atomic_write

__all__ = ["IMAGE_EXTENSIONS", "DeployError", "input_images", "predict_images", "preprocess"]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class DeployError(ValueError):
    """A bad input of the deployment tools (an image, a folder, an exported model)."""


def input_images(path):
    """The image files of ``path``: itself, or the images of the folder (sorted)."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise DeployError(f"--input {path}: no such file or folder; fix: give an image or a folder of images")
    images = sorted(os.path.join(path, name) for name in os.listdir(path)
                    if name.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(path, name)))
    if not images:
        raise DeployError(f"--input {path}: the folder holds no image ({', '.join(IMAGE_EXTENSIONS)}); fix: give a "
                          "folder of images")
    return images


# PIL modes of more than 8 bits per channel: detectron2's conversion clips them to 255 (a white image).
_WIDE_MODES = ("I", "F", "I;16", "I;16L", "I;16B", "I;16N")


def read_image(path, image_format):
    """The image of ``path`` as detectron2 reads it (HWC uint8 in ``image_format``)."""
    try:
        with Image.open(path) as image:
            mode = image.mode
        if mode not in _WIDE_MODES:
            return detection_utils.read_image(path, format=image_format)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise DeployError(f"image {path} cannot be read ({type(e).__name__}: {e}); fix: give a readable "
                          f"{'/'.join(IMAGE_EXTENSIONS)} file") from None
    raise DeployError(f"image {path} has {mode} pixels (16-bit or float), which would be read as white; fix: "
                      "convert it to 8 bits per channel")


def preprocess(cfg, image):
    """The model input of an HWC image: resized as at test time, CHW float32."""
    resize = T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST).get_transform(image)
    if min(getattr(resize, "new_h", 1), getattr(resize, "new_w", 1)) < 1:  # INPUT.MIN_SIZE_TEST 0: no resize
        raise DeployError(f"a {image.shape[1]} x {image.shape[0]} px image resizes to {resize.new_w} x {resize.new_h} "
                          f"px at test time (INPUT.MIN_SIZE_TEST {cfg.INPUT.MIN_SIZE_TEST}, MAX_SIZE_TEST "
                          f"{cfg.INPUT.MAX_SIZE_TEST}); fix: crop it to a less elongated shape")
    resized = resize.apply_image(image)
    return torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)).astype("float32"))


def drawn_image_path(output_dir, path):
    """Where the drawn copy of image ``path`` goes: its name, as a PNG unless it is a JPEG
    or PNG (``photo.bmp`` -> ``photo.bmp.png``, apart from a ``photo.png`` beside it)."""
    name = os.path.basename(path)
    return os.path.join(output_dir, name if name.lower().endswith((".jpg", ".jpeg", ".png")) else name + ".png")


def predict_images(trained, paths, output_dir, progress=True):
    """Detections of ``trained`` (a :class:`TrainedModel`) on the images ``paths``; the
    drawn images and ``detections.json`` go to ``output_dir``. Returns the json's path."""
    drawn_from = {}
    for path in paths:
        drawn = drawn_image_path(output_dir, path)
        if os.path.exists(drawn) and os.path.samefile(drawn, path):
            raise DeployError(f"--output-dir {output_dir} holds the input image {path}, which its drawn copy would "
                              "overwrite; fix: give another folder")
        if drawn in drawn_from:
            raise DeployError(f"{drawn_from[drawn]} and {path} would both be drawn to {drawn}; fix: rename one")
        drawn_from[drawn] = path
    os.makedirs(output_dir, exist_ok=True)
    cfg, model = trained.cfg, trained.model
    fixed_size = getattr(model, "fixed_input_size", None)  # an exported model of a fixed input size
    images, annotations, unreadable, padded = [], [], [], []
    for image_id, path in enumerate(tqdm(paths, desc="predicting", unit="image", disable=not progress), start=1):
        try:
            image = read_image(path, cfg.INPUT.FORMAT)
            height, width = image.shape[:2]
            model_input = preprocess(cfg, image)
            with torch.no_grad():  # an exported model of a fixed size refuses a larger input
                output = model([{"image": model_input, "height": height, "width": width}])
        except DeployError as e:  # the other images' detections are kept; the error comes after them
            unreadable.append(str(e) if path in str(e) else f"image {path}: {e}")
            continue
        if fixed_size and tuple(model_input.shape[1:]) != fixed_size:
            padded.append((path, tuple(model_input.shape[1:])))
        instances = output[0]["instances"].to("cpu")
        name = os.path.basename(path)
        images.append({"id": image_id, "file_name": name, "height": height, "width": width})
        for box, score, label in zip(instances.pred_boxes.tensor.tolist(), instances.scores.tolist(),
                                     instances.pred_classes.tolist()):
            x0, y0, x1, y1 = box
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": label + 1,
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                                "score": score, "iscrowd": 0})
        _draw(image, instances, trained.class_names, cfg.INPUT.FORMAT, drawn_image_path(output_dir, path))
    detections = {"images": images, "annotations": annotations,
                  "categories": [{"id": k + 1, "name": c} for k, c in enumerate(trained.class_names)]}
    path = os.path.join(output_dir, "detections.json")
    atomic_write(path, lambda f: json.dump(detections, f), mode="w")
    if padded:
        logger.warning(
            "warning: %d of %d image(s) (the first: %s, %d x %d px after the test-time resize) were padded to the "
            "model's fixed input of %d x %d px, and the padding can change detections (a GroupNorm head's "
            "statistics, boxes near the padded border); fix: for images of other shapes export with --dynamic",
            len(padded), len(paths), padded[0][0], *padded[0][1][::-1], *fixed_size[::-1])
    if unreadable:
        raise DeployError(f"{len(unreadable)} of {len(paths)} image(s) skipped (the detections of the other "
                          f"{len(images)} are in {path}); the first: {unreadable[0]}")
    return path


def _draw(image, instances, class_names, image_format, path):
    rgb = detection_utils.convert_image_to_rgb(image, image_format)
    visualizer = Visualizer(rgb)
    labels = [f"{class_names[c]} {s:.2f}" for c, s in zip(instances.pred_classes.tolist(), instances.scores.tolist())]
    drawn = visualizer.overlay_instances(boxes=instances.pred_boxes.tensor.numpy(), labels=labels).get_image()
    Image.fromarray(drawn).save(path)
