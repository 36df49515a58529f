"""Titles of the drawing panels (ground truth | panoptic | instances | semantic)."""

import numpy as np
from detectron2.data import MetadataCatalog

from seg_methods.data.build import build_dataset_mapper
from seg_methods.engine import Trainer
from seg_methods.engine.visualization import (
    PANEL_TITLES,
    TITLE_BACKGROUND,
    add_title,
    title_band_height,
    visualize_predictions,
)


def _text_pixels(band):
    return (band != np.array(TITLE_BACKGROUND, dtype=np.uint8)).any(axis=-1)


def test_add_title_puts_a_non_blank_band_above_the_panel():
    panel = np.full((100, 90, 3), 7, dtype=np.uint8)
    out = add_title(panel, "ground truth")
    band_h = title_band_height(100)
    assert band_h == 20 and out.shape == (120, 90, 3) and out.dtype == np.uint8
    assert np.array_equal(out[band_h:], panel)  # the drawing itself is untouched
    text = _text_pixels(out[:band_h])
    assert 0.02 < text.mean() < 0.6  # some text, on a background
    cols = np.flatnonzero(text.any(axis=0))
    assert abs((cols[0] + cols[-1]) / 2 - 45) <= 3  # centred
    assert not np.array_equal(out[:band_h], add_title(panel, "semantic")[:band_h])


def test_trainer_drawings_have_one_titled_panel_per_output(engine_cfg, tiny_dataset, tmp_path):
    records, _ = tiny_dataset["val"]
    model = Trainer.build_model(engine_cfg)
    mapper = build_dataset_mapper(engine_cfg, is_train=False)
    meta = MetadataCatalog.get("_engine_tiny_val")
    (path,) = visualize_predictions(model, mapper, records[:1], meta, str(tmp_path), min_size=128)
    from PIL import Image

    img = np.asarray(Image.open(path))
    h, w = records[0]["height"] * 4, records[0]["width"] * 4  # enlarged to a 128 long side
    band_h = title_band_height(h)
    assert img.shape == (band_h + h, 4 * w, 3)
    bands = [img[:band_h, i * w : (i + 1) * w] for i in range(4)]
    for band in bands:
        assert _text_pixels(band).any()  # every panel has a title
    # four different titles, in the order ground truth | panoptic | instances | semantic
    expected = [add_title(np.zeros((h, w, 3), np.uint8), t)[:band_h] for t in PANEL_TITLES.values()]
    for band, exp in zip(bands, expected):
        assert np.array_equal(band, exp)


def test_things_after_stuff_are_drawn_with_their_joint_names():
    """Panoptic metadata with stuff first (sky = 0, things 1, 2): detectron2's Visualizer would
    index thing_classes (2 names) with ids 1 and 2."""
    import torch
    from detectron2.data.catalog import Metadata
    from detectron2.structures import Instances

    from seg_methods.engine.visualization import draw_prediction, drawing_metadata

    meta = Metadata(
        name="_vis_stuff_first",
        thing_classes=["disc", "square"],
        thing_colors=[[200, 0, 0], [0, 200, 0]],
        stuff_classes=["sky", "disc", "square"],
        stuff_colors=[[0, 0, 200], [200, 0, 0], [0, 200, 0]],
        thing_dataset_id_to_contiguous_id={1: 1, 2: 2},
    )
    joint = drawing_metadata(meta)
    assert joint.thing_classes == ["sky", "disc", "square"] and len(joint.thing_colors) == 3
    coco_like = Metadata(name="_vis_coco_like", thing_classes=["a"])
    assert drawing_metadata(coco_like) is coco_like
    image = np.zeros((16, 20, 3), np.uint8)
    seg = torch.zeros(16, 20, dtype=torch.int32)
    seg[4:10, 4:10] = 1
    inst = Instances((16, 20))
    inst.pred_masks = (seg == 1)[None]
    inst.pred_classes = torch.tensor([2])
    inst.scores = torch.tensor([0.9])
    outputs = {
        "panoptic_seg": (seg, [{"id": 1, "category_id": 2, "isthing": True}]),
        "instances": inst,
    }
    for kind in ("panoptic_seg", "instances"):
        assert draw_prediction(image, outputs, meta, kind).shape == (16, 20, 3)
