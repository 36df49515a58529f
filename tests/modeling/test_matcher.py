"""Hungarian matcher: hand-computed costs on fixed points, obvious assignments, empty targets."""

import math

import pytest
import torch

from seg_methods.modeling.criterion.losses import pairwise_dice_loss, pairwise_sigmoid_ce_loss
from seg_methods.modeling.matcher import (
    HungarianMatcher,
    pairwise_class_cost,
    pairwise_mask_costs,
)

# Centres of the 4 pixels of a 2x2 mask in [0, 1]^2, (x, y) order, row-major: with bilinear
# sampling and align_corners=False they return the pixel values exactly.
CENTRES_2x2 = torch.tensor([[[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]]])


def _sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def _hand_bce(logits, targets):
    """Mean over points of -t log s(x) - (1 - t) log(1 - s(x)), written out."""
    total = 0.0
    for x, t in zip(logits, targets):
        total += -t * math.log(_sig(x)) - (1 - t) * math.log(1 - _sig(x))
    return total / len(logits)


def _hand_dice(logits, targets):
    p = [_sig(x) for x in logits]
    inter = sum(pi * ti for pi, ti in zip(p, targets))
    return 1 - (2 * inter + 1) / (sum(p) + sum(targets) + 1)


def _fixed_points(points):
    def fn(num_points, device):
        assert num_points == points.shape[1]
        return points.to(device)

    return fn


def test_pairwise_costs_literal_values():
    # Logit 0 everywhere: p = 0.5, BCE = ln 2 at every point whatever the target.
    pred = torch.zeros(1, 4)
    tgt = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    assert pairwise_sigmoid_ce_loss(pred, tgt).item() == pytest.approx(math.log(2), abs=1e-6)
    # dice = 1 - (2 * 0.5 * 2 + 1) / (4 * 0.5 + 2 + 1) = 1 - 3 / 5
    assert pairwise_dice_loss(pred, tgt).item() == pytest.approx(0.4, abs=1e-6)
    # class probabilities [2, 1, 1] / 4
    logits = torch.tensor([[math.log(2.0), 0.0, 0.0]])
    cost = pairwise_class_cost(logits, torch.tensor([0, 1, 0]))
    assert cost[0].tolist() == pytest.approx([-0.5, -0.25, -0.5], abs=1e-6)


def test_cost_matrix_2x2_by_hand():
    pred_logits = torch.tensor([[1.0, 0.0, -1.0], [0.0, 2.0, 0.5]])  # Q = 2, C = 2
    pred_masks = torch.tensor(
        [[[2.0, -1.0], [0.5, -3.0]], [[-2.0, 1.5], [0.0, 3.0]]]
    )  # (Q=2, 2, 2)
    labels = torch.tensor([1, 0])
    tgt_masks = torch.tensor([[[1, 0], [1, 0]], [[0, 1], [1, 1]]], dtype=torch.bool)

    matcher = HungarianMatcher(
        cost_class=2.0,
        cost_mask=5.0,
        cost_dice=5.0,
        num_points=4,
        point_coords_fn=_fixed_points(CENTRES_2x2),
    )
    cost = matcher.cost_matrix(pred_logits, pred_masks, labels, tgt_masks)

    flat_pred = [[2.0, -1.0, 0.5, -3.0], [-2.0, 1.5, 0.0, 3.0]]
    flat_tgt = [[1, 0, 1, 0], [0, 1, 1, 1]]
    expected = torch.zeros(2, 2)
    for i in range(2):
        z = [math.exp(v) for v in pred_logits[i].tolist()]
        for j in range(2):
            p_cls = z[labels[j]] / sum(z)
            expected[i, j] = (
                2.0 * -p_cls
                + 5.0 * _hand_bce(flat_pred[i], flat_tgt[j])
                + 5.0 * _hand_dice(flat_pred[i], flat_tgt[j])
            )
    assert cost.dtype == torch.float32
    torch.testing.assert_close(cost, expected, atol=1e-5, rtol=1e-5)


def test_target_masks_are_sampled_bilinearly():
    # (0.5, 0.25) lies halfway between pixels (0, 0) and (0, 1): a target 1 there samples 0.5.
    points = torch.tensor([[[0.5, 0.25]]])
    tgt = torch.tensor([[[1, 0], [0, 0]]], dtype=torch.uint8)
    pred = torch.zeros(1, 2, 2)
    bce, dice = pairwise_mask_costs(pred, tgt, points)
    assert bce.item() == pytest.approx(math.log(2), abs=1e-6)
    # p = 0.5, t = 0.5: 1 - (2 * 0.25 + 1) / (0.5 + 0.5 + 1)
    assert dice.item() == pytest.approx(1 - 1.5 / 2.0, abs=1e-6)


def _designed_case():
    """3 queries vs 2 targets on 8x8 masks; query 0 is background, 1 -> target 1, 2 -> target 0."""
    left = torch.zeros(8, 8, dtype=torch.bool)
    left[:, :4] = True
    top_right = torch.zeros(8, 8, dtype=torch.bool)
    top_right[:4, 4:] = True
    targets = [{"labels": torch.tensor([1, 0]), "masks": torch.stack([left, top_right])}]
    logits = torch.tensor([[[0.0, 0.0, 5.0], [4.0, 0.0, 0.0], [0.0, 4.0, 0.0]]])  # (1, 3, 3)
    masks = torch.stack(
        [
            torch.full((8, 8), -6.0),
            top_right.float() * 12 - 6,
            left.float() * 12 - 6,
        ]
    )[
        None
    ]  # (1, 3, 8, 8)
    return {"pred_logits": logits, "pred_masks": masks}, targets


def test_obvious_assignment():
    outputs, targets = _designed_case()
    matcher = HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=64)
    ((pred_idx, tgt_idx),) = matcher(outputs, targets)
    assert pred_idx.dtype == torch.int64 and tgt_idx.dtype == torch.int64
    assert pred_idx.tolist() == [1, 2]
    assert tgt_idx.tolist() == [1, 0]


def test_class_cost_decides_between_identical_masks():
    # Two queries with the same mask; only the class tells them apart.
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[:2] = True
    targets = [{"labels": torch.tensor([0]), "masks": mask[None]}]
    logits = torch.tensor([[[0.0, 3.0, 0.0], [3.0, 0.0, 0.0]]])
    masks = (mask.float() * 10 - 5)[None, None].repeat(1, 2, 1, 1)
    matcher = HungarianMatcher(num_points=16)
    ((pred_idx, tgt_idx),) = matcher({"pred_logits": logits, "pred_masks": masks}, targets)
    assert pred_idx.tolist() == [1] and tgt_idx.tolist() == [0]


def test_empty_targets():
    outputs, targets = _designed_case()
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 8, 8)}
    outputs = {k: torch.cat([v, v]) for k, v in outputs.items()}  # B = 2
    matcher = HungarianMatcher(num_points=32)
    indices = matcher(outputs, [empty, targets[0]])
    assert indices[0][0].numel() == 0 and indices[0][1].numel() == 0
    assert indices[0][0].dtype == torch.int64
    assert indices[1][0].tolist() == [1, 2] and indices[1][1].tolist() == [1, 0]


def test_points_drawn_once_per_image_from_torch_rand():
    # The default generator consumes exactly torch.rand(1, P, 2) per image, in image order.
    outputs, targets = _designed_case()
    matcher = HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=10)
    torch.manual_seed(3)
    got = matcher.cost_matrix(
        outputs["pred_logits"][0],
        outputs["pred_masks"][0],
        targets[0]["labels"],
        targets[0]["masks"],
    )
    torch.manual_seed(3)
    points = torch.rand(1, 10, 2)
    fixed = HungarianMatcher(
        cost_class=2.0,
        cost_mask=5.0,
        cost_dice=5.0,
        num_points=10,
        point_coords_fn=_fixed_points(points),
    )
    want = fixed.cost_matrix(
        outputs["pred_logits"][0],
        outputs["pred_masks"][0],
        targets[0]["labels"],
        targets[0]["masks"],
    )
    torch.testing.assert_close(got, want)


def test_float32_without_grad_under_autocast():
    outputs, targets = _designed_case()
    logits = outputs["pred_logits"][0].clone().requires_grad_(True)
    masks = outputs["pred_masks"][0].clone().requires_grad_(True)
    matcher = HungarianMatcher(
        cost_class=2.0,
        cost_mask=5.0,
        cost_dice=5.0,
        num_points=4,
        point_coords_fn=_fixed_points(torch.rand(1, 4, 2)),
    )
    ref = matcher.cost_matrix(logits, masks, targets[0]["labels"], targets[0]["masks"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = matcher.cost_matrix(
            logits.bfloat16(), masks.bfloat16(), targets[0]["labels"], targets[0]["masks"]
        )
    assert got.dtype == torch.float32 and not got.requires_grad
    # only the bf16 rounding of the inputs differs
    torch.testing.assert_close(got, ref, atol=0.05, rtol=0.01)


def test_rejects_all_zero_costs():
    with pytest.raises(ValueError):
        HungarianMatcher(cost_class=0, cost_mask=0, cost_dice=0)
