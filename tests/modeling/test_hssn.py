"""HSSN: tree-min / focal tree-min (Eq. 4-6), tree-triplet (Eq. 7), tree-respecting inference and
the per-level mIoU evaluator, on hand-built tiny trees and arrays."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.data import DatasetCatalog, MetadataCatalog

from seg_methods.evaluation.hierarchy import (
    HierarchicalSemSegEvaluator,
    level_confusion,
    mean_iou,
    per_level_miou,
)
from seg_methods.modeling.criterion.hssn import (
    ClassTree,
    leaf_path_logits,
    per_level_cross_entropy,
    tree_distances,
    tree_min_logits,
    tree_min_loss,
    tree_triplet_loss,
    triplet_ramp,
)

VOID = 255
# a, b -> A; c -> B.  Global node ids: a 0, b 1, c 2, A 3, B 4.
TWO_LEVEL = {"names": [["a", "b", "c"], ["A", "B"]], "parents": [[0, 0, 1]]}
# a, b -> A -> X; c -> B -> X; d -> C -> Y.
THREE_LEVEL = {
    "names": [["a", "b", "c", "d"], ["A", "B", "C"], ["X", "Y"]],
    "parents": [[0, 0, 1, 2], [0, 0, 1]],
}


def _sig(x):
    return 1.0 / (1.0 + math.exp(-x))


# ----------------------------------------------------------------------------- tree
def test_class_tree_tables():
    t = ClassTree(THREE_LEVEL, num_classes=4)
    assert (t.num_levels, t.num_leaves, t.num_nodes) == (3, 4, 9)
    assert t.offsets == [0, 4, 7]
    assert t.paths.tolist() == [[0, 1, 2, 3], [4, 4, 5, 6], [7, 7, 7, 8]]
    labels = t.level_labels(torch.tensor([[0, 2], [3, VOID]]), VOID)
    assert labels.tolist() == [[[0, 2], [3, VOID]], [[0, 1], [2, VOID]], [[0, 0], [1, VOID]]]
    with pytest.raises(ValueError, match="outside the tree"):
        t.level_labels(torch.tensor([4]), VOID)


def test_class_tree_errors():
    with pytest.raises(ValueError, match="NUM_CLASSES"):  # a class missing from the tree
        ClassTree(TWO_LEVEL, num_classes=4)
    with pytest.raises(ValueError, match="no child"):
        ClassTree({"names": [["a", "b"], ["A", "B", "C"]], "parents": [[0, 1]]})
    with pytest.raises(ValueError, match="out of range"):
        ClassTree({"names": [["a", "b"], ["A"]], "parents": [[0, 1]]})
    with pytest.raises(ValueError, match="parent lists"):
        ClassTree({"names": [["a", "b"], ["A"]], "parents": []})
    with pytest.raises(ValueError, match="'names' and 'parents'"):
        ClassTree({"names": [["a"]]})


def test_tree_distances():
    t = ClassTree(THREE_LEVEL)
    psi = tree_distances(t.ancestors)
    # a-b share A (2 edges), a-c share X (4), a-d only the implicit root (6)
    assert psi.tolist() == [[0, 2, 4, 6], [2, 0, 4, 6], [4, 4, 0, 6], [6, 6, 6, 0]]


# ----------------------------------------------------------------------------- tree-min
def test_tree_min_logits_by_hand_and_t_constraints():
    t = ClassTree(TWO_LEVEL)
    z = torch.tensor([0.5, 2.0, 1.0, -0.3, -0.5]).view(1, 5, 1, 1)
    pos, neg = tree_min_logits(z, t)
    # positive: min over the node and its ancestors; negative: max over the node and subtree
    assert pos.flatten().tolist() == pytest.approx([-0.3, -0.3, -0.5, -0.3, -0.5])
    assert neg.flatten().tolist() == pytest.approx([0.5, 2.0, 1.0, 2.0, 1.0])
    # T-constraints on random scores: s_pos(child) <= s_pos(parent), s_neg(parent) >= s_neg(child)
    t3 = ClassTree(THREE_LEVEL)
    z = torch.randn(2, 9, 3, 4, generator=torch.Generator().manual_seed(0))
    pos, neg = tree_min_logits(z, t3)
    for level, par in enumerate(t3.parents):
        for i, p in enumerate(par):
            child, parent = t3.offsets[level] + i, t3.offsets[level + 1] + p
            assert (pos[:, child] <= pos[:, parent]).all()
            assert (neg[:, child] <= neg[:, parent]).all()


@pytest.mark.parametrize("focal", [False, True])
def test_tree_min_loss_by_hand(focal):
    t = ClassTree(TWO_LEVEL)
    za, zb, zc, zA, zB = 0.5, 2.0, 1.0, -0.3, -0.5
    z = torch.tensor([za, zb, zc, zA, zB]).view(1, 5, 1, 1)
    g = 2.0 if focal else 0.0

    def pos(x):
        return -((1 - _sig(x)) ** g) * math.log(_sig(x))

    def neg(x):
        return -(_sig(x) ** g) * math.log(1 - _sig(x))

    # pixel of class a: level 0 positive a (min(za, zA)), negatives b, c (themselves);
    # level 1 positive A (zA), negative B (max(zB, zc)).
    expected = (pos(min(za, zA)) + neg(zb) + neg(zc)) / 3 + (pos(zA) + neg(max(zB, zc))) / 2
    loss = tree_min_loss(z, torch.tensor([[[0]]]), t, ignore_value=VOID, focal=focal, gamma=2.0)
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_tree_min_loss_normalises_by_valid_pixels_and_excludes_void():
    t = ClassTree(TWO_LEVEL)
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(1, 5, 1, 2, generator=gen)
    labels = torch.tensor([[[0, 2]]])
    both = tree_min_loss(z, labels, t, ignore_value=VOID)
    singles = [
        tree_min_loss(z[..., i : i + 1], labels[..., i : i + 1], t, ignore_value=VOID)
        for i in range(2)
    ]
    assert float(both) == pytest.approx(float(sum(singles)) / 2, rel=1e-5)
    # void pixels, whatever their logits, change neither the loss nor get a gradient
    zv = torch.cat([z, 50 * torch.randn(1, 5, 1, 3, generator=gen)], dim=3).requires_grad_()
    lv = torch.cat([labels, torch.full((1, 1, 3), VOID)], dim=2)
    with_void = tree_min_loss(zv, lv, t, ignore_value=VOID)
    assert float(with_void.detach()) == pytest.approx(float(both), rel=1e-5)
    with_void.backward()
    assert zv.grad[..., 2:].abs().max() == 0 and zv.grad[..., :2].abs().max() > 0
    # void is not trained as class 0 (the ports' in-place overwrite)
    ce = per_level_cross_entropy(zv, lv, t, ignore_value=VOID)
    assert float(ce) == pytest.approx(
        float(per_level_cross_entropy(z, labels, t, ignore_value=VOID))
    )


def test_per_level_cross_entropy_by_hand():
    t = ClassTree(TWO_LEVEL)
    z = torch.tensor([0.5, 2.0, 1.0, -0.3, -0.5]).view(1, 5, 1, 1)
    loss = per_level_cross_entropy(z, torch.tensor([[[2]]]), t, ignore_value=VOID)
    leaf = -F.log_softmax(torch.tensor([0.5, 2.0, 1.0]), 0)[2]
    top = -F.log_softmax(torch.tensor([-0.3, -0.5]), 0)[1]
    assert float(loss) == pytest.approx(float(leaf + top), rel=1e-6)


def test_all_void_batch_gives_zero_finite_losses_with_gradient():
    t = ClassTree(TWO_LEVEL)
    z = torch.randn(2, 5, 3, 3, requires_grad=True)
    emb = F.normalize(torch.randn(2, 4, 3, 3), dim=1).requires_grad_()
    void = torch.full((2, 3, 3), VOID)
    losses = [
        tree_min_loss(z, void, t, ignore_value=VOID),
        tree_min_loss(z, void, t, ignore_value=VOID, focal=False),
        per_level_cross_entropy(z, void, t, ignore_value=VOID),
        tree_triplet_loss(emb, void, t, ignore_value=VOID),
    ]
    for loss in losses:
        assert loss.dim() == 0 and torch.isfinite(loss) and float(loss) == 0.0
    sum(losses).backward()
    assert torch.isfinite(z.grad).all() and torch.isfinite(emb.grad).all()


# ----------------------------------------------------------------------------- tree-triplet
def _embed(vectors):
    """(P, D) vectors -> (1, D, 1, P) L2-normalised embedding map."""
    e = F.normalize(torch.tensor(vectors, dtype=torch.float32), dim=1)
    return e.t().unsqueeze(0).unsqueeze(2)


def test_tree_triplet_margin_by_hand():
    t = ClassTree(TWO_LEVEL)
    # one pixel of a and one of c: each is its own positive (psi 0, distance 0) and the other's
    # negative (psi 4, cosine 0.8 -> distance 0.2). D = 2: m = eps + factor * (4 - 0) / 4.
    emb = _embed([[1.0, 0.0], [0.8, 0.6]])
    labels = torch.tensor([[[0, 2]]])
    for eps, factor in [(0.1, 0.5), (0.1, 1.0), (0.05, 0.0)]:
        loss = tree_triplet_loss(
            emb, labels, t, ignore_value=VOID, margin_eps=eps, margin_tree_factor=factor,
            include_anchor_class=True,
        )  # fmt: skip
        assert float(loss) == pytest.approx(max(0.0 - 0.2 + eps + factor, 0.0), abs=1e-6)
    # by default (the ports) positives come from the OTHER classes under the parent only, so
    # here nobody has a positive: no triplet, a defined 0
    assert float(tree_triplet_loss(emb, labels, t, ignore_value=VOID)) == 0.0
    # void pixels never enter a triplet
    emb_v = _embed([[1.0, 0.0], [0.8, 0.6], [-1.0, 0.0], [0.0, -1.0]])
    labels_v = torch.tensor([[[0, 2, VOID, VOID]]])
    loss_v = tree_triplet_loss(
        emb_v, labels_v, t, ignore_value=VOID, margin_tree_factor=0.5, include_anchor_class=True
    )
    assert float(loss_v) == pytest.approx(0.4, abs=1e-6)


def test_tree_triplet_default_positives_are_sibling_classes_with_the_ports_margin():
    """a, b under A and c under B: anchors of a take positives from b (psi 2) and negatives from
    c (psi 4), so m = 0.1 + 1.0 * (4 - 2) / 4 = 0.6 (the ports' constant); c is alone under B and
    gets no triplet."""
    t = ClassTree(TWO_LEVEL)
    emb = _embed([[1.0, 0.0], [0.6, 0.8], [0.8, 0.6]])  # a, b, c
    labels = torch.tensor([[[0, 1, 2]]])
    loss = tree_triplet_loss(emb, labels, t, ignore_value=VOID)
    d_ab, d_ac, d_bc = 1 - 0.6, 1 - 0.8, 1 - (0.6 * 0.8 + 0.8 * 0.6)
    expected = ((d_ab - d_ac + 0.6) + (d_ab - d_bc + 0.6)) / 2  # anchors a and b only
    assert float(loss) == pytest.approx(expected, abs=1e-6)


def test_tree_triplet_pairs_respect_the_tree_and_the_cap():
    t = ClassTree(TWO_LEVEL)
    # a and b only (same parent): no negative, no triplet, a defined 0
    emb = _embed([[1.0, 0.0], [0.0, 1.0]]).requires_grad_()
    loss = tree_triplet_loss(emb, torch.tensor([[[0, 1]]]), t, ignore_value=VOID)
    assert float(loss) == 0.0
    loss.backward()
    # perfectly separated super-classes beyond the margin: zero loss, with a cap of 1 triplet
    emb = _embed([[1.0, 0.0]] * 3 + [[-1.0, 0.0]] * 2)
    labels = torch.tensor([[[0, 1, 0, 2, 2]]])
    loss = tree_triplet_loss(emb, labels, t, ignore_value=VOID, max_triplets_per_class=1)
    assert float(loss) == 0.0


def test_triplet_ramp():
    assert triplet_ramp(0, 0.5, 80000) == 0.0
    assert triplet_ramp(40000, 0.5, 80000) == pytest.approx(0.25)
    # the ports' formula 1/4 (1 + cos((s - 80k) / 80k pi))
    s = 12345
    assert triplet_ramp(s, 0.5, 80000) == pytest.approx(
        0.25 * (1 + math.cos((s - 8e4) / 8e4 * math.pi))
    )
    assert triplet_ramp(80000, 0.5, 80000) == 0.5 == triplet_ramp(10**6, 0.5, 80000)


def test_ramped_tree_triplet_resizes_labels_and_weighs_by_the_trainer_iteration():
    """The "loss_tree_triplet" term both variants use: labels nearest-resized to the embedding,
    Eq. 7 on them, times the cosine ramp's weight at the EventStorage iteration (full weight
    outside a trainer)."""
    from detectron2.utils.events import EventStorage

    from seg_methods.modeling.meta_arch.hssn_common import RampedTreeTriplet

    t = ClassTree(TWO_LEVEL)
    g = torch.Generator().manual_seed(0)
    emb = F.normalize(torch.randn(2, 4, 3, 5, generator=g), dim=1)
    labels = torch.randint(0, 3, (2, 6, 10), generator=g)
    labels[0, :2] = VOID
    kw = dict(margin_eps=0.1, margin_tree_factor=1.0, max_triplets_per_class=7)
    term = RampedTreeTriplet(
        t, VOID, weight=0.5, ramp_iters=100, include_anchor_class=True, **kw
    )
    small = labels[:, ::2, ::2]  # nearest from 6x10 to 3x5
    torch.manual_seed(3)
    plain = tree_triplet_loss(emb, small, t, ignore_value=VOID, include_anchor_class=True, **kw)
    assert float(plain) > 0
    for it in (0, 50, 100, 1000):
        torch.manual_seed(3)
        with EventStorage(start_iter=it):
            got = term(emb, labels)
        assert float(got) == pytest.approx(triplet_ramp(it, 0.5, 100) * float(plain), abs=1e-7)
    torch.manual_seed(3)
    assert float(term(emb, labels)) == pytest.approx(0.5 * float(plain))  # no trainer: full


# ----------------------------------------------------------------------------- inference
def test_inference_respects_the_tree():
    t = ClassTree(TWO_LEVEL)
    # leaf a has the highest own score but its parent A is very unlikely: c (under a confident B)
    z = torch.tensor([4.0, 0.0, 1.0, -3.0, 2.0]).view(1, 5, 1, 1)
    leaf_min = leaf_path_logits(z, t, "path_min").flatten()
    assert leaf_min.tolist() == pytest.approx([-3.0, -3.0, 1.0])
    assert int(leaf_min.argmax()) == 2
    leaf_sum = leaf_path_logits(z, t, "path_sum").flatten()
    assert leaf_sum.tolist() == pytest.approx([1.0, -3.0, 3.0])
    # random scores: the path-min score of the winning leaf bounds every node on its path
    t3 = ClassTree(THREE_LEVEL)
    z = torch.randn(1, 9, 5, 5, generator=torch.Generator().manual_seed(3))
    win = leaf_path_logits(z, t3, "path_min").argmax(1)  # (1, 5, 5)
    path_nodes = t3.paths[:, win]  # (L, 1, 5, 5)
    on_path = z.gather(1, path_nodes.permute(1, 0, 2, 3))  # (1, L, 5, 5)
    best = leaf_path_logits(z, t3, "path_min").amax(1)
    assert torch.equal(on_path.amin(1), best)
    with pytest.raises(ValueError, match="MODEL.HSSN.INFERENCE"):
        leaf_path_logits(z, t3, "greedy")


# ----------------------------------------------------------------------------- per-level mIoU
def test_per_level_miou_by_hand():
    parents = TWO_LEVEL["parents"]
    gt = np.array([0, 0, 1, 2, VOID])
    pred = np.array([1, 0, 1, 2, 0])
    # leaves: a IoU 1/2 (tp 1, gt 2, pred 1), b 1/2 (tp 1, gt 1, pred 2), c 1 -> mean 2/3
    # level 1: A: tp 3 of 3, B: 1 of 1 (the void pixel predicted a is excluded) -> 100
    miou = per_level_miou(pred, gt, parents, VOID)
    assert miou == pytest.approx([100 * 2 / 3, 100.0])
    leaf_conf = np.array([[1, 1, 0], [1, 1, 0], [0, 0, 5]])  # [pred, gt]
    assert level_confusion(leaf_conf, np.array([0, 0, 1]), 2).tolist() == [[4, 0], [0, 5]]
    assert math.isnan(mean_iou(np.zeros((2, 2), dtype=np.int64)))


def test_hierarchical_evaluator_on_tiny_synthetic(tiny_synthetic, tmp_path):
    from seg_methods.config import get_cfg
    from seg_methods.evaluation.build import build_evaluator

    name = tiny_synthetic["sem_seg_val"]
    cfg = get_cfg()
    cfg.OUTPUT_DIR = str(tmp_path)
    cfg.TEST.SEMANTIC_ON, cfg.TEST.INSTANCE_ON, cfg.TEST.PANOPTIC_ON = True, False, False
    selected = build_evaluator(cfg, name)._evaluators
    assert sum(isinstance(e, HierarchicalSemSegEvaluator) for e in selected) == 1

    meta = MetadataCatalog.get(name)
    parents = meta.class_hierarchy["parents"]
    ev = HierarchicalSemSegEvaluator(name, distributed=False)
    ev.reset()
    for rec in DatasetCatalog.get(name):
        gt = ev.sem_seg_loading_fn(rec["sem_seg_file_name"], dtype=np.int64)
        pred = gt.copy()
        pred[gt == meta.ignore_label] = 0
        pred = np.where(gt == 1, 2, pred)  # rectangle -> triangle: both polygonal
        scores = F.one_hot(torch.from_numpy(pred), len(meta.stuff_classes)).permute(2, 0, 1)
        ev.process([{"file_name": rec["file_name"]}], [{"sem_seg": scores.float()}])
    res = ev.evaluate()["hier_sem_seg"]
    assert list(res) == ["mIoU^1", "mIoU^2", "mIoU^3"]
    # the only errors stay inside one super-class: levels 2 and 3 are perfect
    assert res["mIoU^2"] == pytest.approx(100.0) and res["mIoU^3"] == pytest.approx(100.0)
    assert res["mIoU^1"] < 100.0
    assert len(parents) == 2


# ----------------------------------------------------------------------------- model
def _quick_cfg(tiny_synthetic):
    import os

    from seg_methods.config import get_cfg

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cfg = get_cfg()
    cfg.merge_from_file(
        os.path.join(
            repo, "configs", "quick_schedules", "hssn_synthetic_semantic_instant_test.yaml"
        )
    )
    cfg.DATASETS.TRAIN = (tiny_synthetic["sem_seg_train"],)
    cfg.DATASETS.TEST = (tiny_synthetic["sem_seg_val"],)
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def test_hssn_model_scores_nodes_and_outputs_leaves(tiny_synthetic):
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    cfg = _quick_cfg(tiny_synthetic)
    model = build_model(cfg)
    assert model.node_predictor.out_channels == 8 + 4 + 2  # the synthetic 3-level tree
    image = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)
    sem = torch.tensor([[0] * 32 + [5] * 32] * 64)
    with EventStorage(start_iter=5):
        losses = model.train()([{"image": image, "sem_seg": sem}])
    assert set(losses) == {"loss_tree_min", "loss_level_ce", "loss_tree_triplet"}
    with EventStorage(start_iter=0):  # the triplet ramp starts at weight 0
        assert float(model([{"image": image, "sem_seg": sem}])["loss_tree_triplet"]) == 0.0
    with torch.no_grad():
        (out,) = model.eval()([{"image": image}])
    assert out["sem_seg"].shape == (8, 64, 64)  # leaves only
    # multi-scale + flip averages the leaves' sigmoid scores (path-min probabilities)
    cfg.TEST.AUG.ENABLED, cfg.TEST.AUG.MIN_SIZES, cfg.TEST.AUG.FLIP = True, (48, 64), True
    tta = build_model(cfg).eval()
    tta.load_state_dict(model.state_dict())
    with torch.no_grad():
        (aug,) = tta([{"image": image}])
    assert aug["sem_seg"].shape == (8, 64, 64)
    assert (aug["sem_seg"] >= 0).all() and (aug["sem_seg"] <= 1).all()
    cfg.TEST.AUG.ENABLED = False
    cfg.MODEL.HSSN.TRIPLET_WEIGHT = 0.0
    cfg.MODEL.HSSN.LEVEL_CE_WEIGHT = 0.0
    plain = build_model(cfg)
    assert plain.projection is None
    with EventStorage():
        assert set(plain.train()([{"image": image, "sem_seg": sem}])) == {"loss_tree_min"}


def test_hssn_config_errors(tiny_synthetic):
    from detectron2.modeling import build_model

    cfg = _quick_cfg(tiny_synthetic)
    cfg.MODEL.HSSN.BASE = "deeplab"  # "per_pixel" and "mask2former" only
    with pytest.raises(ValueError, match="MODEL.HSSN.BASE"):
        build_model(cfg)
    cfg = _quick_cfg(tiny_synthetic)
    if "_hssn_no_tree" not in DatasetCatalog.list():
        DatasetCatalog.register("_hssn_no_tree", lambda: [])
    cfg.DATASETS.TRAIN = ("_hssn_no_tree",)
    with pytest.raises(KeyError, match="class_hierarchy"):
        build_model(cfg)
    cfg = _quick_cfg(tiny_synthetic)
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 9
    with pytest.raises(ValueError, match="NUM_CLASSES"):
        build_model(cfg)
