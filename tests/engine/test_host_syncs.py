"""Host-sync removal in the shared set criterion (issue 8): the float32 losses stay bit-identical.

``_all_reduce_mean_num_masks`` no longer makes a device tensor and calls ``.item()`` in a single
process; the reference below is the previous implementation.
"""

import pytest
import torch

from seg_methods.modeling.criterion import SetCriterion, mask_cls_weight_dict
from seg_methods.modeling.criterion import set_criterion as set_criterion_module
from seg_methods.modeling.matcher import HungarianMatcher


def _previous_num_masks(num_masks, device):
    """The implementation before the change (tensor, clamp, .item())."""
    n = torch.as_tensor([num_masks], dtype=torch.float, device=device)
    return torch.clamp(n / 1, min=1).item()


@pytest.mark.parametrize("n", [0, 1, 2, 7, 123, 2**24 - 1, 2**24 + 1, 2**25 + 3])
def test_num_masks_equals_the_previous_implementation(n):
    new = set_criterion_module._all_reduce_mean_num_masks(n, torch.device("cpu"))
    old = _previous_num_masks(n, torch.device("cpu"))
    assert type(new) is float and new == old


def _random_problem(seed, batch=3, queries=6, classes=4, size=(10, 12)):
    g = torch.Generator().manual_seed(seed)
    outputs = {
        "pred_logits": torch.randn(batch, queries, classes + 1, generator=g, requires_grad=True),
        "pred_masks": torch.randn(batch, queries, *size, generator=g, requires_grad=True),
        "aux_outputs": [
            {
                "pred_logits": torch.randn(batch, queries, classes + 1, generator=g),
                "pred_masks": torch.randn(batch, queries, *size, generator=g),
            }
        ],
    }
    targets = []
    for b in range(batch):
        n = b + 1 if b < batch - 1 else 0  # the last image has no segment
        h, w = size[0] * 4 - b, size[1] * 4
        targets.append(
            {
                "labels": torch.randint(0, classes, (n,), generator=g),
                "masks": torch.rand(n, h, w, generator=g) > 0.5,
            }
        )
    return outputs, targets


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_set_criterion_losses_and_gradients_are_bit_identical(seed, monkeypatch):
    def criterion():
        return SetCriterion(
            num_classes=4,
            matcher=HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=64),
            weight_dict=mask_cls_weight_dict(2.0, 5.0, 5.0, 1),
            eos_coef=0.1,
            num_points=64,
            oversample_ratio=3.0,
            importance_sample_ratio=0.75,
        )

    def run():
        outputs, targets = _random_problem(seed)
        torch.manual_seed(100 + seed)  # matcher points and importance sampling
        losses = criterion()(outputs, targets)
        total = sum(losses.values())
        total.backward()
        grads = [outputs["pred_logits"].grad.clone(), outputs["pred_masks"].grad.clone()]
        return {k: v.detach() for k, v in losses.items()}, grads

    new_losses, new_grads = run()
    monkeypatch.setattr(set_criterion_module, "_all_reduce_mean_num_masks", _previous_num_masks)
    old_losses, old_grads = run()
    assert new_losses.keys() == old_losses.keys()
    for k in new_losses:
        assert torch.equal(new_losses[k], old_losses[k]), k
    for a, b in zip(new_grads, old_grads):
        assert torch.equal(a, b)
