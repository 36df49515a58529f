"""HSSN on Mask2Former: the mask-classification variant of Deep Hierarchical Semantic Segmentation.

Built by ``META_ARCHITECTURE: "HSSN"`` with ``MODEL.HSSN.BASE: "mask2former"`` (``HSSN(cfg)``
returns this model, see :meth:`HSSN.__new__`); it is not registered under a name of its own.
:class:`HSSNMask2Former` is :class:`Mask2Former` (same backbone, pixel decoder, masked-attention
decoder and mask losses, built by ``Mask2Former.from_config``) with these changes through the
mask-classification template's hooks (``forward`` is the template's):

* the decoder's class head (``sem_seg_head.predictor.class_embed``) scores the N tree nodes of
  every query with sigmoids, instead of K + 1 softmax logits ("pred_logits" is (B, Q, N));
* the criterion is :class:`HSSNSetCriterion`: Hungarian matching with the tree-min positive score
  of the target leaf as class cost, the (focal) tree-min loss of Eq. 4-6 per query (matched: the
  target leaf's root path positive; unmatched: "no object" = every node negative, weighted by
  ``MASK_CLS.NO_OBJECT_WEIGHT``), optionally the ports' per-level CE on matched queries, and
  Mask2Former's mask BCE + dice and deep supervision;
* :meth:`forward_head` adds, in training, L2-normalised projected per-pixel embeddings of the
  pixel decoder's mask features (or a backbone feature) for the tree-triplet loss (Eq. 7), which
  :meth:`losses` adds with the per-pixel variant's ramp; the per-pixel labels come from the
  targets' masks (pixels no mask covers, i.e. void and padding, are excluded);
* :meth:`inference`: per-pixel node scores ``sum_q sigmoid(node logit) x sigmoid(mask)``
  (Mask2Former's semantic inference with sigmoids), then the tree-respecting leaf score
  (``MODEL.HSSN.INFERENCE``); "sem_seg" is (C, H, W) over the leaves, so the hierarchical
  evaluator reports mIoU^1..L. Semantic output only.

Shape shorthand:
    B: batch, Q: queries, N: tree nodes, C: leaves, H, W: padded input size, h, w: mask size.
"""

from typing import Dict, List, Optional

import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import ImageList
from torch import nn

from ...config.hssn import HSSN_EMBED_DECODER, HSSN_MASK2FORMER
from ..criterion.hssn import (
    ClassTree,
    build_hssn_set_criterion,
    semantic_labels_from_masks,
    tree_semantic_inference,
)
from ..postprocessing import output_sizes_from_inputs
from .hssn_common import (
    RampedTreeTriplet,
    check_inference_rule,
    class_tree_from_config,
    embedding_settings,
    projection_head,
)
from .mask2former import Mask2Former

__all__ = ["HSSNMask2Former"]


class HSSNMask2Former(Mask2Former):
    """Mask2Former whose queries score the class tree's nodes (see the module docstring).

    Args:
        tree (ClassTree): the class tree (leaves = ``SEM_SEG_HEAD.NUM_CLASSES`` classes).
        ignore_value (int): void label (pixels without a target mask get it for the triplet).
        embed_in_feature (str): "decoder" (the pixel decoder's mask features) or a backbone
            feature, projected for the triplet loss.
        embed_in_channels (int): its channels.
        embed_dim (int): embedding size.
        norm (str): norm of the projection.
        tree_triplet (RampedTreeTriplet or None): "loss_tree_triplet" (Eq. 7 with its cosine
            ramp) on the projected embeddings; None: no projection, no loss.
        inference_rule (str): "path_min" or "path_sum".
        **kwargs: :class:`Mask2Former` arguments; ``sem_seg_head.predictor.class_embed`` must
            output ``tree.num_nodes`` logits.
    """

    @configurable
    def __init__(
        self,
        *,
        tree: ClassTree,
        ignore_value: int,
        embed_in_feature: str = HSSN_EMBED_DECODER,
        embed_in_channels: int = 0,
        embed_dim: int = 256,
        norm: str = "GN",
        tree_triplet: Optional[RampedTreeTriplet] = None,
        inference_rule: str = "path_min",
        **kwargs,
    ):
        super().__init__(**kwargs)
        check_inference_rule(inference_rule)
        out = self.sem_seg_head.predictor.class_embed.out_features
        if out != tree.num_nodes:
            raise ValueError(
                f"the decoder scores {out} classes, the class tree has {tree.num_nodes} nodes"
            )
        self.tree = tree
        self.ignore_value = ignore_value
        self.embed_in_feature = embed_in_feature
        self.projection = None
        self.tree_triplet = tree_triplet
        if tree_triplet is not None:
            self.projection = projection_head(embed_in_channels, embed_dim, norm)
        self.inference_rule = inference_rule

    @classmethod
    def from_config(cls, cfg):
        h = cfg.MODEL.HSSN
        if h.BASE != HSSN_MASK2FORMER:
            raise ValueError(
                f"HSSNMask2Former needs MODEL.HSSN.BASE {HSSN_MASK2FORMER!r}, got {h.BASE!r}"
            )
        if cfg.TEST.PANOPTIC_ON or cfg.TEST.INSTANCE_ON:
            raise ValueError(
                "HSSN on Mask2Former is semantic segmentation only: set TEST.PANOPTIC_ON and "
                "TEST.INSTANCE_ON to False"
            )
        tree = class_tree_from_config(cfg)
        args = super().from_config(cfg)  # Mask2Former's backbone, head and (replaced) criterion
        predictor = args["sem_seg_head"].predictor
        # one sigmoid score per tree node instead of K + 1 softmax logits
        predictor.class_embed = nn.Linear(predictor.class_embed.in_features, tree.num_nodes)
        args["criterion"] = build_hssn_set_criterion(cfg, tree, cfg.MODEL.MASK2FORMER.DEC_LAYERS)
        args.update(
            tree=tree,
            ignore_value=cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            **embedding_settings(
                cfg,
                args["backbone"].output_shape(),
                args["sem_seg_head"].pixel_decoder.mask_dim,
                tree,
                cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
                " (the pixel decoder's mask features)",
            ),
        )
        return args

    # ------------------------------------------------------------------ hooks
    def forward_head(self, images: ImageList, batched_inputs: List[Dict], targets=None) -> Dict:
        """Mask2Former's head; in training with the triplet loss on, also "embedding":
        (B, D, h', w') L2-normalised projection of the mask features (or backbone feature)."""
        features = self.backbone(images.tensor)
        head = self.sem_seg_head
        mask_features, _, multi_scale = head.pixel_decoder.forward_features(features)
        outputs = head.predictor(multi_scale, mask_features)
        if targets is not None and self.projection is not None:
            if self.embed_in_feature == HSSN_EMBED_DECODER:
                source = mask_features
            else:
                source = features[self.embed_in_feature]
            outputs["embedding"] = F.normalize(self.projection(source), p=2, dim=1)
        return outputs

    def losses(self, outputs: Dict, targets, batched_inputs: List[Dict], images: ImageList):
        """The HSSN set criterion's weighted losses, plus "loss_tree_triplet" (ramped)."""
        losses = self.criterion.apply_weights(self.criterion(outputs, targets))
        if self.tree_triplet is not None:
            labels = semantic_labels_from_masks(
                targets, images.tensor.shape[-2:], self.ignore_value
            )  # (B, H, W), void and padding = ignore_value
            losses["loss_tree_triplet"] = self.tree_triplet(outputs["embedding"], labels)
        return losses

    def inference(self, outputs: Dict, images: ImageList, batched_inputs: List[Dict]):
        """Per image {"sem_seg": (C, height, width) tree-respecting leaf scores}.

        As Mask2Former's semantic inference (masks upsampled to the padded input, scores
        computed there, then cropped to the image and resized to the output size), with
        :func:`tree_semantic_inference` for the scores.
        """
        masks = F.interpolate(
            outputs["pred_masks"],
            size=images.tensor.shape[-2:],
            mode="bilinear",
            align_corners=False,
        )  # (B, Q, H, W)
        sizes = output_sizes_from_inputs(batched_inputs, images.image_sizes)
        results = []
        for node_logits, mask, image_size, (height, width) in zip(
            outputs["pred_logits"], masks, images.image_sizes, sizes
        ):
            leaves = tree_semantic_inference(node_logits, mask, self.tree, self.inference_rule)
            results.append({"sem_seg": sem_seg_postprocess(leaves, image_size, height, width)})
        return results
