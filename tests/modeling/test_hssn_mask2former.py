"""HSSN on Mask2Former (MODEL.HSSN.BASE "mask2former"): per-query tree-min loss with no-object,
tree matching cost, tree-respecting semantic inference and the one-switch model build, on
hand-built tiny trees."""

import math
import os

import pytest
import torch

from seg_methods.modeling.criterion.hssn import (
    ClassTree,
    HSSNSetCriterion,
    leaf_path_logits,
    semantic_labels_from_masks,
    tree_class_cost,
    tree_min_loss,
    tree_min_query_losses,
    tree_semantic_inference,
)
from seg_methods.modeling.matcher import HungarianMatcher

VOID = 255
# a, b -> A; c -> B.  Global node ids: a 0, b 1, c 2, A 3, B 4.
TWO_LEVEL = {"names": [["a", "b", "c"], ["A", "B"]], "parents": [[0, 0, 1]]}
THREE_LEVEL = {
    "names": [["a", "b", "c", "d"], ["A", "B", "C"], ["X", "Y"]],
    "parents": [[0, 0, 1, 2], [0, 0, 1]],
}
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _sig(x):
    return 1.0 / (1.0 + math.exp(-x))


# ----------------------------------------------------------------------------- per-query loss
@pytest.mark.parametrize("focal", [False, True])
def test_query_loss_equals_the_pixel_loss_with_queries_as_pixels(focal):
    t = ClassTree(THREE_LEVEL)
    z = torch.randn(6, 9, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 3, 3, 1])
    per_query = tree_min_query_losses(z, labels, t, focal=focal)
    assert per_query.shape == (6,)
    pixels = z.t().reshape(1, 9, 1, 6)  # the queries as 6 pixels of one image
    expected = tree_min_loss(pixels, labels.view(1, 1, 6), t, ignore_value=VOID, focal=focal)
    assert float(per_query.mean()) == pytest.approx(float(expected), rel=1e-5)


def test_no_object_query_has_every_node_negative_by_hand():
    t = ClassTree(TWO_LEVEL)
    za, zb, zc, zA, zB = 0.5, 2.0, 1.0, -0.3, -0.5
    z = torch.tensor([[za, zb, zc, zA, zB]])

    def neg(x):  # Eq. 5 negative term (no focal)
        return -math.log(1 - _sig(x))

    # negative scores: max over the node's subtree (Def. 3.2.4): A -> max(zA, za, zb), B -> ...
    expected = (neg(za) + neg(zb) + neg(zc)) / 3 + (neg(max(zA, za, zb)) + neg(max(zB, zc))) / 2
    loss = tree_min_query_losses(z, torch.tensor([-1]), t, focal=False)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    # its gradient lowers every node score
    zg = z.clone().requires_grad_()
    tree_min_query_losses(zg, torch.tensor([-1]), t, focal=False).sum().backward()
    assert (zg.grad >= 0).all() and zg.grad[0, 3] == 0  # A is dominated by b (max of subtree)


def test_query_loss_t_constraints_a_leaf_cannot_beat_its_parent():
    """The positive score of a matched query's leaf is capped by its ancestors (Def. 3.2.3):
    raising the leaf's own logit above its parent's changes nothing, raising the parent's does."""
    t = ClassTree(TWO_LEVEL)
    base = torch.tensor([[0.0, -2.0, -2.0, 1.0, -2.0]])
    label = torch.tensor([0])
    loss0 = float(tree_min_query_losses(base, label, t))
    higher_leaf = base.clone()
    higher_leaf[0, 0] = 3.0  # a above its parent A: the path minimum is A's 1.0
    higher_parent = base.clone()
    higher_parent[0, 3] = 3.0  # A above a: the path minimum is a's 0.0, the same positive score
    l_leaf = float(tree_min_query_losses(higher_leaf, label, t))
    assert l_leaf < loss0  # a's own positive term improved up to A's score ...
    capped = higher_leaf.clone()
    capped[0, 0] = 30.0  # ... and no further: beyond A's logit only A counts
    assert float(tree_min_query_losses(capped, label, t)) == pytest.approx(l_leaf, rel=1e-3)
    assert float(tree_min_query_losses(higher_parent, label, t)) < loss0


# ----------------------------------------------------------------------------- matching
def test_tree_class_cost_is_minus_the_path_min_probability():
    t = ClassTree(TWO_LEVEL)
    z = torch.tensor([[4.0, 0.0, 1.0, -3.0, 2.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    cost = tree_class_cost(t)(z, torch.tensor([0, 2]))
    # query 0: a's path min(4, -3) = -3; c's min(1, 2) = 1
    assert cost[0].tolist() == pytest.approx([-_sig(-3.0), -_sig(1.0)])
    assert cost[1].tolist() == pytest.approx([-0.5, -0.5])
    # the matcher uses it: with the mask costs off, target a goes to the query whose whole path
    # scores high, not to the one with the highest own leaf score
    z = torch.tensor([[4.0, 0.0, 0.0, -3.0, 0.0], [2.0, 0.0, 0.0, 2.0, 0.0]])
    matcher = HungarianMatcher(
        cost_class=1.0, cost_mask=0.0, cost_dice=0.0, num_points=4, class_cost_fn=tree_class_cost(t)
    )
    outputs = {"pred_logits": z[None], "pred_masks": torch.zeros(1, 2, 4, 4)}
    targets = [{"labels": torch.tensor([0]), "masks": torch.ones(1, 4, 4)}]
    ((src, tgt),) = matcher(outputs, targets)
    assert src.tolist() == [1] and tgt.tolist() == [0]


def _criterion(tree, eos=0.1, level_ce=False):
    matcher = HungarianMatcher(
        cost_class=1.0,
        cost_mask=0.0,
        cost_dice=0.0,
        num_points=4,
        class_cost_fn=tree_class_cost(tree),
    )
    return HSSNSetCriterion(
        tree=tree,
        focal=False,
        level_ce=level_ce,
        num_classes=tree.num_leaves,
        matcher=matcher,
        weight_dict={"loss_tree_min": 1.0},
        eos_coef=eos,
        losses=("labels",),
        num_points=4,
        oversample_ratio=3.0,
        importance_sample_ratio=0.75,
        deep_supervision=False,
    )


def test_criterion_weights_no_object_queries_and_handles_no_target():
    t = ClassTree(TWO_LEVEL)
    z = torch.randn(1, 3, 5, generator=torch.Generator().manual_seed(2)).requires_grad_()
    targets = [{"labels": torch.tensor([2]), "masks": torch.ones(1, 4, 4)}]
    outputs = {"pred_logits": z, "pred_masks": torch.zeros(1, 3, 4, 4)}
    crit = _criterion(t, eos=0.1, level_ce=True)
    losses = crit(outputs, targets)
    ((src, _),) = crit.matcher(outputs, targets)
    labels = torch.full((3,), -1)
    labels[src] = 2
    per_query = tree_min_query_losses(z[0].detach(), labels, t, focal=False)
    w = torch.where(labels >= 0, 1.0, 0.1)
    assert float(losses["loss_tree_min"].detach()) == pytest.approx(
        float((w * per_query).sum() / w.sum())
    )
    # per-level CE of the matched query: leaf c among (a, b, c), level-1 B among (A, B)
    zq = z[0, src[0]].detach()
    ce = -torch.log_softmax(zq[:3], 0)[2] - torch.log_softmax(zq[3:], 0)[1]
    assert float(losses["loss_level_ce"]) == pytest.approx(float(ce), rel=1e-5)
    # an image without any segment: every query is "no object", finite losses with gradient
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 4, 4)}]
    losses = crit(outputs, empty)
    assert all(torch.isfinite(v) for v in losses.values())
    assert float(losses["loss_level_ce"]) == 0.0 and float(losses["loss_tree_min"]) > 0
    sum(losses.values()).backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- inference
def test_tree_semantic_inference_by_hand():
    t = ClassTree(TWO_LEVEL)
    big = 20.0
    # query 0 covers the left pixel with "a under A"; query 1 the right one with a confident leaf
    # c whose parent B is unlikely, while its A / b scores are moderate
    nodes = torch.tensor([[big, -big, -big, big, -big], [-big, 0.0, big, 0.0, -big]])
    masks = torch.tensor([[[big, -big]], [[-big, big]]])  # (Q, 1, 2)
    leaves = tree_semantic_inference(nodes, masks, t, "path_min")
    assert leaves.shape == (3, 1, 2)
    assert leaves[:, 0, 0].argmax() == 0
    # right pixel: node scores a 0, b .5, c 1, A .5, B 0 -> path-min a 0, b .5, c 0: b wins
    assert leaves[:, 0, 1].tolist() == pytest.approx([0.0, 0.5, 0.0], abs=1e-6)
    expected = leaf_path_logits(
        torch.einsum("qn,qhw->nhw", nodes.sigmoid(), masks.sigmoid())[None], t, "path_sum"
    )[0]
    assert torch.allclose(tree_semantic_inference(nodes, masks, t, "path_sum"), expected)


def test_semantic_labels_from_masks_void_and_padding():
    masks = torch.zeros(2, 3, 4, dtype=torch.bool)
    masks[0, 0, :2] = True
    masks[1, 1:, 2:] = True
    targets = [{"labels": torch.tensor([4, 1]), "masks": masks}]
    sem = semantic_labels_from_masks(targets, (4, 5), VOID)
    expected = torch.full((1, 4, 5), VOID)
    expected[0, 0, :2] = 4
    expected[0, 1:3, 2:4] = 1
    assert torch.equal(sem, expected)


# ----------------------------------------------------------------------------- model
def _quick_cfg(tiny_synthetic):
    from seg_methods.config import get_cfg

    cfg = get_cfg()
    cfg.merge_from_file(
        os.path.join(
            REPO,
            "configs",
            "quick_schedules",
            "hssn_mask2former_synthetic_semantic_instant_test.yaml",
        )
    )
    cfg.DATASETS.TRAIN = (tiny_synthetic["sem_seg_train"],)
    cfg.DATASETS.TEST = (tiny_synthetic["sem_seg_val"],)
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def test_one_switch_builds_the_mask2former_variant(tiny_synthetic):
    from detectron2.modeling import build_model
    from detectron2.structures import Instances
    from detectron2.utils.events import EventStorage

    from seg_methods.modeling.meta_arch.hssn import HSSN
    from seg_methods.modeling.meta_arch.hssn_mask2former import HSSNMask2Former

    cfg = _quick_cfg(tiny_synthetic)
    assert cfg.MODEL.META_ARCHITECTURE == "HSSN"
    model = build_model(cfg)
    assert isinstance(model, HSSNMask2Former) and not isinstance(model, HSSN)
    assert model.sem_seg_head.predictor.class_embed.out_features == 8 + 4 + 2
    image = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)
    sem = torch.tensor([[0] * 32 + [5] * 32] * 64)
    inst = Instances((64, 64))
    inst.gt_classes = torch.tensor([0, 5])
    inst.gt_masks = torch.stack([sem == 0, sem == 5])
    with EventStorage(start_iter=5):
        losses = model.train()([{"image": image, "sem_seg": sem, "instances": inst}])
    final = {k for k in losses if not k.rsplit("_", 1)[-1].isdigit()}
    assert final == {
        "loss_tree_min", "loss_level_ce", "loss_mask", "loss_dice", "loss_tree_triplet"
    }  # fmt: skip
    assert "loss_tree_min_0" in losses  # deep supervision
    with EventStorage(start_iter=0):  # the triplet ramp starts at weight 0
        zero = model([{"image": image, "sem_seg": sem, "instances": inst}])["loss_tree_triplet"]
    assert float(zero) == 0.0
    with torch.no_grad():
        (out,) = model.eval()([{"image": image, "height": 40, "width": 50}])
    assert set(out) == {"sem_seg"} and out["sem_seg"].shape == (8, 40, 50)  # leaves only
    # the per-pixel variant is untouched by the switch
    cfg.MODEL.HSSN.BASE = "per_pixel"
    assert type(HSSN.__new__(HSSN, cfg)) is HSSN


def test_mask2former_variant_config_errors(tiny_synthetic):
    from detectron2.modeling import build_model

    cfg = _quick_cfg(tiny_synthetic)
    cfg.TEST.PANOPTIC_ON = True
    with pytest.raises(ValueError, match="TEST.PANOPTIC_ON"):
        build_model(cfg)
    cfg = _quick_cfg(tiny_synthetic)
    cfg.MODEL.HSSN.EMBED_IN_FEATURE = "res9"
    with pytest.raises(ValueError, match="EMBED_IN_FEATURE"):
        build_model(cfg)
    cfg = _quick_cfg(tiny_synthetic)
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 9
    with pytest.raises(ValueError, match="NUM_CLASSES"):
        build_model(cfg)
