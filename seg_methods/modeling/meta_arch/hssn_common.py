"""Pieces shared by HSSN's two variants (per-pixel :mod:`.hssn` and Mask2Former
:mod:`.hssn_mask2former`): the class tree read from dataset metadata, the tree-triplet
projection head, the triplet / inference settings read from ``MODEL.HSSN``, the ramped
tree-triplet loss term and the trainer iteration for its ramp.

Shape shorthand: as in :mod:`seg_methods.modeling.criterion.hssn`.
"""

from typing import Dict, Mapping

import torch
import torch.nn.functional as F
from detectron2.data import MetadataCatalog
from detectron2.layers import Conv2d, get_norm
from detectron2.utils.events import get_event_storage
from torch import nn

from ...config.hssn import HSSN_EMBED_DECODER, HSSN_INFERENCE_RULES
from ..criterion.hssn import ClassTree, tree_triplet_loss, triplet_ramp

__all__ = [
    "RampedTreeTriplet",
    "check_inference_rule",
    "class_tree_from_config",
    "embedding_settings",
    "projection_head",
    "trainer_iteration",
]


def class_tree_from_config(cfg) -> ClassTree:
    """The :class:`ClassTree` of the first training set (else test set) metadata.

    Raises:
        KeyError: no dataset, or its metadata has no ``class_hierarchy``.
    """
    names = list(cfg.DATASETS.TRAIN) or list(cfg.DATASETS.TEST)
    if not names:
        raise KeyError("HSSN reads its class tree from DATASETS.TRAIN[0] (or TEST[0]); both empty")
    meta = MetadataCatalog.get(names[0])
    hierarchy = meta.get("class_hierarchy", None)
    classes_file = meta.get("classes_file", None)
    if hierarchy is None and classes_file is not None:
        raise KeyError(
            f"HSSN needs metadata 'class_hierarchy' on dataset '{names[0]}', which is read from "
            f"{classes_file} when seg_methods registers the dataset; that file is missing (or "
            "not in a supported form: loading the dataset says why; see datasets/README.md)"
        )
    if hierarchy is None:
        raise KeyError(
            f"HSSN needs metadata 'class_hierarchy' on dataset '{names[0]}' (see "
            "datasets/README.md: {'names': [...], 'parents': [...]}); set it when registering "
            "the dataset"
        )
    return ClassTree(
        hierarchy, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, source=f"metadata of '{names[0]}'"
    )


def embedding_settings(
    cfg,
    backbone_shapes: Mapping,
    decoder_channels: int,
    tree: ClassTree,
    ignore_value: int,
    decoder_name: str = "",
) -> Dict:
    """The tree-triplet and inference arguments both variants read from ``MODEL.HSSN``.

    Args:
        cfg (CfgNode): the config.
        backbone_shapes (Mapping[str, ShapeSpec]): the backbone's outputs, for
            ``EMBED_IN_FEATURE`` naming one of them.
        decoder_channels (int): channels of the decoder feature (``EMBED_IN_FEATURE`` "decoder").
        tree (ClassTree), ignore_value (int): the class tree and the void label of the triplets.
        decoder_name (str): how the error message calls that feature.

    Returns:
        dict: embed_in_feature, embed_in_channels, embed_dim, norm, tree_triplet (a
        :class:`RampedTreeTriplet`, or None when ``TRIPLET_WEIGHT`` is 0: no projection, no
        loss), inference_rule.

    Raises:
        ValueError: ``EMBED_IN_FEATURE`` is neither "decoder" nor a backbone output.
    """
    h = cfg.MODEL.HSSN
    if h.EMBED_IN_FEATURE == HSSN_EMBED_DECODER:
        embed_in_channels = decoder_channels
    else:
        if h.EMBED_IN_FEATURE not in backbone_shapes:
            raise ValueError(
                f"MODEL.HSSN.EMBED_IN_FEATURE {h.EMBED_IN_FEATURE!r} is neither "
                f"{HSSN_EMBED_DECODER!r}{decoder_name} nor a backbone output "
                f"{sorted(backbone_shapes)}"
            )
        embed_in_channels = backbone_shapes[h.EMBED_IN_FEATURE].channels
    tree_triplet = None
    if h.TRIPLET_WEIGHT > 0:
        tree_triplet = RampedTreeTriplet(
            tree,
            ignore_value,
            weight=h.TRIPLET_WEIGHT,
            ramp_iters=h.TRIPLET_RAMP_ITERS,
            margin_eps=h.MARGIN_EPS,
            margin_tree_factor=h.MARGIN_TREE_FACTOR,
            include_anchor_class=h.TRIPLET_INCLUDE_ANCHOR_CLASS,
            max_triplets_per_class=h.MAX_TRIPLETS_PER_CLASS,
        )
    return dict(
        embed_in_feature=h.EMBED_IN_FEATURE,
        embed_in_channels=embed_in_channels,
        embed_dim=h.EMBED_DIM,
        norm=cfg.MODEL.SEM_SEG_HEAD.NORM,
        tree_triplet=tree_triplet,
        inference_rule=h.INFERENCE,
    )


def projection_head(in_channels: int, embed_dim: int, norm: str) -> nn.Module:
    """The ports' "convmlp" projection of the tree-triplet embeddings: 1x1 conv, norm, ReLU,
    1x1 conv to ``embed_dim`` (L2-normalised by the caller)."""
    return nn.Sequential(
        Conv2d(
            in_channels,
            in_channels,
            kernel_size=1,
            bias=not norm,
            norm=get_norm(norm, in_channels),
            activation=F.relu,
        ),
        nn.Conv2d(in_channels, embed_dim, kernel_size=1),
    )


def trainer_iteration(default: int) -> int:
    """The trainer's iteration (detectron2's ``EventStorage``), for the triplet ramp; ``default``
    outside a trainer (no storage open)."""
    try:
        return get_event_storage().iter
    except AssertionError:  # get_event_storage asserts that a storage is open
        return default


def check_inference_rule(rule: str) -> None:
    """Raises ValueError naming ``MODEL.HSSN.INFERENCE`` when ``rule`` is not a known rule."""
    if rule not in HSSN_INFERENCE_RULES:
        raise ValueError(
            f"MODEL.HSSN.INFERENCE must be one of {HSSN_INFERENCE_RULES}, got {rule!r}"
        )


class RampedTreeTriplet:
    """The "loss_tree_triplet" term of both variants: :func:`tree_triplet_loss` (Eq. 7) on the
    L2-normalised embeddings, times the weight of its cosine ramp at the trainer's iteration.

    Args:
        tree (ClassTree): the class tree.
        ignore_value (int): void label, excluded from the triplets.
        weight (float), ramp_iters (int): final weight and ramp length (:func:`triplet_ramp`).
        margin_eps, margin_tree_factor (float): the margin of Eq. 7.
        include_anchor_class (bool), max_triplets_per_class (int): see :func:`tree_triplet_loss`.
    """

    def __init__(
        self,
        tree: ClassTree,
        ignore_value: int,
        *,
        weight: float,
        ramp_iters: int,
        margin_eps: float,
        margin_tree_factor: float,
        include_anchor_class: bool,
        max_triplets_per_class: int,
    ):
        self.tree, self.ignore_value = tree, ignore_value
        self.weight, self.ramp_iters = weight, ramp_iters
        self.margin_eps, self.margin_tree_factor = margin_eps, margin_tree_factor
        self.include_anchor_class = include_anchor_class
        self.max_triplets_per_class = max_triplets_per_class

    def __call__(self, embedding: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """embedding (B, D, h, w); labels (B, H, W) leaf labels (void = ``ignore_value``),
        nearest-resized to (h, w). Returns the weighted scalar loss."""
        small = F.interpolate(
            labels.unsqueeze(1).float(), size=embedding.shape[-2:], mode="nearest"
        )
        triplet = tree_triplet_loss(
            embedding,
            small.squeeze(1).long(),
            self.tree,
            ignore_value=self.ignore_value,
            max_triplets_per_class=self.max_triplets_per_class,
            margin_eps=self.margin_eps,
            margin_tree_factor=self.margin_tree_factor,
            include_anchor_class=self.include_anchor_class,
        )
        step = trainer_iteration(self.ramp_iters)
        return triplet_ramp(step, self.weight, self.ramp_iters) * triplet
