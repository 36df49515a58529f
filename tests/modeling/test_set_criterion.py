"""Set criterion: hand-computed CE/BCE/dice, target padding, deep supervision, gradients, config."""

import math

import pytest
import torch
from detectron2.config import get_cfg

from seg_methods.config.common import add_common_config
from seg_methods.modeling.criterion import (
    SetCriterion,
    build_set_criterion,
    dice_loss,
    mask_cls_weight_dict,
    sigmoid_ce_loss,
)
from seg_methods.modeling.matcher import HungarianMatcher

CENTRES_2x2 = [[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]]
CORNERS_4x4 = [[0.125, 0.125], [0.875, 0.125], [0.125, 0.875], [0.875, 0.875]]


def _sig(x):
    return 1.0 / (1.0 + math.exp(-x))


class FixedMatcher:
    """Returns preset indices and counts its calls."""

    def __init__(self, indices):
        self.indices = indices
        self.calls = 0

    def __call__(self, outputs, targets):
        self.calls += 1
        return [
            (torch.tensor(s, dtype=torch.int64), torch.tensor(t, dtype=torch.int64))
            for s, t in self.indices
        ]


def _fixed_points(points):
    pts = torch.tensor(points)

    def fn(mask_logits):
        return pts[None].expand(mask_logits.shape[0], -1, -1).clone()

    return fn


def _criterion(matcher, num_classes=2, eos=0.1, points=CENTRES_2x2, **kw):
    return SetCriterion(
        num_classes=num_classes,
        matcher=matcher,
        weight_dict=mask_cls_weight_dict(2.0, 5.0, 5.0, kw.pop("num_aux", 0)),
        eos_coef=eos,
        num_points=len(points) if points is not None else 16,
        oversample_ratio=3.0,
        importance_sample_ratio=0.75,
        point_coords_fn=_fixed_points(points) if points is not None else None,
        **kw,
    )


def test_loss_ce_with_no_object_weight_by_hand():
    logits = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 0.0, 2.0], [0.0, 3.0, 0.0]]])  # (1, 3, 3)
    masks = torch.zeros(1, 3, 2, 2)
    targets = [{"labels": torch.tensor([1]), "masks": torch.ones(1, 2, 2)}]
    crit = _criterion(FixedMatcher([([2], [0])]), losses=("labels",))
    losses = crit({"pred_logits": logits, "pred_masks": masks}, targets)

    ce0 = math.log(3)  # uniform, target no-object
    ce1 = -math.log(math.exp(2) / (math.e + 1 + math.exp(2)))  # target no-object
    ce2 = -math.log(math.exp(3) / (2 + math.exp(3)))  # matched, target class 1
    expected = (0.1 * ce0 + 0.1 * ce1 + 1.0 * ce2) / (0.1 + 0.1 + 1.0)
    assert set(losses) == {"loss_ce"}
    assert losses["loss_ce"].item() == pytest.approx(expected, rel=1e-6)


def test_mask_losses_by_hand_on_fixed_points():
    pred = torch.tensor([[2.0, -1.0], [0.5, -3.0]])
    masks = torch.stack([torch.zeros(2, 2), pred])[None]  # (1, 2, 2, 2); query 1 is matched
    logits = torch.zeros(1, 2, 3)
    tgt = torch.tensor([[[1, 0], [1, 1]]], dtype=torch.bool)
    crit = _criterion(FixedMatcher([([1], [0])]), losses=("masks",))
    losses = crit(
        {"pred_logits": logits, "pred_masks": masks}, [{"labels": torch.tensor([0]), "masks": tgt}]
    )
    x = [2.0, -1.0, 0.5, -3.0]
    t = [1, 0, 1, 1]
    bce = sum(-ti * math.log(_sig(xi)) - (1 - ti) * math.log(1 - _sig(xi)) for xi, ti in zip(x, t))
    p = [_sig(v) for v in x]
    dice = 1 - (2 * sum(a * b for a, b in zip(p, t)) + 1) / (sum(p) + sum(t) + 1)
    assert losses["loss_mask"].item() == pytest.approx(bce / 4, rel=1e-6)
    assert losses["loss_dice"].item() == pytest.approx(dice, rel=1e-6)


def test_targets_padded_to_largest_size_and_normalised_by_num_masks():
    # Image 0: a 2x2 all-ones target; image 1: a 4x4 all-ones target. Like Mask2Former, the 2x2
    # target is zero-padded to 4x4 at the bottom/right, so of the 4 corner-pixel points only the
    # top-left one sees a 1. Predictions are logit 0 (p = 0.5).
    masks = torch.zeros(2, 1, 4, 4)
    logits = torch.zeros(2, 1, 3)
    targets = [
        {"labels": torch.tensor([0]), "masks": torch.ones(1, 2, 2)},
        {"labels": torch.tensor([1]), "masks": torch.ones(1, 4, 4)},
    ]
    crit = _criterion(FixedMatcher([([0], [0]), ([0], [0])]), losses=("masks",), points=CORNERS_4x4)
    losses = crit({"pred_logits": logits, "pred_masks": masks}, targets)
    dice0 = 1 - (2 * 0.5 * 1 + 1) / (2 + 1 + 1)  # 0.5
    dice1 = 1 - (2 * 0.5 * 4 + 1) / (2 + 4 + 1)  # 2 / 7
    assert losses["loss_dice"].item() == pytest.approx((dice0 + dice1) / 2, rel=1e-6)
    assert losses["loss_mask"].item() == pytest.approx(math.log(2), rel=1e-6)  # 2 ln2 / 2


def test_pure_losses_normalise_by_num_masks():
    x = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    t = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    assert sigmoid_ce_loss(x, t, 4.0).item() == pytest.approx(2 * math.log(2) / 4, rel=1e-6)
    # per mask: 1 - (1 + 1) / (1 + 1 + 1) = 1/3 and 1 - 1 / (1 + 0 + 1) = 1/2
    assert dice_loss(x, t, 2.0).item() == pytest.approx((1 / 3 + 1 / 2) / 2, rel=1e-6)


def _obvious_outputs(order):
    """Outputs whose obvious matching puts target 0 on query order[0] and target 1 on order[1]."""
    left = torch.zeros(8, 8)
    left[:, :4] = 1
    right = 1 - left
    masks = torch.full((3, 8, 8), -6.0)
    logits = torch.tensor([[0.0, 0.0, 4.0]] * 3)
    masks[order[0]] = left * 12 - 6
    masks[order[1]] = right * 12 - 6
    logits[order[0]] = torch.tensor([4.0, 0.0, 0.0])
    logits[order[1]] = torch.tensor([0.0, 4.0, 0.0])
    return {"pred_logits": logits[None], "pred_masks": masks[None]}


def _obvious_targets():
    left = torch.zeros(8, 8, dtype=torch.bool)
    left[:, :4] = True
    return [{"labels": torch.tensor([0, 1]), "masks": torch.stack([left, ~left])}]


def test_deep_supervision_matches_each_layer_independently():
    main = _obvious_outputs((0, 1))
    aux = [_obvious_outputs((2, 0)), _obvious_outputs((1, 2))]
    targets = _obvious_targets()
    matcher = HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=64)
    calls = []

    def spy(outputs, targets):
        res = matcher(outputs, targets)
        calls.append([(s.tolist(), t.tolist()) for s, t in res])
        return res

    crit = _criterion(spy, num_aux=2, points=CENTRES_2x2)
    losses = crit({**main, "aux_outputs": aux}, targets)
    assert set(losses) == {f"loss_{n}{s}" for n in ("ce", "mask", "dice") for s in ("", "_0", "_1")}
    # one matching per layer, each following its own layer's predictions
    assert calls == [[([0, 1], [0, 1])], [([0, 2], [1, 0])], [([1, 2], [0, 1])]]
    # each aux loss equals the loss of that layer treated as the final output
    for i, a in enumerate(aux):
        alone = crit(a, targets)
        for n in ("loss_ce", "loss_mask", "loss_dice"):
            torch.testing.assert_close(losses[f"{n}_{i}"], alone[n])
    # ...and differs from what the final layer's matching would give
    main_idx = matcher(main, targets)
    wrong = crit.loss_labels(aux[0], targets, main_idx, 2.0)["loss_ce"]
    assert wrong.item() > losses["loss_ce_0"].item() + 1.0


def test_deep_supervision_off_ignores_aux_outputs():
    main = _obvious_outputs((0, 1))
    crit = _criterion(FixedMatcher([([0, 1], [0, 1])]), deep_supervision=False)
    losses = crit({**main, "aux_outputs": [main]}, _obvious_targets())
    assert set(losses) == {"loss_ce", "loss_mask", "loss_dice"}
    assert crit.matcher.calls == 1


def test_apply_weights():
    crit = _criterion(FixedMatcher([]), num_aux=1)
    raw = {
        "loss_ce": torch.tensor(1.0),
        "loss_dice_0": torch.tensor(2.0),
        "loss_mask_5": torch.tensor(3.0),
    }
    weighted = crit.apply_weights(raw)
    assert weighted == {"loss_ce": torch.tensor(2.0), "loss_dice_0": torch.tensor(10.0)}


def test_gradients_reach_logits_and_matched_masks_only():
    out = _obvious_outputs((0, 2))
    logits = out["pred_logits"].clone().requires_grad_(True)
    masks = out["pred_masks"].clone().requires_grad_(True)
    crit = _criterion(FixedMatcher([([0, 2], [0, 1])]), points=None)
    crit.num_points = 16
    losses = crit({"pred_logits": logits, "pred_masks": masks}, _obvious_targets())
    sum(crit.apply_weights(losses).values()).backward()
    assert logits.grad.abs().sum(-1).gt(0).all()  # every query gets a class gradient
    per_query = masks.grad.abs().flatten(2).sum(-1)[0]
    assert per_query[0] > 0 and per_query[2] > 0 and per_query[1] == 0


def test_empty_targets_give_no_object_ce_and_zero_mask_losses():
    logits = torch.tensor([[[0.0, 0.0, 1.0], [2.0, 0.0, 0.0]]], requires_grad=True)
    masks = torch.zeros(1, 2, 4, 4, requires_grad=True)
    targets = [{"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 4, 4)}]
    crit = _criterion(HungarianMatcher(num_points=8), points=None)
    losses = crit({"pred_logits": logits, "pred_masks": masks}, targets)
    ce0 = -math.log(math.e / (2 + math.e))
    ce1 = -math.log(1 / (math.exp(2) + 2))
    assert losses["loss_ce"].item() == pytest.approx((ce0 + ce1) / 2, rel=1e-6)
    assert losses["loss_mask"].item() == 0.0 and losses["loss_dice"].item() == 0.0
    sum(losses.values()).backward()
    assert masks.grad is None or masks.grad.abs().sum() == 0


def test_random_stream_order_matches_pointrend_sampling():
    # Without an injected point function, the mask loss draws torch.rand(M, P * oversample, 2)
    # (candidates) then torch.rand(M, P - int(0.75 P), 2) (uniform fill-up), in that order.
    out = _obvious_outputs((0, 2))
    targets = _obvious_targets()
    crit = _criterion(FixedMatcher([([0, 2], [0, 1])]), points=None, losses=("masks",))
    crit.num_points = 8
    torch.manual_seed(5)
    got = crit(out, targets)

    torch.manual_seed(5)
    cand = torch.rand(2, 24, 2)
    fill = torch.rand(2, 2, 2)
    src = out["pred_masks"][0, [0, 2]][:, None]
    from detectron2.projects.point_rend.point_features import point_sample

    cand_logits = point_sample(src, cand, align_corners=False)  # (2, 1, 24)
    top = (-cand_logits.abs())[:, 0].topk(6, dim=1)[1]
    pts = torch.cat([torch.stack([cand[i, top[i]] for i in range(2)]), fill], 1)
    fixed = _criterion(FixedMatcher([([0, 2], [0, 1])]), points=None, losses=("masks",))
    fixed.point_coords_fn = lambda m: pts
    want = fixed(out, targets)
    for k in ("loss_mask", "loss_dice"):
        torch.testing.assert_close(got[k], want[k])


def test_build_from_config():
    cfg = get_cfg()
    add_common_config(cfg)
    crit = build_set_criterion(cfg, num_classes=7, num_aux_outputs=9)
    assert crit.num_classes == 7 and crit.empty_weight.tolist()[-1] == pytest.approx(0.1)
    assert crit.empty_weight.shape == (8,)
    assert crit.num_points == 12544 and crit.oversample_ratio == 3.0
    assert crit.importance_sample_ratio == 0.75
    assert crit.weight_dict["loss_ce"] == 2.0 and crit.weight_dict["loss_dice_8"] == 5.0
    assert "loss_ce_9" not in crit.weight_dict and len(crit.weight_dict) == 30
    m = crit.matcher
    assert (m.cost_class, m.cost_mask, m.cost_dice, m.num_points) == (2.0, 5.0, 5.0, 12544)
    assert "empty_weight" in crit.state_dict()

    cfg.MODEL.MASK_CLS.DEEP_SUPERVISION = False
    crit = build_set_criterion(cfg, num_classes=7, num_aux_outputs=9)
    assert set(crit.weight_dict) == {"loss_ce", "loss_mask", "loss_dice"}
    assert not crit.deep_supervision


# --------------------------------------------------------------------------- shared structure
def test_shared_weighting_and_reexported_point_functions():
    from seg_methods.modeling import point_losses
    from seg_methods.modeling.criterion import losses
    from seg_methods.modeling.criterion.base import WeightedCriterion, expand_aux_weights

    assert issubclass(SetCriterion, WeightedCriterion)
    assert mask_cls_weight_dict(2.0, 5.0, 5.0, 2) == expand_aux_weights(
        {"loss_ce": 2.0, "loss_mask": 5.0, "loss_dice": 5.0}, 2
    )
    # the matcher's point functions live below the criteria; the old import paths still work
    for name in point_losses.__all__:
        assert getattr(losses, name) is getattr(point_losses, name)
