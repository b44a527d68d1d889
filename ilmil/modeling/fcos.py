"""FCOS (Tian et al., "FCOS: Fully Convolutional One-Stage Object Detection", 2019)
as a registered meta-architecture that builds from a yacs config.

detectron2 0.6 carries FCOS (``detectron2/modeling/meta_arch/fcos.py``) for its
LazyConfig files only: ``meta_arch/__init__.py`` does not import that module, so
``FCOS`` is not in ``META_ARCH_REGISTRY``; ``FCOS`` has no ``from_config``; and
``FCOSHead`` cannot come from a yacs config either, as its constructor passes
``num_anchors=1`` to ``RetinaNetHead`` itself, while ``RetinaNetHead.from_config``
(reached through ``FCOSHead(cfg, shapes)``) supplies ``num_anchors`` as well: one
keyword given twice. Here:

* :class:`FCOS` subclasses detectron2's and adds a ``@configurable`` constructor
  whose ``from_config`` reads the ``MODEL.FCOS`` keys (``add_fcos_config`` in
  ilmil/config.py, part of ilmil's default config) and registers it under the
  name ``FCOS`` (``MODEL.META_ARCHITECTURE FCOS``);
* the head is detectron2's ``FCOSHead`` built with keyword arguments, so
  ``RetinaNetHead.from_config`` and its anchor count never run (an FCOS location
  is one anchor point, which ``FCOSHead`` already says).

Training, matching, losses and inference are detectron2's; only the losses' inputs
are cast to float32 first (:meth:`FCOS.losses`), which mixed-precision training needs.
"""
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.modeling.meta_arch import fcos

from ..config import ConfigError

__all__ = ["FCOS"]


@META_ARCH_REGISTRY.register()
class FCOS(fcos.FCOS):
    """detectron2's FCOS, built from ``cfg.MODEL.FCOS`` (and ``MODEL.BACKBONE``,
    ``MODEL.PIXEL_MEAN/STD``, ``TEST.DETECTIONS_PER_IMAGE``)."""

    @configurable
    def __init__(self, **kwargs):
        """Arguments of detectron2's ``FCOS``."""
        super().__init__(**kwargs)

    def losses(self, anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes, pred_centerness):
        """detectron2's losses on float32 predictions. Under autocast (``SOLVER.AMP.ENABLED``)
        the head outputs float16, detectron2's ``Box2BoxTransformLinear`` keeps that dtype
        when it decodes, and fvcore's ``giou_loss`` then writes float32 values into a float16
        tensor, which torch refuses; losses belong in float32 under mixed precision anyway."""
        def as_float(tensors):
            return [t.float() for t in tensors]

        return super().losses(anchors, as_float(pred_logits), gt_labels, as_float(pred_anchor_deltas), gt_boxes,
                              as_float(pred_centerness))

    @classmethod
    def from_config(cls, cfg):
        c = cfg.MODEL.FCOS
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        missing = [f for f in c.IN_FEATURES if f not in shapes]
        if missing:
            raise ConfigError(f"MODEL.FCOS.IN_FEATURES names {', '.join(missing)}, which the backbone "
                             f"{cfg.MODEL.BACKBONE.NAME} does not output ({', '.join(shapes)}); fix: choose "
                             "among those, or a backbone with them (build_retinanet_resnet_fpn_backbone: p3-p7)")
        feature_shapes = [shapes[f] for f in c.IN_FEATURES]
        head = fcos.FCOSHead(
            input_shape=feature_shapes,
            conv_dims=[feature_shapes[0].channels] * c.NUM_CONVS,
            num_classes=c.NUM_CLASSES,
            norm=c.NORM,
            prior_prob=c.PRIOR_PROB,
        )
        return {
            "backbone": backbone,
            "head": head,
            "head_in_features": list(c.IN_FEATURES),
            "num_classes": c.NUM_CLASSES,
            "center_sampling_radius": c.CENTER_SAMPLING_RADIUS,
            "focal_loss_alpha": c.FOCAL_LOSS_ALPHA,
            "focal_loss_gamma": c.FOCAL_LOSS_GAMMA,
            "test_score_thresh": c.SCORE_THRESH_TEST,
            "test_topk_candidates": c.TOPK_CANDIDATES_TEST,
            "test_nms_thresh": c.NMS_THRESH_TEST,
            "max_detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
        }
