"""Panoptic-segment assembly shared by every panoptic merge function.

Every merge rule (Mask2Former's ``argmax_q p_q m_q`` with an overlap test, MaskFormer's
mask-wise merging for masks normalised over the queries, MaX-DeepLab's per-pixel argmax, and the
ones of later methods) ends with the same steps, written once in :class:`PanopticSegments`:

1. candidate segments are added in order (the merge function decides the order and each
   candidate's pixels);
2. a candidate is dropped when it has no pixel, or when its visible area over its original area is
   below ``overlap_threshold``;
3. a stuff candidate whose class already has a segment is painted with that segment's id (all
   stuff of one class is one segment); any other kept candidate gets the next id (1, 2, ...);
4. the result is a (H, W) int32 id map (0 = void) and detectron2's ``segments_info``
   (``{"id", "isthing", "category_id"}`` in id order).

Shape shorthand:
    H, W: output size
"""

from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

__all__ = ["PanopticSegments"]


class PanopticSegments:
    """Accumulates panoptic segments on an (H, W) canvas (module docstring, steps 1-4).

    Example::

        segments = PanopticSegments((h, w), device, thing_ids={0, 1}, overlap_threshold=0.8)
        for mask, category, visible, original in candidates:
            segments.add(mask, category, visible_area=visible, original_area=original)
        panoptic_seg, segments_info = segments.result()

    Args:
        size (sequence[int]): (H, W) of the output.
        device: device of the id map.
        thing_ids (iterable[int]): contiguous ids of the thing classes; the others are stuff.
        overlap_threshold (float): a candidate is dropped when
            ``visible_area / original_area < overlap_threshold``.
    """

    def __init__(
        self,
        size: Sequence[int],
        device,
        *,
        thing_ids: Iterable[int] = (),
        overlap_threshold: float = 0.0,
    ):
        self.thing_ids = set(int(t) for t in thing_ids)
        self.overlap_threshold = overlap_threshold
        self.panoptic_seg = torch.zeros(tuple(size), dtype=torch.int32, device=device)
        self.segments_info: List[Dict] = []
        self._stuff_segment_ids: Dict[int, int] = {}  # stuff class -> its (single) segment id

    def add(
        self,
        mask: torch.Tensor,
        category_id: int,
        *,
        visible_area: Optional[int] = None,
        original_area: Optional[int] = None,
    ) -> int:
        """Paint one candidate segment if it passes the area tests.

        Args:
            mask (Tensor): (H, W) bool, the pixels the candidate gets.
            category_id (int): contiguous class id.
            visible_area (int or None): numerator of the overlap test (default: pixels of
                ``mask``). Merge rules differ in what they count here, e.g. Mask2Former counts
                the pixels the query wins before intersecting them with its own mask.
            original_area (int or None): denominator of the overlap test (default:
                ``visible_area``, i.e. no overlap test).

        Returns:
            int: the id the pixels were painted with, or 0 when the candidate was dropped.
        """
        area = int(mask.sum().item())
        visible = area if visible_area is None else int(visible_area)
        original = visible if original_area is None else int(original_area)
        if area == 0 or visible == 0 or original == 0:
            return 0
        if visible / original < self.overlap_threshold:
            return 0
        category_id = int(category_id)
        isthing = category_id in self.thing_ids
        if not isthing and category_id in self._stuff_segment_ids:
            segment_id = self._stuff_segment_ids[category_id]
            self.panoptic_seg[mask] = segment_id
            return segment_id
        segment_id = len(self.segments_info) + 1
        if not isthing:
            self._stuff_segment_ids[category_id] = segment_id
        self.panoptic_seg[mask] = segment_id
        self.segments_info.append(
            {"id": segment_id, "isthing": bool(isthing), "category_id": category_id}
        )
        return segment_id

    def result(self) -> Tuple[torch.Tensor, List[Dict]]:
        """(panoptic_seg (H, W) int32 with 0 = void, segments_info in id order)."""
        return self.panoptic_seg, self.segments_info
