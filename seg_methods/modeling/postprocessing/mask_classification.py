"""Inference of mask-classification models: (class, mask) pairs -> semantic/panoptic/instance.

Pure tensor functions following Mask2Former (Cheng et al., CVPR 2022, Sec. 4 and Appendix A.2
"post-processing"; the same as MaskFormer Sec. 3.4):

- semantic: ``argmax_c sum_q p_q(c) * m_q[h, w]`` (MaskFormer Sec. 3.4, "semantic inference"); we
  return the (C, H, W) scores and leave the argmax to the evaluator, as detectron2 does.
- panoptic: keep the queries whose most likely class is not "no object" and whose probability
  exceeds ``object_mask_threshold``; each pixel goes to ``argmax_q p_q * m_q``; a query whose
  visible area is below ``overlap_threshold`` of its own (m_q >= 0.5) area is dropped; segments of
  the same stuff class are merged.
- instance: the top-k (query, class) pairs over all Q * C, scored by class probability times the
  mean mask probability inside the binarised mask.

Shape shorthand in this module:

    B: batch size
    Q: number of queries
    C: number of classes (class logits have C + 1 entries, the last one is "no object")
    H, W: mask size (the output size for panoptic/instance)
"""

from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.memory import retry_if_cuda_oom

from ..metadata import thing_ids_from_metadata, train_thing_ids  # noqa: F401  (re-exported)
from .panoptic_segments import PanopticSegments

__all__ = [
    "semantic_inference",
    "panoptic_inference",
    "instance_inference",
    "mask_cls_postprocess",
    "mask_cls_inference_kwargs",
    "thing_ids_from_metadata",
    "output_sizes_from_inputs",
    "mask_wise_merge",
    "per_pixel_merge",
]


def semantic_inference(
    mask_cls: torch.Tensor, mask_pred: torch.Tensor, mask_prob: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Per-pixel class scores ``sum_q softmax(mask_cls)[q, c] * sigmoid(mask_pred)[q]``.

    Args:
        mask_cls (Tensor): (Q, C + 1) class logits.
        mask_pred (Tensor): (Q, H, W) mask logits.
        mask_prob (Tensor, optional): ``mask_pred.sigmoid()`` when the caller already has it
            (:func:`mask_cls_postprocess` computes it once for the three inferences).

    Returns:
        Tensor: (C, H, W) scores (not normalised over classes).
    """
    probs = F.softmax(mask_cls, dim=-1)[..., :-1]  # (Q, C), no-object dropped
    masks = mask_pred.sigmoid() if mask_prob is None else mask_prob  # (Q, H, W)
    return torch.einsum("qc,qhw->chw", probs, masks)


def panoptic_inference(
    mask_cls: torch.Tensor,
    mask_pred: torch.Tensor,
    *,
    num_classes: Optional[int] = None,
    thing_ids: Iterable[int] = (),
    object_mask_threshold: float = 0.8,
    overlap_threshold: float = 0.8,
    mask_prob: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, List[Dict]]:
    """Panoptic segmentation from one image's (class, mask) predictions.

    Args:
        mask_cls (Tensor): (Q, C + 1) class logits.
        mask_pred (Tensor): (Q, H, W) mask logits at the output resolution.
        num_classes (int, optional): C; defaults to ``mask_cls.shape[-1] - 1``.
        thing_ids (iterable[int]): contiguous ids of the "thing" classes; the others are stuff.
        object_mask_threshold (float): a query is kept when its best class is not no-object and
            that class's probability is strictly above this.
        overlap_threshold (float): a kept query is dropped when
            ``area(argmax == q) / area(m_q >= 0.5) < overlap_threshold``.
        mask_prob (Tensor, optional): ``mask_pred.sigmoid()``, when already computed.

    Returns:
        tuple: (panoptic_seg, segments_info) with panoptic_seg (H, W) int32 segment ids (0: void)
        and segments_info a list of {"id": int (from 1), "isthing": bool, "category_id": int
        (contiguous)} in query order. With no kept query: all zeros and ``[]``.
    """
    if num_classes is None:
        num_classes = mask_cls.shape[-1] - 1
    scores, labels = F.softmax(mask_cls, dim=-1).max(-1)  # (Q,), (Q,)
    masks = mask_pred.sigmoid() if mask_prob is None else mask_prob  # (Q, H, W)

    keep = labels.ne(num_classes) & (scores > object_mask_threshold)
    cur_scores = scores[keep]
    cur_classes = labels[keep]
    cur_masks = masks[keep]  # (K, H, W)
    cur_prob_masks = cur_scores.view(-1, 1, 1) * cur_masks  # (K, H, W)

    segments = PanopticSegments(
        mask_pred.shape[-2:],
        mask_pred.device,
        thing_ids=thing_ids,
        overlap_threshold=overlap_threshold,
    )
    if cur_masks.shape[0] == 0:
        return segments.result()

    cur_mask_ids = cur_prob_masks.argmax(0)  # (H, W) index into the kept queries
    for k in range(cur_classes.shape[0]):
        won = cur_mask_ids == k  # pixels where query k has the highest p * m
        own = cur_masks[k] >= 0.5
        # Note: the visible area is the argmax area without the (m >= 0.5) condition.
        segments.add(
            won & own,
            int(cur_classes[k].item()),
            visible_area=int(won.sum().item()),
            original_area=int(own.sum().item()),
        )
    return segments.result()


def instance_inference(
    mask_cls: torch.Tensor,
    mask_pred: torch.Tensor,
    *,
    num_classes: Optional[int] = None,
    test_topk_per_image: int = 100,
    thing_ids: Optional[Iterable[int]] = None,
    sort_topk: bool = False,
    boxes_from_masks: bool = False,
    mask_prob: Optional[torch.Tensor] = None,
) -> Instances:
    """Instance segmentation: top-k (query, class) pairs over all Q * C.

    Args:
        mask_cls (Tensor): (Q, C + 1) class logits.
        mask_pred (Tensor): (Q, H, W) mask logits at the output resolution.
        num_classes (int, optional): C; defaults to ``mask_cls.shape[-1] - 1``.
        test_topk_per_image (int): k (clamped to Q * C).
        thing_ids (iterable[int], optional): when given (a model trained for panoptic
            segmentation), pairs whose class is not a thing class are removed after the top-k.
        sort_topk (bool): Mask2Former calls ``topk(sorted=False)``, whose order is unspecified;
            False reproduces that call exactly, True returns the pairs by decreasing class score.
        boxes_from_masks (bool): Mask2Former outputs all-zero boxes (False, the default); True
            computes the tight boxes of the binarised masks (``BitMasks.get_bounding_boxes``).
        mask_prob (Tensor, optional): ``mask_pred.sigmoid()``, when already computed.

    Returns:
        Instances: of image size (H, W), with ``pred_masks`` (K, H, W) bool (``mask_pred > 0``;
        Mask2Former stores the same values as float), ``pred_boxes`` Boxes (K, 4), ``scores`` (K,)
        = class probability * mean of sigmoid(mask) inside the binary mask, ``pred_classes`` (K,)
        int64 contiguous ids.
    """
    if num_classes is None:
        num_classes = mask_cls.shape[-1] - 1
    num_queries = mask_cls.shape[0]
    image_size = tuple(mask_pred.shape[-2:])

    scores = F.softmax(mask_cls, dim=-1)[:, :-1]  # (Q, C)
    # flattened index q * C + c <-> (query q, class c)
    labels = torch.arange(num_classes, device=mask_cls.device).repeat(num_queries)  # (Q * C,)
    k = min(test_topk_per_image, num_queries * num_classes)
    scores_per_image, topk_indices = scores.flatten(0, 1).topk(k, sorted=sort_topk)  # (k,)
    labels_per_image = labels[topk_indices]
    query_indices = topk_indices // num_classes  # (k,), a query may appear with several classes

    if thing_ids is not None:
        thing_ids = set(int(t) for t in thing_ids)
        keep = torch.tensor(
            [int(lab) in thing_ids for lab in labels_per_image.tolist()],
            dtype=torch.bool,
            device=scores_per_image.device,
        )
        scores_per_image = scores_per_image[keep]
        labels_per_image = labels_per_image[keep]
        query_indices = query_indices[keep]

    # Mask2Former gathers the (k, H, W) float logits of the chosen queries, then binarises them
    # and scores them. Everything after the gather depends on the query alone, so it is computed
    # once per query and gathered: the same values (a product with a 0/1 mask is a selection,
    # and each sum runs over one query's pixels in the same order), without the float copies.
    binary = mask_pred > 0  # (Q, H, W), i.e. sigmoid > 0.5
    prob = mask_pred.sigmoid() if mask_prob is None else mask_prob
    inside = torch.where(binary, prob, prob.new_zeros(())).flatten(1).sum(1)  # (Q,)
    # pixel counts, accumulated in int32 (2x faster than the default int64 sum of bools);
    # float32 holds them exactly below 2**24 pixels, as Mask2Former's float sum of the 0/1 mask
    area = binary.flatten(1).sum(1, dtype=torch.int32)  # (Q,)
    mask_scores = inside / (area.to(prob.dtype) + 1e-6)  # (Q,)

    result = Instances(image_size)
    result.pred_masks = binary[query_indices]  # (K, H, W)
    if boxes_from_masks:
        result.pred_boxes = BitMasks(result.pred_masks).get_bounding_boxes()
    else:
        result.pred_boxes = Boxes(torch.zeros(len(query_indices), 4, device=mask_pred.device))
    result.scores = scores_per_image * mask_scores[query_indices]
    result.pred_classes = labels_per_image
    return result


def _crop_and_resize(x: torch.Tensor, image_size: Sequence[int], height: int, width: int):
    """detectron2's ``sem_seg_postprocess`` (crop the padding, resize bilinearly to the output
    size) without its resize when the crop already has the output size: a bilinear resize at
    scale 1 (``align_corners=False``) weighs every pixel by exactly 1 and its neighbour by 0, so
    it is the identity, and copying 100 masks of a 512 x 512 image through it took 87 ms.

    Args:
        x (Tensor): (N, H_pad, W_pad).
        image_size (sequence[int]): (H_img, W_img) before padding.
        height, width (int): output size.

    Returns:
        Tensor: (N, height, width), contiguous.
    """
    if tuple(image_size) == (height, width):
        return x[:, : image_size[0], : image_size[1]].contiguous()
    return retry_if_cuda_oom(sem_seg_postprocess)(x, image_size, height, width)


def mask_cls_postprocess(
    mask_cls_results: torch.Tensor,
    mask_pred_results: torch.Tensor,
    *,
    padded_size: Sequence[int],
    image_sizes: Sequence[Tuple[int, int]],
    output_sizes: Sequence[Tuple[int, int]],
    semantic_on: bool = True,
    instance_on: bool = False,
    panoptic_on: bool = False,
    sem_seg_postprocess_before_inference: bool = False,
    object_mask_threshold: float = 0.8,
    overlap_threshold: float = 0.8,
    test_topk_per_image: int = 100,
    thing_ids: Iterable[int] = (),
    num_classes: Optional[int] = None,
) -> List[Dict]:
    """Resize a batch of predictions to each image's output size and run the enabled inferences.

    Steps (as Mask2Former's meta-architecture): masks are upsampled bilinearly to the padded input
    size; per image, either the masks are cropped to the image size and resized to the output
    size before inference (``sem_seg_postprocess``; forced when panoptic or instance inference is
    on), or the semantic scores are computed at the padded size and cropped/resized after.

    Args:
        mask_cls_results (Tensor): (B, Q, C + 1) class logits.
        mask_pred_results (Tensor): (B, Q, h, w) mask logits at the decoder's resolution.
        padded_size (sequence[int]): (H_pad, W_pad), size of the padded input batch
            (``images.tensor.shape[-2:]``).
        image_sizes (sequence[tuple]): per image (H_img, W_img) before padding
            (``images.image_sizes``).
        output_sizes (sequence[tuple]): per image requested (height, width) of the outputs
            (see :func:`output_sizes_from_inputs`).
        semantic_on, instance_on, panoptic_on (bool): which outputs to produce.
        sem_seg_postprocess_before_inference (bool): resize masks before semantic inference.
        object_mask_threshold, overlap_threshold (float): see :func:`panoptic_inference`.
        test_topk_per_image (int): see :func:`instance_inference`.
        thing_ids (iterable[int]): contiguous thing class ids. Used by panoptic inference, and by
            instance inference only when ``panoptic_on`` (then stuff classes are removed from
            the instances, as Mask2Former does).
        num_classes (int, optional): C; defaults to ``mask_cls_results.shape[-1] - 1``.

    Returns:
        list[dict]: per image, a subset of {"sem_seg": (C, height, width) Tensor,
        "panoptic_seg": (Tensor (height, width) int32, list[dict]), "instances": Instances}.
    """
    before = sem_seg_postprocess_before_inference or panoptic_on or instance_on
    thing_ids = set(int(t) for t in thing_ids)
    mask_pred_results = F.interpolate(
        mask_pred_results, size=tuple(padded_size), mode="bilinear", align_corners=False
    )  # (B, Q, H_pad, W_pad)

    processed = []
    for mask_cls, mask_pred, image_size, (height, width) in zip(
        mask_cls_results, mask_pred_results, image_sizes, output_sizes
    ):
        result = {}
        if before:
            mask_pred = _crop_and_resize(mask_pred, image_size, height, width)  # (Q, height, width)
            mask_cls = mask_cls.to(mask_pred)
        # shared by the three inferences
        mask_prob = mask_pred.sigmoid() if semantic_on or panoptic_on or instance_on else None
        if semantic_on:
            r = retry_if_cuda_oom(semantic_inference)(mask_cls, mask_pred, mask_prob)
            if not before:
                r = _crop_and_resize(r, image_size, height, width)
            result["sem_seg"] = r
        if panoptic_on:
            result["panoptic_seg"] = retry_if_cuda_oom(panoptic_inference)(
                mask_cls,
                mask_pred,
                num_classes=num_classes,
                thing_ids=thing_ids,
                object_mask_threshold=object_mask_threshold,
                overlap_threshold=overlap_threshold,
                mask_prob=mask_prob,
            )
        if instance_on:
            result["instances"] = retry_if_cuda_oom(instance_inference)(
                mask_cls,
                mask_pred,
                num_classes=num_classes,
                test_topk_per_image=test_topk_per_image,
                thing_ids=thing_ids if panoptic_on else None,
                mask_prob=mask_prob,
            )
        processed.append(result)
    return processed


def output_sizes_from_inputs(
    batched_inputs: Sequence[Dict], image_sizes: Sequence[Tuple[int, int]]
) -> List[Tuple[int, int]]:
    """Requested output size of each image: its "height"/"width" fields, else its input size.

    Args:
        batched_inputs (list[dict]): the model's inputs.
        image_sizes (list[tuple]): (H_img, W_img) per image (``images.image_sizes``).

    Returns:
        list[tuple[int, int]]: (height, width) per image.
    """
    return [
        (x.get("height", s[0]), x.get("width", s[1])) for x, s in zip(batched_inputs, image_sizes)
    ]


def mask_cls_inference_kwargs(cfg) -> Dict:
    """Keyword arguments of :func:`mask_cls_postprocess` from ``cfg``.

    Reads ``cfg.TEST.{SEMANTIC,INSTANCE,PANOPTIC}_ON``, ``cfg.MODEL.MASK_CLS.*`` and the thing
    classes of the first training dataset's metadata (as Mask2Former does).

    Args:
        cfg (CfgNode): config with the shared keys.

    Returns:
        dict: semantic_on, instance_on, panoptic_on, sem_seg_postprocess_before_inference,
        object_mask_threshold, overlap_threshold, test_topk_per_image, thing_ids.
    """
    m = cfg.MODEL.MASK_CLS
    return {
        "semantic_on": cfg.TEST.SEMANTIC_ON,
        "instance_on": cfg.TEST.INSTANCE_ON,
        "panoptic_on": cfg.TEST.PANOPTIC_ON,
        "sem_seg_postprocess_before_inference": (
            m.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE
            or cfg.TEST.PANOPTIC_ON
            or cfg.TEST.INSTANCE_ON
        ),
        "object_mask_threshold": m.OBJECT_MASK_THRESHOLD,
        "overlap_threshold": m.OVERLAP_THRESHOLD,
        "test_topk_per_image": m.TEST_TOPK_PER_IMAGE,
        "thing_ids": train_thing_ids(cfg),
    }


def mask_wise_merge(
    class_probs: torch.Tensor,
    mask_probs: torch.Tensor,
    *,
    thing_ids: Iterable[int] = (),
    class_threshold: float = 0.7,
    overlap_threshold: float = 0.8,
) -> Tuple[torch.Tensor, List[Dict]]:
    """Mask-wise merging (MaskFormer Sec. 3.4) for masks normalised over the queries.

    Used by CMT-DeepLab (Table 2d), whose masks are a softmax over the N mask slots per pixel
    (MaX-DeepLab). A query is kept when its most likely class is not void and that probability
    exceeds ``class_threshold``. Each pixel goes to the kept query with the highest
    ``class score * mask probability``; a query keeps the pixels it wins among those where it is
    also the argmax of the raw mask probabilities (its own mask), and is dropped when it wins less
    than ``overlap_threshold`` of its own mask. Stuff segments of the same class are merged.

    Args:
        class_probs (Tensor): (Q, C + 1) class probabilities (last = void).
        mask_probs (Tensor): (Q, H, W) mask probabilities (summing to 1 over Q at every pixel).
        thing_ids (iterable[int]): contiguous thing class ids.
        class_threshold (float): minimum class confidence.
        overlap_threshold (float): minimum won / own area ratio.

    Returns:
        tuple: (panoptic_seg (H, W) int32 with 0 = void, segments_info list of {"id",
        "isthing", "category_id"}), in the format of :func:`panoptic_inference`.
    """
    num_classes = class_probs.shape[-1] - 1
    scores, labels = class_probs.max(-1)  # (Q,)
    keep = labels.ne(num_classes) & (scores > class_threshold)
    segments = PanopticSegments(
        mask_probs.shape[-2:],
        mask_probs.device,
        thing_ids=thing_ids,
        overlap_threshold=overlap_threshold,
    )
    if not bool(keep.any()):
        return segments.result()
    own_ids = mask_probs.argmax(0)  # (H, W): raw argmax over all queries
    kept = keep.nonzero()[:, 0]
    won_ids = (scores[kept].view(-1, 1, 1) * mask_probs[kept]).argmax(0)  # (H, W) into kept
    for k, q in enumerate(kept.tolist()):
        own = own_ids == q
        segments.add((won_ids == k) & own, int(labels[q]), original_area=int(own.sum()))
    return segments.result()


def per_pixel_merge(
    class_probs: torch.Tensor,
    mask_probs: torch.Tensor,
    *,
    thing_ids: Iterable[int] = (),
    class_threshold: float = 0.7,
) -> Tuple[torch.Tensor, List[Dict]]:
    """MaX-DeepLab's per-pixel panoptic inference: every pixel takes the argmax query of the mask
    probabilities; queries whose class (not void) confidence is at most ``class_threshold`` leave
    their pixels void. Stuff segments of the same class are merged.

    Args:
        class_probs (Tensor): (Q, C + 1) class probabilities.
        mask_probs (Tensor): (Q, H, W) mask probabilities.
        thing_ids (iterable[int]): contiguous thing class ids.
        class_threshold (float): minimum class confidence.

    Returns:
        tuple: (panoptic_seg (H, W) int32, segments_info), as :func:`mask_wise_merge`.
    """
    num_classes = class_probs.shape[-1] - 1
    scores, labels = class_probs.max(-1)
    keep = labels.ne(num_classes) & (scores > class_threshold)
    ids = mask_probs.argmax(0)
    segments = PanopticSegments(ids.shape, mask_probs.device, thing_ids=thing_ids)
    for q in keep.nonzero()[:, 0].tolist():
        segments.add(ids == q, int(labels[q]))
    return segments.result()
