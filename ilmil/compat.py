"""The adjustments detectron2 0.6 needs on today's stack, in one place.

Imported by ``ilmil/__init__.py`` before any other detectron2 module. Each
adjustment first checks that it is needed, so on a detectron2 build that does not
need it (an official build with its C++ ops, an older Pillow) it does nothing.
Anything else that detectron2 0.6 lacks here is worked around where it is used
and documented there (our VOC AP, ``COCOeval`` directly). One adjustment makes the
GroupNorm heads of RetinaNet and FCOS buildable. Two adjustments for
torchrun-launched runs (``ilmil/engine/launch.py``) are here too:
``use_local_process_group`` and the CPU case of ``create_ddp_model``; and
``report_without_traceback`` for the errors the tools report in one line.
"""
import importlib.util
import logging
import sys
import types
import warnings

from PIL import Image

import detectron2

__all__ = ["HAS_DETECTRON2_OPS", "report_without_traceback", "use_local_process_group"]

# The PyPI sdist ships no C++ sources, so ``detectron2._C`` is absent, yet
# layers/deform_conv.py imports it at module level. A placeholder lets every model
# whose ops come from torchvision (ROIAlign, NMS: Faster R-CNN) import and run;
# deformable conv and rotated boxes stay unavailable.
HAS_DETECTRON2_OPS = importlib.util.find_spec("detectron2._C") is not None
if not HAS_DETECTRON2_OPS:
    _placeholder = types.ModuleType(
        "detectron2._C", "Placeholder: this detectron2 was installed without its C++ ops."
    )
    # collect_env_info() (logged by default_setup) asks the extension how it was built.
    _placeholder.get_compiler_version = lambda: "none (detectron2 installed without C++ ops)"
    _placeholder.get_cuda_version = lambda: "none"
    _placeholder.has_cuda = lambda: False
    sys.modules["detectron2._C"] = _placeholder
    detectron2._C = _placeholder

# collect_env_info imports torch's extension builder, which warns on stderr at import that
# it found a CUDA toolkit without a CUDA runtime (a CPU machine with /usr/local/cuda): a
# line about compiling extensions, which ilmil never does, in every run's output.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)

# Pillow 10 removed the ``Image.LINEAR`` alias (same value as BILINEAR), which
# data/transforms/transform.py uses as a default argument at import time.
if not hasattr(Image, "LINEAR"):
    Image.LINEAR = Image.BILINEAR

# detectron2 0.6 calls torch.jit.script at import and torch.meshgrid without
# ``indexing``; today's torch warns on each, which buries the training log.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
warnings.filterwarnings("ignore", message=r"torch\.meshgrid: in an upcoming release", category=UserWarning)
# Its AMPTrainer (SOLVER.AMP.ENABLED) builds torch.cuda.amp's autocast and GradScaler, which
# today's torch deprecates with a warning in every mixed-precision run's log.
warnings.filterwarnings("ignore", message=r"`torch\.cuda\.amp\.(autocast|GradScaler)\(args\.\.\.\)` is deprecated",
                        category=FutureWarning)


def use_local_process_group(group):
    """Make detectron2's ``comm.get_local_rank()`` / ``get_local_size()`` use ``group``
    (this machine's processes). detectron2 0.6 keeps it in a module global that only
    its own ``launch()`` sets, and that launcher asserts CUDA and hard-codes NCCL."""
    from detectron2.utils import comm

    comm._LOCAL_PROCESS_GROUP = group


class _OneLineReport(logging.Filter):
    def __init__(self, error_types):
        super().__init__()
        self.error_types = tuple(error_types)

    def filter(self, record):
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, self.error_types):
            record.msg, record.args, record.exc_info, record.exc_text = "Training stopped: %s", (error,), None, None
        return True


def report_without_traceback(error_types):
    """detectron2's train loop logs the exception it stops on with its traceback
    ("Exception during training:") before re-raising it. An error of ``error_types``
    says where and what to fix in its message, which the tools print as their one
    error line: its log record keeps the message and loses the traceback."""
    train_loop_logger = logging.getLogger("detectron2.engine.train_loop")
    train_loop_logger.filters = [f for f in train_loop_logger.filters if not isinstance(f, _OneLineReport)]
    train_loop_logger.addFilter(_OneLineReport(error_types))


def _create_ddp_model_on_cpu_too():
    """detectron2 0.6's ``create_ddp_model`` (called inside ``DefaultTrainer``) always
    passes ``device_ids=[local rank]``, which DistributedDataParallel rejects for a CPU
    module: training with gloo on CPUs needs ``device_ids=None``."""
    from detectron2.engine import defaults

    create = defaults.create_ddp_model
    if getattr(create, "handles_cpu_modules", False):
        return

    def create_ddp_model(model, **kwargs):
        if next(model.parameters()).device.type == "cpu":
            kwargs.setdefault("device_ids", None)
        return create(model, **kwargs)

    create_ddp_model.handles_cpu_modules = True
    defaults.create_ddp_model = create_ddp_model


_create_ddp_model_on_cpu_too()


def _group_norm_in_dense_heads():
    """``RetinaNetHead`` (the head of RetinaNet and of FCOS) tells a shared BatchNorm
    from other norms by building one layer of ONE channel, ``get_norm(norm, 1)``, which
    a GroupNorm of 32 groups refuses: in detectron2 0.6 a ``GN`` head
    (``MODEL.RETINANET.NORM``, ``MODEL.FCOS.NORM``) cannot be built at all. Later
    detectron2 versions probe with 32 channels; the ``get_norm`` that module calls
    does the same here (every layer it builds has more than one channel)."""
    from detectron2.layers import ShapeSpec, get_norm
    from detectron2.modeling.meta_arch import retinanet

    try:
        retinanet.RetinaNetHead(input_shape=[ShapeSpec(channels=32)], num_classes=1, num_anchors=1,
                                conv_dims=[32], norm="GN")
        return  # this build (or an earlier call) already probes with a width GroupNorm accepts
    except ValueError:
        pass

    def get_norm_with_32_channel_probe(norm, out_channels):
        return get_norm(norm, 32 if out_channels == 1 else out_channels)

    retinanet.get_norm = get_norm_with_32_channel_probe


_group_norm_in_dense_heads()
