"""Deterministic generator of the embedded "shapes" detection dataset.

The dataset stands in for PASCAL VOC / COCO in tests and small experiments: it is
generated on the fly (no download), written in *both* real on-disk formats (Pascal
VOC XML + ImageSets and COCO instances JSON, sharing one ``JPEGImages`` folder) and
cached by its parameters.

Classes are ``<kind>_<style>``: 20 shape kinds (circle, square, ..., bowtie) times
4 fill styles (filled, outline, striped = hatched fill, dotted = polka-dot fill),
up to 80 classes. The first 20 classes are the first 10 kinds x {filled, outline},
so every smaller class list is a prefix of the 80-class one.

Why it is hard (a plain version, solid shapes on noise, gave AP50 ~93 for a small
Faster R-CNN, which leaves no room to see forgetting or its repair):

* several objects of *different* classes per image, drawn from the whole class
  list, so images annotated for a later task also contain unlabelled objects of
  earlier classes, as in real class-incremental splits;
* sizes 12-96 px (at 256 px, uniform), random rotation, aspect-ratio jitter, objects cut by
  the image border (``truncated``) and partially occluding each other (at most
  ~40 % of an object may be hidden; its box stays the box of the full shape);
* textured backgrounds (gradients, low-frequency noise, stripes / checkers) whose
  colours overlap the object colours, plus clutter that is *not* an object:
  lines, arcs, broken (open) outlines, small blobs, text-like scribbles;
* object colours independent of class, rarely of low contrast, per-image
  brightness / contrast jitter, occasional blur, pixel noise, JPEG compression.

That is the "hard" difficulty, the benchmark set. The "easy" one (``DIFFICULTIES``)
keeps the classes and formats but draws 1-3 larger, barely overlapping objects on
plain noisy backgrounds without clutter or blur: a from-scratch detector learns it
within minutes on a CPU, which is what ``make demo`` needs.

Every image is rendered from its own random generator seeded by
``(seed, split, index within split)``, so the output is byte-identical for equal
parameters and an image does not depend on how many others are generated.
"""
import json
import os
import shutil
import string
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from functools import lru_cache

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

__all__ = ["DIFFICULTIES", "shape_class_names", "dataset_dirname", "generate_shapes_dataset"]

GENERATOR_VERSION = 5  # v5: at most 40 % occluded, less clutter and blur, more regular shapes

SHAPE_KINDS = (
    # The first 10 kinds make up the 20-class set (with the first 2 styles).
    "circle", "square", "triangle", "pentagon", "hexagon",
    "star", "cross", "heart", "arrow", "crescent",
    "diamond", "trapezoid", "semicircle", "ell", "tee",
    "ring", "chevron", "teardrop", "sparkle", "bowtie",
)
SHAPE_STYLES = ("filled", "outline", "striped", "dotted")
MAX_CLASSES = len(SHAPE_KINDS) * len(SHAPE_STYLES)

JPEG_QUALITY = 90
REFERENCE_SIZE = 256  # pixel sizes below are given for a 256 x 256 image
MIN_INSIDE_FRACTION = 0.5  # of the full box area, for objects cut by the border
PLACEMENT_TRIES = 8
MIN_CONTRAST, MIN_CONTRAST_TRIES = 100.0, 10  # RGB distance to the local background
ASPECT_RANGE = (0.85, 1.18)  # box aspect jitter; wider makes polygons look alike


@dataclass(frozen=True)
class Difficulty:
    """The generator's difficulty knobs (pixel sizes at ``REFERENCE_SIZE``)."""

    object_size: tuple  # longer box side, [low, high)
    max_objects: int
    min_visible_fraction: float  # an object may be at most 1 - this hidden by later ones
    low_contrast_fraction: float
    clutter_items: tuple  # per image behind the objects, [low, high)
    overlay_lines: tuple  # thin lines drawn over the objects, [low, high)
    texture_probability: float  # stripes / checker over the background
    texture_alpha: tuple
    blob_amplitude: tuple  # low-frequency background noise
    blur_probability: float
    # Objects painted in a colour of their class (a fixed hue each, jittered) on grey
    # backgrounds, instead of a colour unrelated to the class.
    class_colours: bool = False


DIFFICULTIES = {
    # The benchmark set, calibrated so that joint training at the CPU benchmark budget
    # lands in the AP50 60-85 band (v1's 20 % low contrast, 4-14 clutter items and 1 px
    # outlines gave AP50 6 after 2000 iterations: too hard to tell methods apart).
    # v4 (the contrast floor, sizes uniform instead of log-uniform in 12-96 px): joint
    # AP50 21.6 -> 32.5 at the benchmark budget; v5 (the occlusion, clutter, blur and
    # aspect values here) with 128 sampled ROIs per image: 57.9 -> 63.7 (BENCHMARKS.md).
    "hard": Difficulty(object_size=(12, 96), max_objects=6, min_visible_fraction=0.6,
                       low_contrast_fraction=0.03, clutter_items=(0, 4), overlay_lines=(0, 3),
                       texture_probability=0.3, texture_alpha=(0.1, 0.3), blob_amplitude=(10, 35),
                       blur_probability=0.05),
    # The demo's set: fewer, larger, barely overlapping objects in their class's colour
    # on plain grey backgrounds, so a detector trained from scratch converges within
    # minutes on a CPU. Without the class colours, 5 of its classes reached only AP50 ~25
    # after 1000 iterations: circles, pentagons and hexagons of 16-48 px look alike.
    "easy": Difficulty(object_size=(32, 96), max_objects=3, min_visible_fraction=0.9,
                       low_contrast_fraction=0.0, clutter_items=(0, 1), overlay_lines=(0, 1),
                       texture_probability=0.0, texture_alpha=(0.1, 0.3), blob_amplitude=(5, 15),
                       blur_probability=0.0, class_colours=True),
}


def shape_class_names(num_classes: int = 20) -> list[str]:
    """Class names ``<kind>_<style>`` in dataset order.

    Order: the first 10 kinds x {filled, outline}, then the other 10 kinds x
    {filled, outline}, then all 20 kinds x {striped, dotted}; kind-major within
    each block. So the names for ``n`` classes are a prefix of those for 80.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) \
            or not 1 <= num_classes <= MAX_CLASSES:
        raise ValueError(
            f"num_classes must be an integer in 1..{MAX_CLASSES}, got {num_classes!r}")
    blocks = (
        (SHAPE_KINDS[:10], SHAPE_STYLES[:2]),
        (SHAPE_KINDS[10:], SHAPE_STYLES[:2]),
        (SHAPE_KINDS, SHAPE_STYLES[2:]),
    )
    names = [f"{kind}_{style}" for kinds, styles in blocks for kind in kinds for style in styles]
    return names[:num_classes]


def dataset_dirname(num_classes, num_train, num_test, image_size, seed, difficulty="hard") -> str:
    """Folder name that encodes every generation parameter (the cache key); the
    benchmark difficulty ("hard") is left out of it, so its folders keep their names."""
    suffix = "" if difficulty == "hard" else f"_{difficulty}"
    return (f"shapes_c{num_classes}_train{num_train}_test{num_test}"
            f"_s{image_size}_seed{seed}{suffix}_v{GENERATOR_VERSION}")


def generate_shapes_dataset(root: str, num_classes=20, num_train=2000, num_test=500,
                            image_size=256, seed=0, difficulty="hard", progress=True) -> str:
    """Write the dataset under ``root`` (unless already there) and return its folder.

    Layout: ``JPEGImages/<id>.jpg``, ``Annotations/<id>.xml`` (VOC),
    ``ImageSets/Main/{train,test}.txt``, ``annotations/instances_{train,test}.json``
    (COCO) and ``meta.json``. Train images get ids ``0..num_train-1``, test images
    the following ids. The folder is written under a name of this process
    (``<folder>.partial-<pid>``) and renamed when complete, so processes generating the
    same dataset at once (parallel benchmark runs) never see or delete each other's
    half-written files; the first to finish provides it. ``meta.json`` marks a complete
    folder: one without it (written by an older version) is regenerated.
    ``difficulty`` names one of ``DIFFICULTIES``: "hard" (the benchmark set) or "easy".
    """
    class_names = shape_class_names(num_classes)
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty must be one of {', '.join(DIFFICULTIES)}, got {difficulty!r}")
    knobs = DIFFICULTIES[difficulty]
    for name, value in (("num_train", num_train), ("num_test", num_test),
                        ("image_size", image_size), ("seed", seed)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    if image_size < 64:
        raise ValueError(f"image_size must be at least 64, got {image_size}")
    # Plain ints, so numpy integers give the same folder name and a JSON-able meta.
    num_classes, num_train, num_test, image_size, seed = (
        int(v) for v in (num_classes, num_train, num_test, image_size, seed))

    out_dir = os.path.join(root, dataset_dirname(num_classes, num_train, num_test,
                                                 image_size, seed, difficulty))
    meta_path = os.path.join(out_dir, "meta.json")
    if os.path.isfile(meta_path):
        return out_dir
    folder = os.path.basename(out_dir)
    partial_dir = f"{out_dir}.partial-{os.getpid()}"
    shutil.rmtree(partial_dir, ignore_errors=True)  # this process's own leftover
    for sub in ("JPEGImages", "Annotations", os.path.join("ImageSets", "Main"), "annotations"):
        os.makedirs(os.path.join(partial_dir, sub))

    splits = (("train", 0, num_train, 0), ("test", 1, num_test, num_train))
    with tqdm(total=num_train + num_test, desc="shapes", disable=not progress) as bar:
        for split, split_code, count, first_id in splits:
            coco_images, coco_anns = [], []
            for index in range(count):
                image_id = first_id + index
                stem = f"{image_id:06d}"
                rng = np.random.default_rng([seed, split_code, index])
                image, objects = _render_image(rng, image_size, num_classes, knobs)
                Image.fromarray(image).save(
                    os.path.join(partial_dir, "JPEGImages", stem + ".jpg"),
                    format="JPEG", quality=JPEG_QUALITY)
                with open(os.path.join(partial_dir, "Annotations", stem + ".xml"), "wb") as f:
                    f.write(_voc_xml(folder, stem, image_size, objects, class_names))
                coco_images.append({"id": image_id, "file_name": stem + ".jpg",
                                    "width": image_size, "height": image_size})
                for obj in objects:
                    x0, y0, x1, y1 = obj["box"]
                    coco_anns.append({
                        "id": len(coco_anns) + 1, "image_id": image_id,
                        "category_id": obj["class"] + 1,
                        "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
                bar.update(1)
            with open(os.path.join(partial_dir, "ImageSets", "Main", split + ".txt"), "w") as f:
                f.writelines(f"{img['file_name'][:-4]}\n" for img in coco_images)
            coco = {
                "info": {"description": f"ilmil shapes dataset ({folder})",
                         "version": str(GENERATOR_VERSION)},
                "licenses": [],
                "images": coco_images,
                "annotations": coco_anns,
                "categories": [{"id": i + 1, "name": n, "supercategory": "shape"}
                               for i, n in enumerate(class_names)],
            }
            with open(os.path.join(partial_dir, "annotations", f"instances_{split}.json"), "w") as f:
                json.dump(coco, f)

    meta = {"generator_version": GENERATOR_VERSION, "num_classes": num_classes,
            "num_train": num_train, "num_test": num_test, "image_size": image_size,
            "seed": seed, "difficulty": difficulty, "knobs": asdict(knobs), "class_names": class_names}
    with open(os.path.join(partial_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    if os.path.exists(out_dir) and not os.path.isfile(meta_path):
        shutil.rmtree(out_dir, ignore_errors=True)
    try:
        os.rename(partial_dir, out_dir)
    except OSError:
        if not os.path.isfile(meta_path):  # not another process's finished copy
            raise
        shutil.rmtree(partial_dir)
    return out_dir


# --------------------------------------------------------------------------- shapes

def _regular_polygon(n, radius=1.0, phase=-np.pi / 2):
    t = phase + 2 * np.pi * np.arange(n) / n
    return np.stack([radius * np.cos(t), radius * np.sin(t)], axis=1)


def _star_polygon(points, inner):
    outer = _regular_polygon(points)
    inner_pts = _regular_polygon(points, inner, -np.pi / 2 + np.pi / points)
    return np.stack([outer, inner_pts], axis=1).reshape(-1, 2)


def _circle(radius=1.0, center=(0.0, 0.0), n=48):
    return _regular_polygon(n, radius) + np.asarray(center)


@lru_cache(maxsize=None)
def _unit_shape(kind):
    """Shape outline(s) in local coordinates (x right, y down), scaled to fit [-1, 1].

    Returns ``(solid, holes)``: lists of polygons; the silhouette is the union of
    ``solid`` minus the union of ``holes``.
    """
    holes = []
    if kind == "circle":
        solid = [_circle()]
    elif kind == "square":
        solid = [np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float)]
    elif kind == "triangle":
        solid = [_regular_polygon(3)]
    elif kind == "pentagon":
        solid = [_regular_polygon(5)]
    elif kind == "hexagon":
        solid = [_regular_polygon(6)]
    elif kind == "star":
        solid = [_star_polygon(5, 0.45)]
    elif kind == "cross":
        a, b = 0.33, 1.0
        solid = [np.array([[-a, -b], [a, -b], [a, -a], [b, -a], [b, a], [a, a],
                           [a, b], [-a, b], [-a, a], [-b, a], [-b, -a], [-a, -a]])]
    elif kind == "heart":
        t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        solid = [np.stack([x, y], axis=1)]
    elif kind == "arrow":
        solid = [np.array([[-1, -0.22], [0.15, -0.22], [0.15, -0.6], [1, 0],
                           [0.15, 0.6], [0.15, 0.22], [-1, 0.22]])]
    elif kind == "crescent":
        solid, holes = [_circle()], [_circle(0.85, (0.5, 0.0))]
    elif kind == "diamond":
        # Elongated rhombus: never a square, whatever the rotation and aspect jitter.
        solid = [np.array([[0, -1], [0.58, 0], [0, 1], [-0.58, 0]], float)]
    elif kind == "trapezoid":
        solid = [np.array([[-1, 0.55], [1, 0.55], [0.45, -0.55], [-0.45, -0.55]])]
    elif kind == "semicircle":
        t = np.linspace(np.pi, 2 * np.pi, 25)
        solid = [np.stack([np.cos(t), np.sin(t) + 0.5], axis=1)]
    elif kind == "ell":
        solid = [np.array([[-0.7, -1], [-0.15, -1], [-0.15, 0.45], [0.7, 0.45],
                           [0.7, 1], [-0.7, 1]])]
    elif kind == "tee":
        solid = [np.array([[-1, -0.9], [1, -0.9], [1, -0.35], [0.28, -0.35],
                           [0.28, 0.9], [-0.28, 0.9], [-0.28, -0.35], [-1, -0.35]])]
    elif kind == "ring":
        solid, holes = [_circle()], [_circle(0.55)]
    elif kind == "chevron":
        solid = [np.array([[-1, -0.55], [0, 0.3], [1, -0.55], [1, 0.05],
                           [0, 0.9], [-1, 0.05]])]
    elif kind == "teardrop":
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        solid = [np.stack([np.sin(t) * np.sin(t / 2), -np.cos(t)], axis=1)]
    elif kind == "sparkle":
        solid = [_star_polygon(4, 0.3)]
    elif kind == "bowtie":
        solid = [np.array([[-1, -0.8], [0, -0.12], [1, -0.8], [1, 0.8],
                           [0, 0.12], [-1, 0.8]])]
    else:
        raise KeyError(kind)
    # Centre and normalise so that sizes mean the same thing for every kind.
    pts = np.concatenate(solid)
    center = (pts.min(0) + pts.max(0)) / 2
    scale = np.abs(pts - center).max()
    return ([(p - center) / scale for p in solid], [(h - center) / scale for h in holes])


def _place_shape(rng, kind, size, center):
    """Randomly stretched and rotated copy of a unit shape whose box's longer side
    is ``size`` and whose box centre is ``center``; same structure as ``_unit_shape``."""
    solid, holes = _unit_shape(kind)
    aspect = np.exp(rng.uniform(np.log(ASPECT_RANGE[0]), np.log(ASPECT_RANGE[1])))
    angle = rng.uniform(0, 2 * np.pi)
    c, s = np.cos(angle), np.sin(angle)
    transform = np.diag([aspect ** 0.5, aspect ** -0.5]) @ np.array([[c, s], [-s, c]])
    solid = [p @ transform for p in solid]
    holes = [h @ transform for h in holes]
    pts = np.concatenate(solid)
    lo, hi = pts.min(0), pts.max(0)
    scale = size / (hi - lo).max()
    offset = np.asarray(center) - (lo + hi) / 2 * scale
    return [p * scale + offset for p in solid], [h * scale + offset for h in holes]


def _fill_polygons(mask, polygons, value, origin):
    """Rasterise float polygons into ``mask`` with 1/16 px precision."""
    pts = [np.round((p - origin) * 16).astype(np.int32) for p in polygons]
    cv2.fillPoly(mask, pts, value, lineType=cv2.LINE_8, shift=4)


def _style_pattern(rng, style, roi_shape, origin, size):
    """Boolean map (ROI-sized) of the pixels that get the second colour."""
    h, w = roi_shape
    angle = rng.uniform(0, np.pi)
    c, s = np.cos(angle), np.sin(angle)
    ys = (np.arange(h) + origin[1])[:, None]
    xs = (np.arange(w) + origin[0])[None, :]
    u, v = xs * c + ys * s, ys * c - xs * s
    # np.floor rather than np.mod: same result here, several times faster.
    if style == "striped":
        # About 5 stripes across the shape, but never finer than 3 px per period.
        period = max(3.0, size / rng.uniform(4.5, 6.5))
        return (np.floor(u * (2 / period)).astype(np.int32) & 1).astype(bool)
    spacing = max(3.5, size / rng.uniform(4.0, 6.0))
    u, v = u / spacing, v / spacing
    du, dv = u - np.floor(u) - 0.5, v - np.floor(v) - 0.5
    return du * du + dv * dv < 0.32 ** 2


def _contrasting(rng, base):
    """A second colour clearly lighter or darker than ``base`` (for stripes / dots)."""
    other = rng.uniform(0, 255, 3)
    lum = np.array([0.299, 0.587, 0.114])
    if abs(lum @ other - lum @ base) < 70:
        other = base * 0.3 if lum @ base > 127 else base + (255 - base) * 0.7
    return other


def _object_colour(rng, background, center, style, low_contrast_fraction):
    """Object colour, unrelated to the class; rarely (``low_contrast_fraction``) close
    to the local background, otherwise at least ``MIN_CONTRAST`` away from it.

    Not for outlines: a 1 px low-contrast outline vanishes under the pixel noise.
    """
    size = background.shape[0]
    cx, cy = (int(np.clip(v, 0, size - 1)) for v in center)
    if rng.random() < low_contrast_fraction and style != "outline":
        pixel = background[cy, cx]
        delta = rng.normal(size=3)
        delta *= rng.uniform(35, 60) / (np.linalg.norm(delta) + 1e-6)
        # Step towards mid-grey, so clipping (here or after the brightness jitter)
        # cannot wipe out the remaining contrast.
        if (pixel - 127.5) @ delta > 0:
            delta = -delta
        return np.clip(pixel + delta, 0, 255)
    local = background[max(0, cy - 8):cy + 9, max(0, cx - 8):cx + 9].reshape(-1, 3).mean(0)
    # A uniformly random colour is often close to the background by chance (v3 drew
    # it so): objects that are nearly invisible everywhere made the set too hard.
    best, best_distance = None, -1.0
    for _ in range(MIN_CONTRAST_TRIES):
        colour = rng.uniform(0, 255, 3)
        distance = float(np.linalg.norm(colour - local))
        if distance >= MIN_CONTRAST:
            return colour
        if distance > best_distance:
            best, best_distance = colour, distance
    return best


def _render_object(rng, kind, style, size, center, image_size):
    """Rasterise one object.

    Returns ``(origin, silhouette, painted, outer_box)`` with ROI-sized boolean
    maps (``painted`` = pixels the style actually colours) at integer ``origin``
    and the float box of the full, unclipped shape; None if nothing falls inside
    the image.
    """
    solid, holes = _place_shape(rng, kind, size, center)
    pts = np.concatenate(solid)
    lo, hi = pts.min(0), pts.max(0)
    x0, y0 = np.maximum(np.floor(lo).astype(int) - 1, 0)
    x1, y1 = np.minimum(np.ceil(hi).astype(int) + 2, image_size)
    if x1 - x0 < 2 or y1 - y0 < 2:
        return None
    origin = np.array([x0, y0])
    mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
    _fill_polygons(mask, solid, 1, origin)
    if holes:
        _fill_polygons(mask, holes, 0, origin)
    if style == "outline":
        # Erosion treats outside the ROI as foreground, so a shape cut by the image
        # border gets no outline along the border, as if it went on behind it.
        thickness = int(rng.integers(2, 5))
        thickness = min(thickness, max(1, int(size / 6)))
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * thickness + 1,) * 2)
        painted = (mask - cv2.erode(mask, kernel)).astype(bool)
    else:
        painted = mask.astype(bool)
    return origin, mask.astype(bool), painted, (lo, hi)


def _sample_objects(rng, num_classes, image_size, knobs):
    """Choose and place the objects of one image.

    Each object is re-placed (a few tries) until it lies mostly inside the image
    and leaves every earlier object at least ``knobs.min_visible_fraction`` visible;
    objects that cannot be placed are dropped, so everything drawn is labelled.
    """
    scale = image_size / REFERENCE_SIZE
    count = int(rng.integers(1, knobs.max_objects + 1))
    # Classes drawn from the whole list: images of a later task also show objects
    # of earlier classes, which are unlabelled in that task.
    classes = rng.choice(num_classes, size=count, replace=count > num_classes)
    names = shape_class_names(num_classes)
    placed = []  # "visible": full-image map of its pixels no later object covers
    for cls in classes:
        kind, style = names[cls].rsplit("_", 1)
        for _ in range(PLACEMENT_TRIES):
            size = scale * rng.uniform(*knobs.object_size)
            center = rng.uniform(0, image_size, 2)
            rendered = _render_object(rng, kind, style, size, center, image_size)
            if rendered is None:
                continue
            origin, silhouette, painted_roi, (lo, hi) = rendered
            inside = np.clip(hi, 0, image_size) - np.clip(lo, 0, image_size)
            if np.prod(np.maximum(inside, 0)) < MIN_INSIDE_FRACTION * np.prod(hi - lo):
                continue
            painted = np.zeros((image_size, image_size), bool)
            h, w = painted_roi.shape
            painted[origin[1]:origin[1] + h, origin[0]:origin[0] + w] = painted_roi
            if any(np.count_nonzero(o["visible"] & ~painted)
                   < knobs.min_visible_fraction * o["area"] for o in placed):
                continue
            ys, xs = np.nonzero(silhouette)
            if len(xs) < 4:
                continue
            box = (int(xs.min() + origin[0]), int(ys.min() + origin[1]),
                   int(xs.max() + 1 + origin[0]), int(ys.max() + 1 + origin[1]))
            if box[2] - box[0] < 2 or box[3] - box[1] < 2:
                continue
            truncated = bool((lo < 0).any() or (hi > image_size).any())
            for o in placed:
                o["visible"] &= ~painted
            placed.append({
                "class": int(cls), "style": style, "size": size,
                "box": box, "truncated": truncated, "origin": origin,
                "painted_roi": painted_roi, "visible": painted.copy(),
                "area": np.count_nonzero(painted), "center": center})
            break
    return placed


def _class_colour(rng, class_index):
    """A saturated colour of the class's own hue (golden-ratio spaced), slightly jittered."""
    hue = (class_index * 0.618034 + rng.uniform(-0.02, 0.02)) % 1.0
    hsv = np.array([[[hue * 180, 220, 230]]], np.uint8)  # OpenCV's 8-bit hue is 0..180
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float64)


def _draw_object(rng, image, background, obj, knobs):
    """Paint one placed object onto ``image`` (float32, in place)."""
    if knobs.class_colours:
        base = _class_colour(rng, obj["class"])
    else:
        base = _object_colour(rng, background, obj["center"], obj["style"], knobs.low_contrast_fraction)
    painted = obj["painted_roi"]
    h, w = painted.shape
    x0, y0 = obj["origin"]
    roi = image[y0:y0 + h, x0:x0 + w]
    colour = np.broadcast_to(base.astype(np.float32), (h, w, 3))
    if obj["style"] in ("striped", "dotted"):
        pattern = _style_pattern(rng, obj["style"], (h, w), obj["origin"], obj["size"])
        colour = np.where(pattern[..., None], _contrasting(rng, base).astype(np.float32), colour)
    # Mild linear shading, so objects are not perfectly flat patches.
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * (np.arange(w) - w / 2)[None, :]
            + np.sin(angle) * (np.arange(h) - h / 2)[:, None]) / max(h, w)
    shade = 1 + rng.uniform(-0.4, 0.4) * ramp
    roi[painted] = np.clip(colour * shade[..., None], 0, 255)[painted]


# ----------------------------------------------------------------- image rendering

@lru_cache(maxsize=4)
def _grid(image_size):
    ys, xs = np.mgrid[0:image_size, 0:image_size].astype(np.float32)
    return xs, ys


def _background(rng, image_size, knobs):
    """Textured background: gradient + low-frequency noise + optional stripes/checker."""
    # The smooth parts are built at 1/4 resolution and upsampled: same look, 16x fewer pixels.
    low = max(16, image_size // 4)
    xs, ys = _grid(low)
    c0, c1 = rng.uniform(0, 255, (2, 3)).astype(np.float32)
    if knobs.class_colours:  # grey, so that no background takes an object's colour
        c0, c1 = np.repeat(c0.mean() * 0.5 + 40, 3), np.repeat(c1.mean() * 0.5 + 40, 3)
    angle = rng.uniform(0, 2 * np.pi)
    t = np.cos(angle) * xs + np.sin(angle) * ys
    t = (t - t.min()) / (np.ptp(t) + 1e-6)
    field = c0 + (c1 - c0) * t[..., None]
    # Perlin-like blobs: a few octaves of upsampled small random grids.
    for _ in range(int(rng.integers(1, 4))):
        cells = int(rng.integers(2, 13))
        small = rng.normal(0, 1, (cells, cells, 3)).astype(np.float32)
        field += rng.uniform(*knobs.blob_amplitude) * cv2.resize(small, (low, low),
                                                  interpolation=cv2.INTER_CUBIC)
    image = cv2.resize(field, (image_size, image_size), interpolation=cv2.INTER_LINEAR)
    if rng.random() < knobs.texture_probability:
        xs, ys = _grid(image_size)
        period = rng.uniform(4, 40) * image_size / REFERENCE_SIZE
        angle = rng.uniform(0, np.pi / 2)  # with both diagonals below: every direction
        u = (np.cos(angle) * xs + np.sin(angle) * ys) / period
        if rng.random() < 0.5:
            texture = u.astype(np.int32) & 1
        else:
            v = (np.cos(angle) * ys - np.sin(angle) * xs + image_size) / period
            texture = (u.astype(np.int32) + v.astype(np.int32)) & 1
        if rng.random() < 0.5:
            texture = texture[:, ::-1]
        alpha = rng.uniform(*knobs.texture_alpha)
        blended = image * (1 - alpha) + alpha * rng.uniform(0, 255, 3).astype(np.float32)
        np.copyto(image, blended, where=texture.astype(bool)[..., None])
    return np.clip(image, 0, 255, out=image)


def _random_colour(rng):
    return tuple(float(c) for c in rng.uniform(0, 255, 3))


def _random_point(rng, image_size):
    return tuple(int(v) for v in rng.integers(0, image_size, 2))


def _clutter_item(rng, image, image_size):
    """Draw one distractor that is not an object of any class."""
    scale = image_size / REFERENCE_SIZE
    colour = _random_colour(rng)
    thickness = int(rng.integers(1, 4))
    kind = rng.choice(["line", "arc", "broken", "blob", "text", "scribble"],
                      p=[0.2, 0.2, 0.2, 0.15, 0.1, 0.15])
    if kind == "line":
        p0 = np.array(_random_point(rng, image_size))
        p1 = p0 + rng.normal(0, 1, 2) * rng.uniform(15, 120) * scale
        cv2.line(image, tuple(int(v) for v in p0), tuple(int(v) for v in p1), colour, thickness)
    elif kind == "arc":
        # Open arcs only: a closed one would be a circle_outline.
        axes = tuple(int(v) for v in rng.uniform(5, 50, 2) * scale)
        start = rng.uniform(0, 360)
        cv2.ellipse(image, _random_point(rng, image_size), axes, rng.uniform(0, 360),
                    start, start + rng.uniform(60, 260), colour, thickness)
    elif kind == "broken":
        # Part of the outline of a class shape, left open so it is not an object.
        solid, _ = _place_shape(rng, SHAPE_KINDS[rng.integers(len(SHAPE_KINDS))],
                                rng.uniform(15, 80) * scale, rng.uniform(0, image_size, 2))
        poly = solid[0]
        keep = max(2, int(len(poly) * rng.uniform(0.3, 0.65)))
        poly = np.roll(poly, -int(rng.integers(len(poly))), axis=0)[:keep]
        cv2.polylines(image, [np.round(poly).astype(np.int32)], False, colour, thickness)
    elif kind == "blob":
        # Irregular lumps smaller than the smallest object.
        n = int(rng.integers(6, 12))
        radius = rng.uniform(2, 5.5) * scale * rng.uniform(0.5, 1.5, n)
        t = np.sort(rng.uniform(0, 2 * np.pi, n))
        pts = np.stack([np.cos(t), np.sin(t)], 1) * radius[:, None] + _random_point(rng, image_size)
        cv2.fillPoly(image, [np.round(pts).astype(np.int32)], colour)
    elif kind == "text":
        text = "".join(rng.choice(list(string.ascii_letters + string.digits),
                                  int(rng.integers(1, 6))))
        # OpenCV 5 draws text on 8-bit images only: drawn on an 8-bit mask without
        # anti-aliasing, then painted, it sets the same pixels to the same colour as 4.x did.
        mask = np.zeros(image.shape[:2], np.uint8)
        cv2.putText(mask, text, _random_point(rng, image_size), cv2.FONT_HERSHEY_SIMPLEX,
                    rng.uniform(0.22, 0.42) * scale, 255, 1)
        image[mask > 0] = colour
    else:  # scribble: a short random walk
        steps = rng.normal(0, 1, (int(rng.integers(4, 10)), 2)) * rng.uniform(3, 9) * scale
        pts = np.cumsum(steps, 0) + _random_point(rng, image_size)
        cv2.polylines(image, [np.round(pts).astype(np.int32)], False, colour,
                      int(rng.integers(1, 3)))


def _photometric_jitter(rng, image, blur_probability):
    """Per-image brightness / contrast, occasional blur, pixel noise; returns uint8.

    Works in place on ``image`` (float32) where it can.
    """
    mean = np.array(cv2.mean(image)[:3], np.float32)
    contrast = rng.uniform(0.6, 1.3)
    image *= contrast
    image += mean * (1 - contrast) + rng.uniform(-30, 30)
    if rng.random() < blur_probability:
        image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.5, 1.3))
    # Luminance noise (one channel, broadcast): a third of the cost of colour noise.
    noise = rng.standard_normal((*image.shape[:2], 1), dtype=np.float32)
    noise *= rng.uniform(2, 8)
    image += noise
    return np.clip(image, 0, 255, out=image).astype(np.uint8)


def _render_image(rng, image_size, num_classes, knobs):
    """One RGB uint8 image and its objects (dicts with class, box, truncated)."""
    background = _background(rng, image_size, knobs)
    image = background.copy()
    for _ in range(int(rng.integers(*knobs.clutter_items))):
        _clutter_item(rng, image, image_size)
    objects = _sample_objects(rng, num_classes, image_size, knobs)
    for obj in objects:
        _draw_object(rng, image, background, obj, knobs)
    # A few thin lines over the objects too, so that clutter is not always behind.
    for _ in range(int(rng.integers(*knobs.overlay_lines))):
        p0, p1 = _random_point(rng, image_size), _random_point(rng, image_size)
        cv2.line(image, p0, p1, _random_colour(rng), 1)
    return _photometric_jitter(rng, image, knobs.blur_probability), objects


def _voc_xml(folder, stem, image_size, objects, class_names):
    """Pascal VOC annotation bytes (1-based inclusive pixel coordinates)."""
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = folder
    ET.SubElement(root, "filename").text = stem + ".jpg"
    size = ET.SubElement(root, "size")
    for tag, value in (("width", image_size), ("height", image_size), ("depth", 3)):
        ET.SubElement(size, tag).text = str(value)
    ET.SubElement(root, "segmented").text = "0"
    for obj in objects:
        node = ET.SubElement(root, "object")
        ET.SubElement(node, "name").text = class_names[obj["class"]]
        ET.SubElement(node, "pose").text = "Unspecified"
        ET.SubElement(node, "truncated").text = str(int(obj["truncated"]))
        ET.SubElement(node, "difficult").text = "0"
        box = ET.SubElement(node, "bndbox")
        x0, y0, x1, y1 = obj["box"]
        for tag, value in (("xmin", x0 + 1), ("ymin", y0 + 1), ("xmax", x1), ("ymax", y1)):
            ET.SubElement(box, tag).text = str(value)
    ET.indent(root)
    return (ET.tostring(root, encoding="unicode") + "\n").encode("utf-8")
