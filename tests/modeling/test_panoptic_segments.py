"""The panoptic-segment accumulator shared by every merge function (hand-made 2x3 canvases)."""

import torch

from seg_methods.modeling.postprocessing import PanopticSegments


def _mask(rows):
    return torch.tensor(rows, dtype=torch.bool)


def test_ids_in_order_things_separate_stuff_of_one_class_merged():
    seg = PanopticSegments((2, 3), "cpu", thing_ids={0})
    assert seg.add(_mask([[1, 0, 0], [0, 0, 0]]), 0) == 1  # thing
    assert seg.add(_mask([[0, 1, 0], [0, 0, 0]]), 0) == 2  # another thing of the same class
    assert seg.add(_mask([[0, 0, 1], [0, 0, 0]]), 3) == 3  # stuff
    assert seg.add(_mask([[0, 0, 0], [1, 1, 0]]), 3) == 3  # same stuff class: same segment
    assert seg.add(_mask([[0, 0, 0], [0, 0, 1]]), 2) == 4  # other stuff class
    panoptic_seg, segments_info = seg.result()
    assert panoptic_seg.dtype == torch.int32
    assert panoptic_seg.tolist() == [[1, 2, 3], [3, 3, 4]]
    assert segments_info == [
        {"id": 1, "isthing": True, "category_id": 0},
        {"id": 2, "isthing": True, "category_id": 0},
        {"id": 3, "isthing": False, "category_id": 3},
        {"id": 4, "isthing": False, "category_id": 2},
    ]


def test_overlap_test_and_empty_candidates():
    seg = PanopticSegments((2, 3), "cpu", thing_ids={1}, overlap_threshold=0.5)
    m = _mask([[1, 1, 0], [0, 0, 0]])
    # visible 2 of original 5: 0.4 < 0.5, dropped; nothing painted, no id used
    assert seg.add(m, 1, visible_area=2, original_area=5) == 0
    assert seg.add(_mask([[0, 0, 0], [0, 0, 0]]), 1) == 0  # no pixel
    assert seg.add(m, 1, visible_area=0, original_area=5) == 0  # nothing visible
    assert seg.add(m, 1, visible_area=3, original_area=0) == 0  # no original area
    # exactly at the threshold is kept; by default the visible area is the mask's
    assert seg.add(m, 1, original_area=4) == 1
    # the numerator may count pixels outside the painted mask (Mask2Former's rule)
    assert seg.add(_mask([[0, 0, 1], [0, 0, 0]]), 1, visible_area=3, original_area=6) == 2
    panoptic_seg, segments_info = seg.result()
    assert panoptic_seg.tolist() == [[1, 1, 2], [0, 0, 0]]
    assert [s["id"] for s in segments_info] == [1, 2]


def test_a_later_segment_paints_over_an_earlier_one():
    seg = PanopticSegments((1, 3), "cpu")
    seg.add(_mask([[1, 1, 1]]), 5)
    seg.add(_mask([[0, 1, 0]]), 6)
    panoptic_seg, segments_info = seg.result()
    assert panoptic_seg.tolist() == [[1, 2, 1]]
    assert [s["isthing"] for s in segments_info] == [False, False]


def test_empty_result():
    panoptic_seg, segments_info = PanopticSegments((2, 2), "cpu").result()
    assert panoptic_seg.tolist() == [[0, 0], [0, 0]] and segments_info == []
