"""Information-map distillation of backbone and neck (after Li et al. 2022, on YOLOv3):
feature imitation weighted by where the knowledge is, on the backbone's outputs AND
on the neck's fusion layers.

For each layer l of LAYERS (backbone stages and neck levels), with a(.) the connector:

    I_l = max(G_l, O_l, b)
    L   = sum_l sum_{n,x,y,c} I_l (a(S_l) - T_l)^2 / (2 sum_l sum_{n,x,y} I_l)

G_l is the soft GT mask of the layer (``gaussian_box_mask``: 1 at a box centre,
falling off towards its edges, 0 outside; pseudo-labels count as GT). O_l is the
teacher's own view of where objects are: the maximum over anchors of sigma(teacher
objectness) on its head level of the layer's map size (resized to it when no level
has that size). A detector without objectness (RetinaNet, FCOS) gives its highest
class probability instead. b is BACKGROUND_WEIGHT, the least weight of any location:
0 is the published map; above 0 the background keeps a share of the imitation.

WEIGHTING ``uniform`` sets I = 1 everywhere: plain imitation of the same layers,
the ablation that shows what the information map adds.

With NORMALIZE, a(S_l) and T_l are first standardised per channel over (N, H, W), as
FGFI and the knowledge review may be: the raw error of features trained from scratch
is hundreds of times the detection loss (YOLO on shapes), which the raw form can only
offset by a small WEIGHT.
"""
import torch
import torch.nn.functional as F

from detectron2.config import configurable

from ...config import ConfigError, check_choice
from ..masks import gaussian_box_mask
from ..registry import DISTILL_LOSS_REGISTRY, DistillLoss
from .dense_head import HEAD
from .feature import feature_connectors, require_feature_maps
from .fgfi import weighted_imitation

__all__ = ["INFORMATION_WEIGHTINGS", "InformationMapDistillation", "teacher_object_maps"]

INFORMATION_WEIGHTINGS = ("information", "uniform")


def teacher_object_maps(teacher_head, objectness=None):
    """Per head level, [N, H, W] of the teacher's object probability: max over anchors of
    sigma(``objectness``) when given, else max over anchors and classes of sigma(class logits)."""
    if objectness is not None:
        return [x.detach().sigmoid().amax(dim=1) for x in objectness]
    return [x.detach().sigmoid().amax(dim=1) for x in teacher_head[0]]


def _level_map(maps, size):
    """The map of ``maps`` of spatial ``size``, else the closest one resized to it."""
    for m in maps:
        if tuple(m.shape[-2:]) == tuple(size):
            return m
    closest = min(maps, key=lambda m: abs(m.shape[-2] - size[0]))
    return F.interpolate(closest[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


@DISTILL_LOSS_REGISTRY.register()
class InformationMapDistillation(DistillLoss):
    """Feature imitation of backbone and neck layers weighted by an importance map."""

    config_key = "INFOMAP"

    @configurable
    def __init__(self, *, layers, weighting="information", background_weight=0.0, normalize=False, connectors=None):
        super().__init__()
        if not layers:
            raise ConfigError("ILMIL.DISTILL.INFOMAP.LAYERS is empty; fix: name backbone and neck layers, "
                              "e.g. dark3 dark4 dark5 p3 p4 p5")
        self.layers = tuple(layers)
        self.weighting = check_choice("ILMIL.DISTILL.INFOMAP.WEIGHTING", weighting, INFORMATION_WEIGHTINGS)
        if not 0.0 <= background_weight <= 1.0:
            raise ConfigError(f"ILMIL.DISTILL.INFOMAP.BACKGROUND_WEIGHT {background_weight}: the least weight of a "
                              "location lies in [0, 1]; fix: 0 for the published map, e.g. 0.1 to keep the background")
        self.background_weight = float(background_weight)
        self.normalize = normalize
        self.connectors = connectors if connectors is not None else torch.nn.ModuleDict()

    @classmethod
    def from_config(cls, cfg, student_shapes=None, teacher_shapes=None):
        info = cfg.ILMIL.DISTILL.INFOMAP
        require_feature_maps(info.LAYERS, student_shapes, "ILMIL.DISTILL.INFOMAP.LAYERS")
        return {"layers": info.LAYERS, "weighting": info.WEIGHTING, "background_weight": info.BACKGROUND_WEIGHT,
                "normalize": info.NORMALIZE,
                "connectors": feature_connectors(info.LAYERS, student_shapes or {}, teacher_shapes or {},
                                                 cfg.ILMIL.DISTILL.CONNECTOR, "ILMIL.DISTILL.INFOMAP.LAYERS")}

    def records(self):
        return self.layers + ((HEAD,) if self.weighting == "information" else ())

    def importance(self, teacher, context):
        """{layer: [N, H, W] importance map} at the teacher's map sizes."""
        sizes = {name: tuple(teacher[name].shape[-2:]) for name in self.layers}
        if self.weighting == "uniform":
            return {name: teacher[name].new_ones(teacher[name].shape[0], *size) for name, size in sizes.items()}
        objects = teacher_object_maps(teacher[HEAD], context.teacher_outputs.get("objectness"))
        return {name: torch.maximum(gaussian_box_mask(context.gt_instances, size, context.strides[name]),
                                    _level_map(objects, size)).clamp(min=self.background_weight)
                for name, size in sizes.items()}

    def forward(self, student, teacher, context):
        return weighted_imitation(student, teacher, self.layers, self.connectors, self.importance(teacher, context),
                                  min_area=1e-6, normalize=self.normalize)
