"""ilmil: class-incremental object detection on detectron2.

``ilmil.compat`` is imported first: it adjusts detectron2 0.6 to this stack before
any detectron2 module that needs the adjustment is loaded.
"""
from . import compat  # noqa: F401  (must precede every other detectron2 import)
from . import distill  # noqa: F401  (registers IncrementalRCNN in META_ARCH_REGISTRY)
from . import modeling  # noqa: F401  (registers FCOS in META_ARCH_REGISTRY)
from .config import add_fcos_config, add_ilmil_config, add_retinanet_config, add_yolo_config, get_ilmil_cfg

__version__ = "0.1.0"
__all__ = ["add_fcos_config", "add_ilmil_config", "add_retinanet_config", "add_yolo_config", "get_ilmil_cfg", "__version__"]
