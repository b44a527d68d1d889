"""Config keys of ilmil, added to a detectron2 config by :func:`add_ilmil_config`."""
import os

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

__all__ = ["add_ilmil_config", "get_ilmil_cfg", "DEFAULT_CONFIG"]


def add_ilmil_config(cfg):
    """Add the ``ILMIL`` section (incremental schedule, datasets, method) to ``cfg``."""
    cfg.ILMIL = CN()
    # Dataset: shapes | voc_2007 | voc_2012 | voc_07_12 | coco_2017 | voc_folder | coco_json
    cfg.ILMIL.DATASET = "shapes"
    # Incremental schedule: class counts per stage, e.g. "10+10", "15+1x5", "40+10x4".
    cfg.ILMIL.STAGES = "10+10"
    # Class order (names); empty = the dataset's canonical order (VOC order, COCO id order).
    cfg.ILMIL.CLASS_ORDER = []
    # finetune | joint (the upper bound); the distillation methods add to this list.
    cfg.ILMIL.METHOD = "finetune"

    # The embedded dataset, generated on first use under $ILMIL_DATASETS/shapes/.
    cfg.ILMIL.SHAPES = CN()
    # Classes generated; 0 = as many as the stage spec needs (at least 20), up to 80.
    cfg.ILMIL.SHAPES.NUM_CLASSES = 0
    cfg.ILMIL.SHAPES.NUM_TRAIN = 2000
    cfg.ILMIL.SHAPES.NUM_TEST = 500
    # Side of the square images, pixels.
    cfg.ILMIL.SHAPES.IMAGE_SIZE = 256
    # Seed of the generator (independent of the training seed, cfg.SEED).
    cfg.ILMIL.SHAPES.SEED = 0

    # Where custom data lives, for ILMIL.DATASET = voc_folder / coco_json.
    cfg.ILMIL.DATA = CN()
    # voc_folder: the folder holding Annotations/, JPEGImages/ and ImageSets/Main/.
    cfg.ILMIL.DATA.ROOT = ""
    # voc_folder: split files under ImageSets/Main/ used for training and testing.
    cfg.ILMIL.DATA.TRAIN_SPLIT = "trainval"
    cfg.ILMIL.DATA.TEST_SPLIT = "test"
    # coco_json: annotation files and the folders their file_name entries are relative to.
    cfg.ILMIL.DATA.TRAIN_JSON = ""
    cfg.ILMIL.DATA.TRAIN_IMAGES = ""
    cfg.ILMIL.DATA.TEST_JSON = ""
    cfg.ILMIL.DATA.TEST_IMAGES = ""
    # Drop malformed annotations (reported and counted) instead of stopping the run.
    cfg.ILMIL.DATA.SKIP_BAD_ANNOTATIONS = False


CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
DEFAULT_CONFIG = os.path.join(CONFIGS_DIR, "shapes", "faster_rcnn_R18_FPN_cpu.yaml")


def get_ilmil_cfg(config_file=None, opts=()):
    """detectron2's defaults + the ILMIL keys, merged with a config file (default:
    the shapes CPU config) and ``KEY VALUE`` overrides."""
    cfg = get_cfg()
    add_ilmil_config(cfg)
    cfg.merge_from_file(config_file or DEFAULT_CONFIG)
    cfg.merge_from_list(list(opts))
    return cfg
