"""Target generators: augmented labels of one image -> training targets.

Importing this package registers every generator in ``TARGET_GENERATOR_REGISTRY``
(``seg_methods/data/build.py``). A dataset mapper calls the generators its registered entry names
plus those listed in ``cfg.INPUT.EXTRA_TARGETS``; each returns a dict merged into the model
input (two generators may write the same key only with equal values).

=======================  =====================  ==============================================
name                     labels                 writes
=======================  =====================  ==============================================
``semantic_masks``       sem_seg                "instances": one mask per class present
``panoptic_masks``       panoptic               "instances": one mask per non-crowd segment
``instance_masks``       annotations            "instances": one mask per non-crowd object
``sem_seg``              sem_seg                "sem_seg" (H, W), void/padding = ignore label
``class_hierarchy``      sem_seg + metadata     "hierarchy_labels" (L, H, W) node ids per level
``instance_embedding``   panoptic, sem_seg      "instance_ids" (0 stuff, -1 void), centres,
                                                classes, "sem_seg"
``detection``            panoptic | annotations "instances": thing boxes, masks, thing ranks
``coarse_mask``          panoptic | annotations "gt_mask", "coarse_mask" (perturbed copy)
                         | sem_seg
``regions``              regions                "regions" (H, W), padding -1
=======================  =====================  ==============================================

A name followed by "?" (``"sem_seg?"``) is optional: records without its labels are skipped.
Adding a kind of target: write a :class:`TargetGenerator` subclass (``requires``/``uses`` and
``__call__(labels) -> dict``) in a new file here, register a ``(cfg) -> generator`` function
with ``@TARGET_GENERATOR_REGISTRY.register()`` and import the file below; no mapper edit.
"""

from . import coarse_mask, detection, embedding, hierarchy, masks, regions, semantic  # noqa: F401
from .base import LABEL_KINDS, TargetGenerator, TargetLabels  # noqa: F401
from .coarse_mask import CoarseMaskTargets, perturb_mask  # noqa: F401
from .detection import DetectionTargets, detection_targets  # noqa: F401
from .embedding import InstanceEmbeddingTargets, instance_embedding_targets  # noqa: F401
from .hierarchy import ClassHierarchyTargets, class_hierarchy_labels  # noqa: F401
from .masks import (  # noqa: F401
    InstanceMaskTargets,
    PanopticMaskTargets,
    SemanticMaskTargets,
    instance_targets,
    panoptic_targets,
    semantic_targets,
)
from .regions import RegionTargets  # noqa: F401
from .semantic import SemanticSegTargets, semantic_seg_target  # noqa: F401
