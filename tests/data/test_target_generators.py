"""Target generators on hand-built tiny label maps, the registry, and generators in the mapper.

Every expected value is written out by hand from the maps below (6x8 pixels at most).
"""

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.structures import BitMasks, Boxes
from panopticapi.utils import id2rgb
from PIL import Image

from seg_methods.config import get_cfg
from seg_methods.data.build import (
    TARGET_GENERATOR_REGISTRY,
    build_dataset_mapper,
    build_target_generator,
)
from seg_methods.data.dataset_mappers import SegDatasetMapper
from seg_methods.data.target_generators import (
    ClassHierarchyTargets,
    CoarseMaskTargets,
    DetectionTargets,
    InstanceEmbeddingTargets,
    InstanceMaskTargets,
    PanopticMaskTargets,
    RegionTargets,
    SemanticMaskTargets,
    SemanticSegTargets,
    TargetLabels,
    class_hierarchy_labels,
    perturb_mask,
)

IGN = 255
# 4x6 semantic map: class 0 left, class 2 right, void in the middle column pair, padding row 4
SEM = torch.tensor(
    [
        [0, 0, IGN, IGN, 2, 2],
        [0, 0, IGN, IGN, 2, 2],
        [0, 0, 1, 1, 2, 2],
        [0, 0, 1, 1, 2, 2],
        [IGN] * 6,  # padding
    ]
)
# panoptic ids on the same 5x6 frame: thing 11 (class 0), thing 12 (class 0), stuff 20
# (class 1), crowd 30 (class 2), void 0, padding -1
PAN = torch.tensor(
    [
        [11, 11, 0, 20, 30, 30],
        [11, 11, 0, 20, 30, 30],
        [20, 20, 20, 20, 12, 12],
        [20, 20, 20, 20, 12, 0],
        [-1] * 6,
    ]
)
SEGMENTS = [
    {"id": 11, "category_id": 0, "iscrowd": 0, "isthing": True},
    {"id": 20, "category_id": 1, "iscrowd": 0, "isthing": False},
    {"id": 12, "category_id": 0, "iscrowd": 0, "isthing": True},
    {"id": 30, "category_id": 2, "iscrowd": 1, "isthing": True},
]


def _labels(**kw):
    kw.setdefault("image_size", (5, 6))
    kw.setdefault("valid_size", (4, 6))
    kw.setdefault("ignore_label", IGN)
    return TargetLabels(**kw)


def _pan_labels(**kw):
    return _labels(pan_ids=PAN.clone(), segments_info=[dict(s) for s in SEGMENTS], **kw)


# ----------------------------------------------------------------------------- registry
def test_every_generator_is_registered_and_optional_marker_works():
    names = {k for k, _ in TARGET_GENERATOR_REGISTRY}
    assert {
        "semantic_masks",
        "panoptic_masks",
        "instance_masks",
        "sem_seg",
        "class_hierarchy",
        "instance_embedding",
        "detection",
        "coarse_mask",
        "regions",
    } <= names
    cfg = get_cfg()
    g = build_target_generator("sem_seg?", cfg)
    assert isinstance(g, SemanticSegTargets) and g.optional and g.name == "sem_seg"
    assert not build_target_generator("sem_seg", cfg).optional
    with pytest.raises(KeyError, match="coarse_mask"):  # lists the registered names
        build_target_generator("nope", cfg)


# ----------------------------------------------------------------------------- mask targets
def test_semantic_masks_one_mask_per_present_class():
    out = SemanticMaskTargets()(_labels(sem_seg=SEM.clone(), num_classes=3))
    inst = out["instances"]
    assert inst.image_size == (5, 6)
    assert inst.gt_classes.tolist() == [0, 1, 2]
    for c, m in zip(inst.gt_classes.tolist(), inst.gt_masks):
        assert torch.equal(m, SEM == c)
    assert inst.gt_boxes.tensor.tolist() == [[0, 0, 2, 4], [2, 2, 4, 4], [4, 0, 6, 4]]
    with pytest.raises(ValueError, match=r"\[2\]"):
        SemanticMaskTargets()(_labels(sem_seg=SEM.clone(), num_classes=2))


def test_panoptic_masks_skip_crowd_void_and_padding():
    inst = PanopticMaskTargets()(_pan_labels(num_classes=3))["instances"]
    assert inst.gt_classes.tolist() == [0, 1, 0]  # 11, 20, 12; crowd 30 dropped
    assert torch.equal(inst.gt_masks[0], PAN == 11)
    assert torch.equal(inst.gt_masks[1], PAN == 20)
    assert torch.equal(inst.gt_masks[2], PAN == 12)
    assert not inst.gt_masks[:, 4].any()


def test_instance_masks_drop_empty_objects():
    m1 = torch.zeros(5, 6, dtype=torch.bool)
    m1[1:3, 2:5] = True
    empty = torch.zeros(5, 6, dtype=torch.bool)
    labels = _labels(instance_masks=[m1, empty], instance_classes=[1, 0], num_classes=2)
    inst = InstanceMaskTargets()(labels)["instances"]
    assert inst.gt_classes.tolist() == [1]
    assert torch.equal(inst.gt_masks[0], m1)
    assert inst.gt_boxes.tensor.tolist() == [[2, 1, 5, 3]]


# ----------------------------------------------------------------------------- sem_seg
def test_sem_seg_keeps_void_and_padding_as_ignore():
    out = SemanticSegTargets(num_classes=3)(_labels(sem_seg=SEM.clone()))
    assert out["sem_seg"].dtype == torch.int64
    assert torch.equal(out["sem_seg"], SEM)
    assert (out["sem_seg"][4] == IGN).all() and (out["sem_seg"][:2, 2:4] == IGN).all()
    with pytest.raises(ValueError, match="sem.png"):
        SemanticSegTargets(num_classes=2)(
            _labels(sem_seg=SEM.clone(), sources={"sem_seg": "sem.png"})
        )


# ----------------------------------------------------------------------------- hierarchy
HIERARCHY = {
    "names": [["cat", "dog", "tree"], ["animal", "plant"], ["thing"]],
    "parents": [[0, 0, 1], [0, 0]],
}


def test_class_hierarchy_labels_per_level_and_void_stays_void():
    out = ClassHierarchyTargets(class_hierarchy=HIERARCHY)(_labels(sem_seg=SEM.clone()))
    lab = out["hierarchy_labels"]
    assert lab.shape == (3, 5, 6) and lab.dtype == torch.int64
    assert torch.equal(lab[0], SEM)
    expected1 = torch.tensor(
        [
            [0, 0, IGN, IGN, 1, 1],
            [0, 0, IGN, IGN, 1, 1],
            [0, 0, 0, 0, 1, 1],
            [0, 0, 0, 0, 1, 1],
            [IGN] * 6,
        ]
    )
    assert torch.equal(lab[1], expected1)
    assert torch.equal(lab[2], torch.where(SEM == IGN, IGN, 0))


def test_class_hierarchy_errors():
    with pytest.raises(ValueError, match="parent"):
        ClassHierarchyTargets(class_hierarchy={"names": [["a", "b"], ["x"]], "parents": [[0]]})
    with pytest.raises(ValueError, match="out of range"):
        ClassHierarchyTargets(class_hierarchy={"names": [["a"], ["x"]], "parents": [[3]]})
    with pytest.raises(ValueError, match=r"\[5\]"):
        class_hierarchy_labels(torch.tensor([[5, 0]]), [[0, 0, 1]], 3, ignore_label=IGN)
    name = "_test_targets_no_hierarchy"
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)
    MetadataCatalog.get(name).set(stuff_classes=["a"])
    cfg = get_cfg()
    cfg.DATASETS.TRAIN = (name,)
    with pytest.raises(KeyError, match="class_hierarchy.*INPUT.EXTRA_TARGETS"):
        build_target_generator("class_hierarchy", cfg)


# ----------------------------------------------------------------------------- embedding
def test_instance_embedding_ids_centres_classes():
    sem = torch.tensor(
        [[0, 0, IGN, 1, 2, 2], [0, 0, IGN, 1, 2, 2], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, IGN]]
        + [[IGN] * 6]
    )
    out = InstanceEmbeddingTargets()(_pan_labels(sem_seg=sem))
    expected = torch.tensor(
        [
            [1, 1, -1, 0, -1, -1],  # crowd 30 -> void
            [1, 1, -1, 0, -1, -1],
            [0, 0, 0, 0, 2, 2],
            [0, 0, 0, 0, 2, -1],
            [-1] * 6,  # padding
        ]
    )
    assert torch.equal(out["instance_ids"], expected)
    # centres: mean (row, col) of the instance pixels
    expected_centers = torch.tensor([[0.5, 0.5], [(2 + 2 + 3) / 3, (4 + 5 + 4) / 3]])
    assert torch.allclose(out["instance_centers"], expected_centers)
    assert out["instance_classes"].tolist() == [0, 0]
    assert torch.equal(out["sem_seg"], sem)


def test_instance_embedding_thing_ids_without_isthing_flag():
    segs = [{k: v for k, v in s.items() if k != "isthing"} for s in SEGMENTS]
    labels = _labels(pan_ids=PAN.clone(), segments_info=segs, sem_seg=SEM.clone())
    out = InstanceEmbeddingTargets(thing_ids=[0])(labels)
    assert out["instance_classes"].tolist() == [0, 0]
    with pytest.raises(KeyError, match="isthing"):
        InstanceEmbeddingTargets()(labels)


def test_instance_embedding_without_instances():
    pan = torch.full((3, 4), 20)
    out = InstanceEmbeddingTargets()(
        _labels(
            image_size=(3, 4),
            pan_ids=pan,
            segments_info=[SEGMENTS[1]],
            sem_seg=torch.ones(3, 4, dtype=torch.int64),
        )
    )
    assert (out["instance_ids"] == 0).all()
    assert out["instance_centers"].shape == (0, 2) and out["instance_classes"].shape == (0,)


# ----------------------------------------------------------------------------- detection
def test_detection_things_only_with_thing_ranks_and_bitmasks():
    # joint label space: stuff 0, things 1 and 3 -> thing ranks 0 and 1
    segs = [
        {"id": 11, "category_id": 3, "iscrowd": 0, "isthing": True},
        {"id": 20, "category_id": 0, "iscrowd": 0, "isthing": False},
        {"id": 12, "category_id": 1, "iscrowd": 0, "isthing": True},
        {"id": 30, "category_id": 1, "iscrowd": 1, "isthing": True},
    ]
    labels = _labels(pan_ids=PAN.clone(), segments_info=segs)
    inst = DetectionTargets(thing_ids=[3, 1])(labels)["instances"]
    assert isinstance(inst.gt_boxes, Boxes) and isinstance(inst.gt_masks, BitMasks)
    assert inst.gt_classes.tolist() == [1, 0]  # segment 11 (class 3), segment 12 (class 1)
    assert torch.equal(inst.gt_masks.tensor[0], PAN == 11)
    assert inst.gt_boxes.tensor.tolist() == [[0, 0, 2, 2], [4, 2, 6, 4]]
    # detectron2's mask head accepts them (crop_and_resize of BitMasks against proposals)
    from detectron2.modeling.roi_heads.mask_head import mask_rcnn_loss
    from detectron2.utils.events import EventStorage

    inst.proposal_boxes = inst.gt_boxes
    logits = torch.zeros(len(inst), 2, 7, 7, requires_grad=True)
    with EventStorage():
        loss = mask_rcnn_loss(logits, [inst])
    loss.backward()
    assert torch.isfinite(loss)


def test_detection_from_annotations_and_errors():
    m = torch.zeros(5, 6, dtype=torch.bool)
    m[0, 0] = True
    labels = _labels(instance_masks=[m], instance_classes=[2])
    inst = DetectionTargets()(labels)["instances"]
    assert inst.gt_classes.tolist() == [2] and inst.gt_boxes.tensor.tolist() == [[0, 0, 1, 1]]
    with pytest.raises(ValueError, match="not thing classes"):
        DetectionTargets(thing_ids=[0, 1])(labels)
    with pytest.raises(KeyError, match="annotations"):
        DetectionTargets()(_labels(sources={"image": "x.jpg"}))


# ----------------------------------------------------------------------------- coarse masks
def _disc_labels(rng=None, size=(24, 32), valid=(20, 32)):
    yy, xx = np.mgrid[: size[0], : size[1]]
    pan = torch.zeros(size, dtype=torch.int64)
    pan[torch.from_numpy((yy - 10) ** 2 + (xx - 12) ** 2 <= 36)] = 5
    pan[valid[0] :] = -1
    segs = [{"id": 5, "category_id": 0, "iscrowd": 0, "isthing": True}]
    return _labels(image_size=size, valid_size=valid, pan_ids=pan, segments_info=segs, rng=rng)


def test_coarse_mask_identity_without_perturbation():
    gen = CoarseMaskTargets(radius_range=(0, 0), downsample_range=(1, 1))
    labels = _disc_labels(np.random.default_rng(0))
    out = gen(labels)
    assert out["gt_mask"].dtype == torch.bool and out["coarse_mask"].dtype == torch.float32
    assert torch.equal(out["gt_mask"], labels.pan_ids == 5)
    assert torch.equal(out["coarse_mask"], out["gt_mask"].float())


def test_coarse_mask_dilation_and_erosion_by_hand():
    m = np.zeros((7, 7), bool)
    m[2:5, 2:5] = True
    grown = perturb_mask(
        m, np.random.default_rng(0), radius_range=(1, 1), dilate_prob=1.0, downsample_range=(1, 1)
    )
    expected = np.zeros((7, 7), np.float32)
    expected[1:6, 2:5] = 1  # radius-1 ellipse = cross: the square grows by one, corners stay
    expected[2:5, 1:6] = 1
    assert np.array_equal(grown, expected)
    shrunk = perturb_mask(
        m, np.random.default_rng(0), radius_range=(1, 1), dilate_prob=0.0, downsample_range=(1, 1)
    )
    expected = np.zeros((7, 7), np.float32)
    expected[3, 3] = 1
    assert np.array_equal(shrunk, expected)


def test_coarse_mask_is_reproducible_and_perturbed():
    gen = CoarseMaskTargets()
    a = gen(_disc_labels(np.random.default_rng(3)))
    b = gen(_disc_labels(np.random.default_rng(3)))
    assert torch.equal(a["coarse_mask"], b["coarse_mask"])
    outs = [gen(_disc_labels(np.random.default_rng(s)))["coarse_mask"] for s in range(6)]
    gt = a["gt_mask"].float()
    assert any(not torch.equal(o, gt) for o in outs)  # it does perturb
    assert len({tuple(o.flatten().tolist()) for o in outs}) > 1  # and depends on the seed
    for o in outs:
        assert set(o.unique().tolist()) <= {0.0, 1.0}
        assert (o[20:] == 0).all()  # padding stays 0


def test_coarse_mask_global_seed_and_empty_image():
    gen = CoarseMaskTargets()
    np.random.seed(7)
    a = gen(_disc_labels())["coarse_mask"]
    np.random.seed(7)
    b = gen(_disc_labels())["coarse_mask"]
    assert torch.equal(a, b)
    empty = _labels(image_size=(4, 4), sem_seg=torch.full((4, 4), IGN))
    out = gen(empty)
    assert not out["gt_mask"].any() and not out["coarse_mask"].any()
    with pytest.raises(ValueError, match="downsample_range"):
        CoarseMaskTargets(downsample_range=(0, 2))


# ----------------------------------------------------------------------------- regions
def test_regions_generator_passes_the_map():
    reg = torch.arange(30).view(5, 6)
    assert torch.equal(RegionTargets()(_labels(regions=reg))["regions"], reg)
    assert RegionTargets().missing(_labels()) == ["regions"]


# ----------------------------------------------------------------------------- in the mapper
H, W = 6, 8


@pytest.fixture
def pan_record(tmp_path):
    rng = np.random.RandomState(0)
    img = rng.randint(0, 256, size=(H, W, 3), dtype=np.uint8)
    pan = np.zeros((H, W), dtype=np.int64)
    pan[:3, :4] = 11  # thing, class 0
    pan[3:, :] = 22  # stuff, class 1
    pan[:3, 5:7] = 12  # thing, class 0
    segs = [
        {"id": 11, "category_id": 0, "iscrowd": 0, "isthing": True},
        {"id": 22, "category_id": 1, "iscrowd": 0, "isthing": False},
        {"id": 12, "category_id": 0, "iscrowd": 0, "isthing": True},
    ]
    Image.fromarray(img).save(tmp_path / "img.png")
    Image.fromarray(id2rgb(pan).astype(np.uint8)).save(tmp_path / "pan.png")
    regions = np.arange(H * W, dtype=np.uint16).reshape(H, W)
    Image.fromarray(regions).save(tmp_path / "regions.png")
    return {
        "file_name": str(tmp_path / "img.png"),
        "image_id": 0,
        "height": H,
        "width": W,
        "pan_seg_file_name": str(tmp_path / "pan.png"),
        "segments_info": segs,
        "regions_file_name": str(tmp_path / "regions.png"),
        "_pan": pan,
    }


def test_mapper_hands_one_flipped_padded_label_set_to_every_generator(pan_record):
    gens = [
        PanopticMaskTargets(),
        SemanticSegTargets(),
        ClassHierarchyTargets(class_hierarchy={"names": [["a", "b"], ["r"]], "parents": [[0, 0]]}),
        InstanceEmbeddingTargets(),
        CoarseMaskTargets(radius_range=(0, 0), downsample_range=(1, 1)),
        RegionTargets(),
    ]
    mapper = SegDatasetMapper(
        is_train=True,
        augmentations=[T.RandomFlip(prob=1.0, horizontal=True)],
        image_format="RGB",
        target_generators=gens,
        num_classes=2,
        size_divisibility=4,
    )
    out = mapper(pan_record)
    pan = torch.from_numpy(pan_record["_pan"][:, ::-1].copy())  # flipped
    assert out["image"].shape == (3, 8, 8)
    sem = out["sem_seg"]
    assert torch.equal(sem[:H], torch.where(pan == 22, 1, torch.where(pan == 0, IGN, 0)))
    assert (sem[H:] == IGN).all()
    assert torch.equal(out["hierarchy_labels"][1], torch.where(sem == IGN, IGN, 0))
    ids = out["instance_ids"]
    assert torch.equal(ids[:H] == 1, pan == 11) and torch.equal(ids[:H] == 2, pan == 12)
    assert (ids[H:] == -1).all()
    assert torch.equal(out["instances"].gt_masks[0, :H], pan == 11)
    assert torch.equal(out["regions"][:H], torch.arange(H * W).view(H, W).flip(-1))
    assert (out["regions"][H:] == -1).all()
    assert out["gt_mask"].sum() == out["coarse_mask"].sum() > 0


def test_mapper_rejects_two_generators_writing_different_values(pan_record):
    mapper = SegDatasetMapper(
        is_train=True,
        augmentations=[],
        image_format="RGB",
        target_generators=[PanopticMaskTargets(), DetectionTargets()],
    )
    with pytest.raises(ValueError, match="'instances'"):
        mapper(pan_record)


def test_optional_generator_is_skipped_and_required_one_raises(pan_record):
    rec = {k: pan_record[k] for k in ("file_name", "pan_seg_file_name", "segments_info")}
    opt = RegionTargets()
    opt.optional = True
    mapper = SegDatasetMapper(
        is_train=True,
        augmentations=[],
        image_format="RGB",
        target_generators=[PanopticMaskTargets(), opt],
    )
    out = mapper(rec)
    assert "regions" not in out and len(out["instances"]) == 3
    strict = SegDatasetMapper(
        is_train=True, augmentations=[], image_format="RGB", target_generators=[RegionTargets()]
    )
    with pytest.raises(KeyError, match="regions_file_name"):
        strict(rec)


def _register(name, records, **meta):
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: records)
    MetadataCatalog.get(name).set(**meta)


def test_extra_targets_from_config(pan_record):
    name = "_test_targets_extra"
    _register(
        name,
        [pan_record],
        stuff_classes=["a", "b"],
        thing_classes=["a"],
        thing_dataset_id_to_contiguous_id={1: 0},
        ignore_label=IGN,
        class_hierarchy={"names": [["a", "b"], ["r"]], "parents": [[0, 0]]},
    )
    cfg = get_cfg()
    cfg.DATASETS.TRAIN = (name,)
    cfg.INPUT.FORMAT = "RGB"
    cfg.INPUT.DATASET_MAPPER_NAME = "mask_former_panoptic"
    cfg.INPUT.MIN_SIZE_TRAIN = (H,)
    cfg.INPUT.RANDOM_FLIP = "none"
    cfg.INPUT.EXTRA_TARGETS = ["class_hierarchy", "instance_embedding"]
    mapper = build_dataset_mapper(cfg, is_train=True)
    assert [g.name for g in mapper.target_generators] == [
        "panoptic_masks",
        "sem_seg",
        "class_hierarchy",
        "instance_embedding",
    ]
    out = mapper(pan_record)
    assert out["hierarchy_labels"].shape == (2, H, W)
    assert out["instance_classes"].tolist() == [0, 0]
    assert len(out["instances"]) == 3


def test_superpixel_mapper_is_the_regions_generator(pan_record):
    name = "_test_targets_superpixel"
    _register(name, [pan_record], evaluator_type="superpixel")
    cfg = get_cfg()
    cfg.DATASETS.TRAIN = (name,)
    cfg.INPUT.FORMAT = "RGB"
    cfg.INPUT.DATASET_MAPPER_NAME = "superpixel"
    cfg.INPUT.MIN_SIZE_TRAIN = (H,)
    cfg.INPUT.RANDOM_FLIP = "none"
    cfg.INPUT.SIZE_DIVISIBILITY = 4
    mapper = build_dataset_mapper(cfg, is_train=True)
    out = mapper(pan_record)
    assert set(out) >= {"image", "regions"} and "instances" not in out and "sem_seg" not in out
    assert out["regions"].shape == (8, 8)
    assert torch.equal(out["regions"][:H], torch.arange(H * W).view(H, W))
    assert (out["regions"][H:] == -1).all()
    test_out = build_dataset_mapper(cfg, is_train=False)(pan_record)
    assert "regions" not in test_out and test_out["regions_file_name"].endswith("regions.png")
