"""Writers of small real dataset folders for the tests: VOC layout (JPEG images,
XML annotations, ImageSets/Main/*.txt) and COCO instances json."""
import json
import os
import xml.etree.ElementTree as ET

from PIL import Image


def write_jpeg(path, width, height, colour=(90, 120, 200)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (width, height), colour).save(path, format="JPEG")


def write_voc_folder(root, images, splits, write_images=True):
    """``images``: {file_id: (width, height, [objects])}; an object is a dict with
    ``name`` and ``box`` (xmin, ymin, xmax, ymax, VOC 1-based inclusive) and
    optionally ``difficult``. ``splits``: {split name: [file_id, ...]}."""
    os.makedirs(os.path.join(root, "Annotations"), exist_ok=True)
    os.makedirs(os.path.join(root, "ImageSets", "Main"), exist_ok=True)
    os.makedirs(os.path.join(root, "JPEGImages"), exist_ok=True)
    for file_id, (width, height, objects) in images.items():
        if write_images:
            write_jpeg(os.path.join(root, "JPEGImages", f"{file_id}.jpg"), width, height)
        ann = ET.Element("annotation")
        ET.SubElement(ann, "filename").text = f"{file_id}.jpg"
        size = ET.SubElement(ann, "size")
        for tag, value in (("width", width), ("height", height), ("depth", 3)):
            ET.SubElement(size, tag).text = str(value)
        for obj in objects:
            node = ET.SubElement(ann, "object")
            ET.SubElement(node, "name").text = obj["name"]
            if "difficult" in obj:
                ET.SubElement(node, "difficult").text = str(obj["difficult"])
            box = ET.SubElement(node, "bndbox")
            for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), obj["box"]):
                ET.SubElement(box, tag).text = str(value)
        ET.ElementTree(ann).write(os.path.join(root, "Annotations", f"{file_id}.xml"))
    for split, ids in splits.items():
        with open(os.path.join(root, "ImageSets", "Main", f"{split}.txt"), "w") as f:
            f.writelines(f"{i}\n" for i in ids)
    return str(root)


def write_coco_json(json_file, image_root, images, categories, write_images=True):
    """``images``: [(id, file_name, width, height, [annotations])]; an annotation
    is a dict with ``category_id`` and ``bbox`` (x, y, w, h), optionally ``iscrowd``.
    ``categories``: {id: name}."""
    data = {"images": [], "annotations": [], "categories": [{"id": i, "name": n} for i, n in categories.items()]}
    for image_id, file_name, width, height, anns in images:
        if write_images:
            write_jpeg(os.path.join(image_root, file_name), width, height)
        data["images"].append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for ann in anns:
            data["annotations"].append({"id": len(data["annotations"]) + 1, "image_id": image_id,
                                        "iscrowd": 0, **ann})
    os.makedirs(os.path.dirname(json_file), exist_ok=True)
    with open(json_file, "w") as f:
        json.dump(data, f)
    return str(json_file)
