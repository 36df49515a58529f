"""Panoptic SegFormer meta-architecture (Li et al., "Panoptic SegFormer: Delving Deeper into
Panoptic Segmentation with Transformers", CVPR 2022).

backbone -> shared multi-scale deformable encoder (``MODEL.MSDEFORM_PIXEL_DECODER``: res3-res5 plus
one extra 1/64 level) -> location decoder (thing queries, boxes) -> query filter (training) or
top-k (query, class) pairs (inference) -> thing mask decoder; one stuff query per stuff class ->
stuff mask decoder -> mask-wise merging (Sec. 3.6). See
:mod:`seg_methods.modeling.transformer_decoder.panoptic_segformer_decoder` for the decoders,
:mod:`seg_methods.modeling.criterion.panoptic_segformer` for the losses and
:mod:`seg_methods.modeling.postprocessing.panoptic_segformer` for the merging.

The thing and stuff classes are read from the training dataset's metadata
(:func:`panoptic_segformer_classes`); the official head hard-codes COCO's 80 + 53.

The head is kept as ``sem_seg_head.pixel_decoder`` (the encoder) / ``sem_seg_head.predictor``.

Shape shorthand:
    B: batch, Q: thing queries, k: top-k thing candidates, S_st: stuff classes, K: thing
    classes, C_all: all classes, H, W: padded input, h, w: 1/8 mask size
"""

from typing import Dict, List, Sequence, Tuple

import torch
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import BitMasks, Boxes, ImageList, Instances
from torch import nn
from torch.nn import functional as F

from ..box_losses import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh
from ..build import PIXEL_DECODER_REGISTRY, build_transformer_decoder
from ..criterion.panoptic_segformer import (
    PanopticSegFormerCriterion,
    panoptic_segformer_weight_dict,
)
from ..metadata import thing_ids_from_metadata
from ..postprocessing import output_sizes_from_inputs
from ..postprocessing.panoptic_segformer import mask_confidence, score_overlap_merge
from .common import require_inputs
from .mask_classification import MaskClassificationModel

__all__ = ["PanopticSegFormer", "panoptic_segformer_classes"]


def panoptic_segformer_classes(cfg) -> Tuple[int, List[int], List[int]]:
    """Classes of the decoupled queries, from the metadata of ``cfg.DATASETS.TRAIN[0]``.

    Returns:
        tuple: (number of classes, sorted contiguous thing ids (one class logit each), sorted
        contiguous stuff ids (one stuff query each)).

    Raises:
        ValueError: the metadata's class list disagrees with ``MODEL.SEM_SEG_HEAD.NUM_CLASSES``.
    """
    names = list(cfg.DATASETS.TRAIN) or list(cfg.DATASETS.TEST)
    if not names:
        raise ValueError("Panoptic SegFormer reads its classes from cfg.DATASETS.TRAIN[0] (empty)")
    meta = MetadataCatalog.get(names[0])
    num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    classes = getattr(meta, "stuff_classes", None)  # detectron2: every class of a panoptic set
    if classes is not None and len(classes) != num_classes:
        raise ValueError(
            f"dataset {names[0]!r} has {len(classes)} classes (metadata stuff_classes) but "
            f"cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES is {num_classes}"
        )
    thing_ids = sorted(thing_ids_from_metadata(meta))
    stuff_ids = [c for c in range(num_classes) if c not in set(thing_ids)]
    return num_classes, thing_ids, stuff_ids


class PanopticSegFormerHead(nn.Module):
    """The shared encoder (``pixel_decoder``) and :class:`PanopticSegFormerDecoder`."""

    def __init__(self, pixel_decoder: nn.Module, predictor: nn.Module):
        super().__init__()
        self.pixel_decoder = pixel_decoder
        self.predictor = predictor


@META_ARCH_REGISTRY.register()
class PanopticSegFormer(MaskClassificationModel):
    """Panoptic SegFormer; inputs and outputs as :class:`MaskClassificationModel`.

    Inference returns "panoptic_seg", "instances" (the top-k things by final score) and "sem_seg"
    (per class, the sum of score x mask of its candidates, our addition for semantic metrics and
    export) according to ``cfg.TEST.{PANOPTIC,INSTANCE,SEMANTIC}_ON``.
    """

    @configurable
    def __init__(
        self,
        *,
        num_classes: int,
        thing_ids: Sequence[int],
        stuff_ids: Sequence[int],
        test_topk: int,
        mask_threshold: float,
        merge_kwargs: Dict,
        **kwargs,
    ):
        """
        Args:
            num_classes (int): C_all.
            thing_ids (sequence[int]): contiguous ids of the K thing classes (logit order).
            stuff_ids (sequence[int]): contiguous ids of the stuff classes (stuff query order).
            test_topk (int): thing candidates kept at inference (100).
            mask_threshold (float): binarisation threshold of the masks (0.5).
            merge_kwargs (dict): score / overlap thresholds of :func:`score_overlap_merge`.
            kwargs: :class:`MaskClassificationModel` arguments.
        """
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.thing_ids = list(thing_ids)
        self.register_buffer("thing_id_map", torch.tensor(self.thing_ids, dtype=torch.long), False)
        self.register_buffer("stuff_id_map", torch.tensor(list(stuff_ids), dtype=torch.long), False)
        rank = torch.full((num_classes,), -1, dtype=torch.long)
        rank[self.thing_id_map] = torch.arange(len(self.thing_ids))
        rank[self.stuff_id_map] = torch.arange(len(stuff_ids))
        self.register_buffer("class_rank", rank, False)  # contiguous id -> thing / stuff rank
        self.test_topk = test_topk
        self.mask_threshold = mask_threshold
        self.merge_kwargs = dict(merge_kwargs)

    @classmethod
    def from_config(cls, cfg):
        m = cfg.MODEL.PANOPTIC_SEGFORMER
        enc = cfg.MODEL.MSDEFORM_PIXEL_DECODER
        num_classes, thing_ids, stuff_ids = panoptic_segformer_classes(cfg)
        backbone = build_backbone(cfg)
        n_levels = len(enc.TRANSFORMER_IN_FEATURES) + enc.NUM_EXTRA_LEVELS
        pixel_decoder = PIXEL_DECODER_REGISTRY.get(m.PIXEL_DECODER_NAME)(
            cfg, backbone.output_shape(), num_outputs=n_levels
        )
        predictor = build_transformer_decoder(
            cfg,
            m.TRANSFORMER_DECODER_NAME,
            pixel_decoder.conv_dim,
            True,
            num_thing_classes=len(thing_ids),
            num_stuff_classes=len(stuff_ids),
            n_levels=n_levels,
        )
        weight_dict = panoptic_segformer_weight_dict(
            class_weight=m.CLASS_WEIGHT,
            bbox_weight=m.BBOX_WEIGHT,
            giou_weight=m.GIOU_WEIGHT,
            mask_weight=m.MASK_WEIGHT,
            stuff_class_weight=m.STUFF_CLASS_WEIGHT,
            dec_layers=m.DEC_LAYERS,
            thing_mask_layers=m.THING_MASK_LAYERS,
            stuff_mask_layers=m.STUFF_MASK_LAYERS,
        )
        criterion = PanopticSegFormerCriterion(
            weight_dict=weight_dict,
            cost_class=m.COST_CLASS,
            cost_bbox=m.COST_BBOX,
            cost_giou=m.COST_GIOU,
            cost_dice=m.COST_DICE,
            focal_alpha=m.FOCAL_ALPHA,
            focal_gamma=m.FOCAL_GAMMA,
            filter_max_pos=m.FILTER_MAX_POS,
            dynamic_loss_ratio=m.DYNAMIC_LOSS_RATIO,
        )
        head = PanopticSegFormerHead(pixel_decoder, predictor)
        kwargs = cls.base_kwargs(cfg, backbone, head, criterion, m.SIZE_DIVISIBILITY)
        kwargs.update(
            num_classes=num_classes,
            thing_ids=thing_ids,
            stuff_ids=stuff_ids,
            test_topk=m.TEST_TOPK,
            mask_threshold=m.MASK_THRESHOLD,
            merge_kwargs={
                "thing_score_threshold": m.THING_SCORE_THRESHOLD,
                "stuff_score_threshold": m.STUFF_SCORE_THRESHOLD,
                "thing_overlap_threshold": m.THING_OVERLAP_THRESHOLD,
                "stuff_overlap_threshold": m.STUFF_OVERLAP_THRESHOLD,
            },
        )
        return kwargs

    # ------------------------------------------------------------------ hooks
    def targets(self, batched_inputs: List[Dict], images: ImageList):
        """Thing (rank, normalised box, mask) and stuff (rank, mask) targets of every image.

        Boxes enclose the masks and are normalised by the padded input size, the frame the
        encoder's reference points live in (no padding masks are used).
        """
        require_inputs(
            batched_inputs,
            "instances",
            "Training PanopticSegFormer",
            "check cfg.INPUT.DATASET_MAPPER_NAME (a panoptic mapper producing gt_classes and "
            "gt_masks for thing and stuff segments)",
        )
        h_pad, w_pad = images.tensor.shape[-2:]
        scale = torch.tensor([w_pad, h_pad, w_pad, h_pad], dtype=torch.float32, device=self.device)
        out = []
        for t in self.prepare_targets(batched_inputs, (h_pad, w_pad), self.device):
            labels, masks = t["labels"], t["masks"].bool()
            rank = self.class_rank[labels]
            if bool((rank < 0).any()):
                raise ValueError(
                    f"ground-truth classes {labels[rank < 0].tolist()} are outside "
                    f"MODEL.SEM_SEG_HEAD.NUM_CLASSES = {self.num_classes}"
                )
            is_thing = (labels[:, None] == self.thing_id_map[None, :]).any(1)
            thing_masks = masks[is_thing]
            boxes = BitMasks(thing_masks).get_bounding_boxes().tensor.to(self.device) / scale
            # one stuff target per class (segments of the same stuff class are merged)
            stuff_rank = rank[~is_thing]
            stuff_labels = stuff_rank.unique(sorted=True)
            stuff_masks = (
                torch.stack(
                    [masks[~is_thing][stuff_rank == s].any(0) for s in stuff_labels.tolist()]
                )
                if len(stuff_labels)
                else masks.new_zeros((0, h_pad, w_pad))
            )
            out.append(
                {
                    "labels": rank[is_thing],
                    "boxes": box_xyxy_to_cxcywh(boxes),
                    "masks": thing_masks,
                    "stuff_labels": stuff_labels,
                    "stuff_masks": stuff_masks,
                }
            )
        return out

    def forward_head(self, images: ImageList, batched_inputs: List[Dict], targets=None) -> Dict:
        """Encoder, location decoder, query selection, mask decoders."""
        head = self.sem_seg_head
        _, _, maps = head.pixel_decoder.forward_features(self.backbone(images.tensor))
        located = head.predictor.locate(maps)
        stuff_masks, stuff_masks_aux, stuff_logits_aux = head.predictor.decode_stuff(located)
        outputs = {
            "pred_logits": located["pred_logits"],
            "pred_boxes": located["pred_boxes"],
            "aux_outputs": located["aux_outputs"],
            "stuff_masks": stuff_masks,
            "stuff_masks_aux": stuff_masks_aux,
            "stuff_logits_aux": stuff_logits_aux,
        }
        queries = located["queries"]  # (B, Q, C)
        if targets is not None:  # training: the query filter chooses the thing queries
            first, selected = self.criterion.filter_queries(located, targets)
            t = max([1] + [len(s) for s in selected])  # at least one (zero) query
            thing_queries = queries.new_zeros((queries.shape[0], t, queries.shape[-1]))
            for b, sel in enumerate(selected):
                thing_queries[b, : len(sel)] = queries[b, sel.to(queries.device)]
            outputs.update(first_round=first, selected=selected)
        else:  # inference: top-k (query, class) pairs over all Q * K sigmoid scores
            probs = located["pred_logits"].sigmoid().flatten(1)  # (B, Q*K)
            k = min(self.test_topk, probs.shape[1])
            scores, index = probs.topk(k, dim=1)  # (B, k)
            num_k = located["pred_logits"].shape[-1]
            q_index = torch.div(index, num_k, rounding_mode="floor")
            thing_queries = torch.gather(
                queries, 1, q_index[..., None].expand(-1, -1, queries.shape[-1])
            )
            outputs.update(
                topk_scores=scores,
                topk_labels=index % num_k,
                topk_boxes=torch.gather(
                    located["pred_boxes"], 1, q_index[..., None].expand(-1, -1, 4)
                ),
            )
        thing_masks, thing_masks_aux = head.predictor.decode_things(located, thing_queries)
        outputs.update(thing_masks=thing_masks, thing_masks_aux=thing_masks_aux)
        return outputs

    def inference(self, outputs: Dict, images: ImageList, batched_inputs: List[Dict]):
        """Per image: candidate masks at the output size, score = class x confidence^2 (Sec.
        3.6), then semantic / panoptic / instance outputs."""
        padded = images.tensor.shape[-2:]
        sizes = output_sizes_from_inputs(batched_inputs, images.image_sizes)
        stuff_scores = outputs["stuff_logits_aux"][-1].sigmoid()  # (B, S_st)
        results = []
        for b, (image_size, (oh, ow)) in enumerate(zip(images.image_sizes, sizes)):
            masks = torch.cat((outputs["thing_masks"][b], outputs["stuff_masks"][b]))  # (k+S, h, w)
            masks = F.interpolate(masks[None], size=padded, mode="bilinear", align_corners=False)
            masks = sem_seg_postprocess(masks[0], image_size, oh, ow)  # (k+S, oh, ow)
            num_k = outputs["topk_scores"].shape[1]
            cls_scores = torch.cat((outputs["topk_scores"][b], stuff_scores[b]))
            labels = torch.cat((self.thing_id_map[outputs["topk_labels"][b]], self.stuff_id_map))
            scores = cls_scores * mask_confidence(masks, self.mask_threshold) ** 2
            result = {}
            if self.postprocess_kwargs.get("semantic_on", True):
                sem = masks.new_zeros((self.num_classes, oh, ow))
                result["sem_seg"] = sem.index_add(0, labels, scores[:, None, None] * masks)
            if self.postprocess_kwargs.get("panoptic_on", True):
                is_thing = torch.arange(len(labels), device=labels.device) < num_k
                result["panoptic_seg"] = score_overlap_merge(
                    masks,
                    scores,
                    labels,
                    is_thing,
                    thing_ids=self.thing_ids,
                    mask_threshold=self.mask_threshold,
                    **self.merge_kwargs,
                )
            if self.postprocess_kwargs.get("instance_on", False):
                result["instances"] = self._instances(
                    masks[:num_k], scores[:num_k], labels[:num_k],
                    outputs["topk_boxes"][b], padded, image_size, (oh, ow),
                )  # fmt: skip
            results.append(result)
        return results

    def _instances(self, masks, scores, labels, boxes, padded, image_size, out_size) -> Instances:
        """Thing candidates in decreasing final score (official: top 100 things)."""
        order = scores.argsort(descending=True)
        inst = Instances(out_size)
        inst.pred_masks = masks[order] > self.mask_threshold
        inst.scores = scores[order]
        inst.pred_classes = labels[order]
        xyxy = box_cxcywh_to_xyxy(boxes[order]) * torch.tensor(
            [padded[1], padded[0], padded[1], padded[0]], dtype=boxes.dtype, device=boxes.device
        )  # input pixels
        sx, sy = out_size[1] / image_size[1], out_size[0] / image_size[0]
        xyxy = xyxy * torch.tensor([sx, sy, sx, sy], dtype=boxes.dtype, device=boxes.device)
        pred_boxes = Boxes(xyxy)
        pred_boxes.clip(out_size)
        inst.pred_boxes = pred_boxes
        return inst
