"""Lovász hinge / softmax (seg_methods.modeling.criterion.lovasz) on hand-built cases.

The reference parity test runs bermanmaxim/LovaszSoftmax's ``pytorch/lovasz_losses.py`` when it is
available (``LOVASZ_REFERENCE`` = path of that file, else ``/work/ref/LovaszSoftmax/
lovasz_losses.py``) and is skipped otherwise (CI holds no third-party source).
"""

import importlib.util
import os

import pytest
import torch

from seg_methods.modeling.criterion.lovasz import (
    jaccard_loss,
    lovasz_grad,
    lovasz_hinge,
    lovasz_softmax,
)

REFERENCE = os.environ.get("LOVASZ_REFERENCE", "/work/ref/LovaszSoftmax/lovasz_losses.py")


def test_lovasz_grad_sums_to_the_jaccard_loss_of_all_errors():
    gt = torch.tensor([1, 0, 1, 1, 0, 0])
    g = lovasz_grad(gt)
    # everything mispredicted: |M| / |gt ∪ M| = 1
    assert torch.isclose(g.sum(), torch.tensor(1.0))
    # first three mispredicted: 3 / (3 gt + 1 non-gt) = 0.75
    assert torch.isclose(g[:3].sum(), torch.tensor(0.75))
    assert lovasz_grad(torch.tensor([1])).tolist() == [1.0]


def test_hinge_perfect_prediction_is_zero():
    labels = torch.tensor([[[1, 0], [0, 1]]])
    logits = (2.0 * labels - 1.0) * 3.0  # margins > 1 everywhere
    assert lovasz_hinge(logits, labels).item() == 0.0


@pytest.mark.parametrize("seed", range(5))
def test_hinge_equals_one_minus_iou_at_the_vertices(seed):
    g = torch.Generator().manual_seed(seed)
    labels = (torch.rand(1, 5, 7, generator=g) > 0.5).long()
    wrong = torch.rand(1, 5, 7, generator=g) > 0.7
    sign = 2.0 * labels - 1.0
    logits = torch.where(wrong, torch.zeros_like(sign), sign)  # errors exactly 0 / 1
    pred = labels.bool() ^ wrong  # what those pixels then count as
    expected = jaccard_loss(pred, labels)
    assert lovasz_hinge(logits, labels).item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_softmax_equals_mean_one_minus_iou_at_the_vertices(seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (1, 6, 5), generator=g)
    labels[0, 0, 0] = 3  # class 3 present
    pred = torch.randint(0, 4, (1, 6, 5), generator=g)
    probas = torch.nn.functional.one_hot(pred, 4).permute(0, 3, 1, 2).float()
    present = sorted(set(labels.flatten().tolist()))
    expected = sum(jaccard_loss(pred == c, labels == c) for c in present) / len(present)
    assert lovasz_softmax(probas, labels).item() == pytest.approx(expected, abs=1e-6)
    every = sum(jaccard_loss(pred == c, labels == c) for c in range(4)) / 4
    assert lovasz_softmax(probas, labels, classes="all").item() == pytest.approx(every, abs=1e-6)


def test_softmax_perfect_prediction_is_zero_and_classes_string_by_value():
    labels = torch.tensor([[[0, 1], [2, 2]]])
    probas = torch.nn.functional.one_hot(labels, 3).permute(0, 3, 1, 2).float()
    assert lovasz_softmax(probas, labels).item() == 0.0
    # a "present" string that is not the interned literal (as read from a config) is still
    # "present": the absent class 2 of a 3-class map with mass on it would otherwise count
    labels2 = torch.tensor([[[0, 1], [1, 0]]])
    probas2 = torch.full((1, 3, 2, 2), 1.0 / 3)
    cfg_string = "".join(["pre", "sent"])
    assert cfg_string is not "present"  # noqa: F632  (the point of the test)
    a = lovasz_softmax(probas2, labels2, classes=cfg_string)
    b = lovasz_softmax(probas2, labels2, classes=[0, 1])
    assert torch.isclose(a, b)
    with pytest.raises(ValueError, match="classes"):
        lovasz_softmax(probas2, labels2, classes="some")


def test_void_all_void_and_single_pixel_are_defined():
    probas = torch.softmax(torch.randn(2, 3, 4, 4, requires_grad=True), dim=1)
    labels = torch.randint(0, 3, (2, 4, 4))
    labels[1] = 255  # an all-void image
    for per_image in (False, True):
        loss = lovasz_softmax(probas, labels, per_image=per_image, ignore=255)
        assert torch.isfinite(loss)
    # the void image contributes 0 and counts in the per-image mean
    first = lovasz_softmax(probas[:1], labels[:1], ignore=255)
    both = lovasz_softmax(probas, labels, per_image=True, ignore=255)
    assert torch.isclose(both, first / 2)
    # void pixels change nothing: same as cropping them away
    labels_v = labels[:1].clone()
    labels_v[0, :, 2:] = 255
    cropped = lovasz_softmax(probas[:1, :, :, :2], labels[:1, :, :2])
    assert torch.isclose(lovasz_softmax(probas[:1], labels_v, ignore=255), cropped)
    # everything void: 0 on the graph, finite gradient
    logits = torch.randn(1, 3, 3, requires_grad=True)
    loss = lovasz_hinge(logits, torch.full((1, 3, 3), 255), ignore=255)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(logits.grad == 0)
    # one valid pixel: its own error
    lab = torch.full((1, 3, 3), 255)
    lab[0, 1, 1] = 1
    x = torch.zeros(1, 3, 3)
    x[0, 1, 1] = 0.25
    assert lovasz_hinge(x, lab, ignore=255).item() == pytest.approx(0.75)
    p = torch.full((1, 2, 3, 3), 0.5)
    p[0, :, 1, 1] = torch.tensor([0.2, 0.8])
    assert lovasz_softmax(p, lab, ignore=255).item() == pytest.approx(0.2)


def test_gradients_flow_and_decrease_the_loss():
    torch.manual_seed(0)
    labels = torch.randint(0, 2, (2, 8, 8))
    logits = torch.randn(2, 8, 8, requires_grad=True)
    opt = torch.optim.SGD([logits], lr=20.0)  # per-pixel gradients are ~1/|union|
    first = None
    for _ in range(20):
        loss = lovasz_hinge(logits, labels)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def _reference():
    if not os.path.isfile(REFERENCE):
        pytest.skip(f"reference lovasz_losses.py not found ({REFERENCE}); set LOVASZ_REFERENCE")
    spec = importlib.util.spec_from_file_location("lovasz_reference", REFERENCE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("per_image", [False, True])
def test_parity_with_the_reference_implementation(per_image):
    ref = _reference()
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 9, 11, generator=g)  # float32: the reference's hinge is float32-only
    labels = (torch.rand(3, 9, 11, generator=g) > 0.6).long()
    labels[0, :2] = 255
    ours = lovasz_hinge(logits, labels, per_image=per_image, ignore=255)
    theirs = ref.lovasz_hinge(logits, labels, per_image=per_image, ignore=255)
    assert torch.allclose(ours, theirs, atol=1e-6)
    probas = torch.softmax(torch.randn(3, 5, 9, 11, generator=g), dim=1)
    mlabels = torch.randint(0, 4, (3, 9, 11), generator=g)  # class 4 absent
    mlabels[1, 3:] = 255
    for classes in ("present", "all", [1, 4]):
        ours = lovasz_softmax(probas, mlabels, classes=classes, per_image=per_image, ignore=255)
        theirs = ref.lovasz_softmax(
            probas, mlabels, classes=classes, per_image=per_image, ignore=255
        )
        assert torch.allclose(ours, torch.as_tensor(theirs, dtype=ours.dtype), atol=1e-6), classes
