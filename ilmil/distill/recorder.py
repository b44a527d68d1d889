"""Recording a model's intermediate outputs by name during its own forward pass.

A name is one of:

- a feature map of the backbone's output (``p2`` .. ``p6`` of an FPN);
- a feature map of the network under an FPN (``res2`` .. ``res5``, ``backbone.bottom_up``);
- a module path (``proposal_generator.rpn_head``, ``backbone.bottom_up.res4.0``): that
  module's output, whatever its type.

Forward hooks keep the latest output of each recorded module, so distillation
reads the tensors the detector computed anyway instead of running parts of it
twice.
"""
import contextlib

from detectron2.layers import ShapeSpec

from ..config import ConfigError

__all__ = ["Recorder", "feature_shapes", "recordable_names"]

_MAX_LISTED_PATHS = 60


def _bottom_up(model):
    return getattr(model.backbone, "bottom_up", None)


def feature_shapes(backbone):
    """``{feature name: ShapeSpec(channels, stride)}`` of ``backbone``'s outputs and,
    under an FPN, of the network beneath it."""
    shapes = {}
    bottom_up = getattr(backbone, "bottom_up", None)
    if bottom_up is not None:
        shapes.update(bottom_up.output_shape())
    shapes.update(backbone.output_shape())
    return {name: ShapeSpec(channels=s.channels, stride=s.stride) for name, s in shapes.items()}


def recordable_names(model, depth=3):
    """Feature names, then module paths up to ``depth`` dots deep."""
    paths = [name for name, _ in model.named_modules() if name and name.count(".") < depth]
    return list(feature_shapes(model.backbone)) + paths


class Recorder:
    """Records the outputs named ``names`` of ``model`` during the forward passes run
    inside ``with recorder.recording():`` (other passes, evaluation, keep nothing).

    Raises :class:`ConfigError` naming ``key`` and the available names when a
    name is neither a feature of the model nor one of its module paths.
    """

    def __init__(self, model, names, key="ILMIL.DISTILL"):
        backbone_features = set(model.backbone.output_shape())
        bottom_up = _bottom_up(model)
        bottom_up_features = set(bottom_up.output_shape()) if bottom_up is not None else set()
        modules = dict(model.named_modules())
        self._sources = {}  # name -> (module path, output key or None)
        for name in dict.fromkeys(names):
            if name in backbone_features:
                self._sources[name] = ("backbone", name)
            elif name in bottom_up_features:
                self._sources[name] = ("backbone.bottom_up", name)
            elif name in modules and name:
                self._sources[name] = (name, None)
            else:
                available = recordable_names(model)
                listed = ", ".join(available[:_MAX_LISTED_PATHS]) + (", ..." if len(available) > _MAX_LISTED_PATHS else "")
                raise ConfigError(f"{key}: {type(model).__name__} has no layer {name!r}; fix: name one of its "
                                  f"features or module paths: {listed}")
        self._outputs = {}
        self._active = False
        self._handles = [modules[path].register_forward_hook(self._hook(path))
                         for path in dict.fromkeys(path for path, _ in self._sources.values())]

    @property
    def module_paths(self):
        """The paths of the modules whose outputs are recorded."""
        return {path for path, _ in self._sources.values()}

    def _hook(self, path):
        def record(module, inputs, output):
            if self._active:
                self._outputs[path] = output
        return record

    @contextlib.contextmanager
    def recording(self):
        self._active = True
        try:
            yield self
        finally:
            self._active = False

    def collect(self):
        """``{name: output}`` of the last forward pass; the recorded outputs are released."""
        recorded = {}
        for name, (path, key) in self._sources.items():
            if path not in self._outputs:
                raise RuntimeError(f"layer {name} ({path}) did not run in the last forward pass")
            output = self._outputs[path]
            recorded[name] = output[key] if key is not None else output
        self._outputs = {}
        return recorded

    def remove(self):
        for handle in self._handles:
            handle.remove()
