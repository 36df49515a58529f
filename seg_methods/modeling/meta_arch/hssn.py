"""HSSN: Deep Hierarchical Semantic Segmentation (Li et al., CVPR 2022) on the per-pixel template.

(``MODEL.HSSN.BASE: "mask2former"`` selects the Mask2Former variant instead, built by the same
``META_ARCHITECTURE: "HSSN"``: see ``hssn_mask2former.py``.)

:class:`HSSN` is a :class:`PerPixelSemanticModel` (DeepLabV3+: detectron2's
``DeepLabV3PlusHead`` used as a decoder) that overrides hooks only:

* :meth:`forward_head`: the decoder feature -> one logit per node of the class tree (a sigmoid
  score each, N = all levels' nodes) and, in training, a projection of a backbone feature (or of
  the decoder feature) to L2-normalised embeddings for the tree-triplet loss;
* :meth:`losses`: focal tree-min loss (Eq. 6) + optional per-level cross-entropy (the ports')
  + tree-triplet loss (Eq. 7) with its cosine-ramped weight;
* :meth:`segmentation_logits` / :meth:`probabilities`: tree-respecting leaf scores
  (``MODEL.HSSN.INFERENCE``, default "path_min": a leaf's logit is the minimum over its root
  path, the tree-min positive score of Def. 3.2.3; sigmoid gives its probability). "sem_seg" is
  (C, H, W) over the leaves, so the standard evaluator computes leaf mIoU and the hierarchical
  evaluator maps the argmax up the tree.

The tree is the training set's metadata ``class_hierarchy`` (level 0 = the
``SEM_SEG_HEAD.NUM_CLASSES`` classes). The ground truth is the template's "sem_seg"; the level
labels are derived from it with the tree, so no extra target generator is needed. Void pixels
are excluded from every loss term.

Shape shorthand:
    B: batch, N: tree nodes, C: leaves, H, W: padded input size, h, w: head output size.
"""

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode, configurable
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.structures import ImageList
from torch import nn

from ...config.hssn import HSSN_BASES, HSSN_EMBED_DECODER, HSSN_MASK2FORMER, HSSN_PER_PIXEL
from ..criterion.hssn import ClassTree, leaf_path_logits, per_level_cross_entropy, tree_min_loss
from .hssn_common import (
    RampedTreeTriplet,
    check_inference_rule,
    class_tree_from_config,
    embedding_settings,
    projection_head,
)
from .hssn_mask2former import HSSNMask2Former
from .per_pixel import PerPixelSemanticModel

__all__ = ["HSSN", "class_tree_from_config", "projection_head"]


@META_ARCH_REGISTRY.register()
class HSSN(PerPixelSemanticModel):
    """Hierarchical semantic segmentation: one sigmoid score per tree node, tree-min + triplet.

    Args:
        tree (ClassTree): the class tree (leaves = the classes).
        decoder_channels (int): channels of the decoder feature ``sem_seg_head.layers`` returns
            (the head is built without its classifier).
        embed_in_feature (str): backbone feature projected for the triplet loss, or "decoder".
        embed_in_channels (int): its channels.
        embed_dim (int): embedding size.
        norm (str): norm of the projection (detectron2 ``get_norm`` name).
        focal (bool), focal_gamma (float): Eq. 6 (else Eq. 5) and its exponent.
        tree_min_weight (float): weight of "loss_tree_min".
        level_ce_weight (float): weight of "loss_level_ce" (0: off).
        tree_triplet (RampedTreeTriplet or None): "loss_tree_triplet" (Eq. 7 with its cosine
            ramp) on the projected embeddings; None: no projection, no loss.
        inference_rule (str): "path_min" or "path_sum" (see :func:`leaf_path_logits`).
        **kwargs: :class:`PerPixelSemanticModel` arguments.

    ``HSSN(cfg)`` (what ``build_model`` calls for ``META_ARCHITECTURE: "HSSN"``) builds the
    variant ``MODEL.HSSN.BASE`` names: this class for "per_pixel", and
    :class:`~seg_methods.modeling.meta_arch.hssn_mask2former.HSSNMask2Former` (not a subclass:
    it is a :class:`MaskClassificationModel`) for "mask2former" (see :meth:`__new__`).
    """

    def __new__(cls, *args, **kwargs):
        """One config switch, two templates: ``HSSN(cfg)`` with ``MODEL.HSSN.BASE:
        "mask2former"`` returns an :class:`HSSNMask2Former` built from ``cfg`` (Python then skips
        this class's ``__init__``, the object not being an HSSN); anything else is an HSSN."""
        cfg = args[0] if args else kwargs.get("cfg")
        if cls is HSSN and isinstance(cfg, CfgNode) and cfg.MODEL.HSSN.BASE == HSSN_MASK2FORMER:
            return HSSNMask2Former(*args, **kwargs)
        return super().__new__(cls)

    @configurable
    def __init__(
        self,
        *,
        tree: ClassTree,
        decoder_channels: int,
        embed_in_feature: str = "res5",
        embed_in_channels: int = 0,
        embed_dim: int = 256,
        norm: str = "BN",
        focal: bool = True,
        focal_gamma: float = 2.0,
        tree_min_weight: float = 5.0,
        level_ce_weight: float = 1.0,
        tree_triplet: Optional[RampedTreeTriplet] = None,
        inference_rule: str = "path_min",
        **kwargs,
    ):
        super().__init__(**kwargs)
        check_inference_rule(inference_rule)
        if not getattr(self.sem_seg_head, "decoder_only", False):
            raise ValueError(
                f"MODEL.SEM_SEG_HEAD.NAME: HSSN needs a head that can be built without its "
                f"classifier (decoder_only, as DeepLabV3PlusHead); got "
                f"{type(self.sem_seg_head).__name__}"
            )
        if tree.num_leaves != self.num_classes:
            raise ValueError(
                f"class tree has {tree.num_leaves} leaves, MODEL.SEM_SEG_HEAD.NUM_CLASSES is "
                f"{self.num_classes}"
            )
        self.tree = tree
        # one sigmoid score per tree node; DeepLab's classifier initialisation
        self.node_predictor = nn.Conv2d(decoder_channels, tree.num_nodes, kernel_size=1)
        nn.init.normal_(self.node_predictor.weight, 0, 0.001)
        nn.init.constant_(self.node_predictor.bias, 0)
        self.embed_in_feature = embed_in_feature
        self.projection: Optional[nn.Module] = None
        self.tree_triplet = tree_triplet
        if tree_triplet is not None:
            # the ports' "convmlp" projection head
            self.projection = projection_head(embed_in_channels, embed_dim, norm)
        self.focal, self.focal_gamma = focal, focal_gamma
        self.tree_min_weight = tree_min_weight
        self.level_ce_weight = level_ce_weight
        self.inference_rule = inference_rule

    @classmethod
    def from_config(cls, cfg):
        h = cfg.MODEL.HSSN
        if h.BASE != HSSN_PER_PIXEL:
            raise ValueError(
                f"MODEL.HSSN.BASE must be one of {HSSN_BASES}, got {h.BASE!r} (this class is the "
                f"{HSSN_PER_PIXEL!r} variant; HSSN(cfg) builds the one BASE names)"
            )
        tree = class_tree_from_config(cfg)
        # the head without its classifier: layers() returns the decoder feature
        head_cfg = cfg.clone()
        head_cfg.defrost()
        head_cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = None
        args = super().from_config(head_cfg)
        args["num_classes"] = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
        sh = cfg.MODEL.SEM_SEG_HEAD
        # DeepLabV3PlusHead's output channels: CONVS_DIM after the decoder's fuse convs, or the
        # ASPP's when it has a single input feature.
        decoder_channels = sh.CONVS_DIM if len(sh.IN_FEATURES) > 1 else sh.ASPP_CHANNELS
        args.update(
            tree=tree,
            decoder_channels=decoder_channels,
            focal=h.FOCAL,
            focal_gamma=h.FOCAL_GAMMA,
            tree_min_weight=h.TREE_MIN_WEIGHT,
            level_ce_weight=h.LEVEL_CE_WEIGHT,
            **embedding_settings(
                cfg, args["backbone"].output_shape(), decoder_channels, tree, args["ignore_value"]
            ),
        )
        return args

    # ------------------------------------------------------------------ hooks
    def forward_head(
        self, images: torch.Tensor, targets: Optional[torch.Tensor] = None
    ) -> Dict[str, torch.Tensor]:
        """(B, 3, H, W) -> {"sem_seg": (B, N, h, w) node logits} and, in training with the
        triplet loss on, "embedding": (B, D, h', w') L2-normalised."""
        features = self.backbone(images)
        decoded = self.sem_seg_head.layers(features)
        out = {"sem_seg": self.node_predictor(decoded)}
        if targets is not None and self.projection is not None:
            if self.embed_in_feature == HSSN_EMBED_DECODER:
                source = decoded
            else:
                source = features[self.embed_in_feature]
            out["embedding"] = F.normalize(self.projection(source), p=2, dim=1)
        return out

    def segmentation_logits(
        self, outputs: Dict[str, torch.Tensor], size: Tuple[int, int]
    ) -> torch.Tensor:
        """(B, C, size) tree-respecting leaf logits: node logits upsampled, then reduced over
        each leaf's root path (``MODEL.HSSN.INFERENCE``)."""
        node_logits = super().segmentation_logits(outputs, size)
        return leaf_path_logits(node_logits, self.tree, self.inference_rule)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Leaf scores are independent sigmoids (for "path_min", the minimum of the node
        probabilities along the path), not a softmax."""
        return logits.sigmoid()

    def losses(
        self,
        outputs: Dict[str, torch.Tensor],
        targets: torch.Tensor,
        batched_inputs: List[Dict],
        images: ImageList,
    ) -> Dict[str, torch.Tensor]:
        """Hook: "loss_tree_min" (+ "loss_level_ce") on node logits upsampled to (H, W), and
        "loss_tree_triplet" on the embeddings with the targets nearest-resized to them."""
        node_logits = PerPixelSemanticModel.segmentation_logits(self, outputs, targets.shape[-2:])
        kw = {"ignore_value": self.ignore_value}
        losses = {
            "loss_tree_min": self.tree_min_weight
            * tree_min_loss(
                node_logits, targets, self.tree, focal=self.focal, gamma=self.focal_gamma, **kw
            )
        }
        if self.level_ce_weight > 0:
            losses["loss_level_ce"] = self.level_ce_weight * per_level_cross_entropy(
                node_logits, targets, self.tree, **kw
            )
        if self.tree_triplet is not None:
            losses["loss_tree_triplet"] = self.tree_triplet(outputs["embedding"], targets)
        return losses
