"""ProtoSeg: Sinkhorn, assignment, momentum update and PPC/PPD on hand-built cases, and the
model's prototype handling (no gradient, update only from correctly predicted pixels, saved in
checkpoints, void exclusion)."""

import math
import os

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from torch.nn import functional as F

from seg_methods.config import get_cfg
from seg_methods.modeling.criterion.protoseg import (
    VOID,
    assign_prototypes,
    momentum_update_prototypes,
    ppc_loss,
    ppd_loss,
    sinkhorn_knopp,
)

QUICK = os.path.join(
    os.path.dirname(__file__),
    "..",
    "..",
    "configs",
    "quick_schedules",
    "protoseg_synthetic_semantic_instant_test.yaml",
)


# --------------------------------------------------------------------------- Sinkhorn
def test_sinkhorn_hand_built_2x2():
    # exp(S / 1) = [[e, 1], [1, e]] is already balanced up to scale: each pixel's row is
    # [e, 1] / (e + 1) (rows sum to 1, columns to N / M = 1).
    plan = sinkhorn_knopp(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), iterations=3, epsilon=1.0)
    a = math.e / (math.e + 1)
    assert torch.allclose(plan, torch.tensor([[a, 1 - a], [1 - a, a]]), atol=1e-6)


def test_sinkhorn_marginals():
    torch.manual_seed(0)
    scores = F.normalize(torch.randn(12, 8), dim=1) @ F.normalize(torch.randn(3, 8), dim=1).t()
    plan = sinkhorn_knopp(scores, iterations=3, epsilon=0.5)
    # Pixel marginals are exact after the last (row) normalisation ...
    assert torch.allclose(plan.sum(dim=1), torch.ones(12), atol=1e-5)
    # ... prototype marginals approach N / M = 4 as the iterations go on.
    err3 = (plan.sum(dim=0) - 4).abs().max()
    plan100 = sinkhorn_knopp(scores, iterations=100, epsilon=0.5)
    assert torch.allclose(plan100.sum(dim=0), torch.full((3,), 4.0), atol=1e-4)
    assert (plan100.sum(dim=0) - 4).abs().max() <= err3
    assert not plan.requires_grad


def test_sinkhorn_small_epsilon_is_finite():
    plan = sinkhorn_knopp(torch.tensor([[1.0, -1.0], [-1.0, 1.0]]), epsilon=0.001)
    assert torch.isfinite(plan).all()


def test_sinkhorn_equipartition_changes_the_assignment():
    # Both pixels are closest to prototype 0; the equipartition sends the one that prefers it
    # less (pixel 1: 0.8 vs 0.7) to prototype 1.
    cos = torch.tensor([[0.9, 0.1], [0.8, 0.7]])
    assert cos.argmax(dim=1).tolist() == [0, 0]
    assert sinkhorn_knopp(cos, iterations=3, epsilon=0.05).argmax(dim=1).tolist() == [0, 1]


# --------------------------------------------------------------------------- assignment
def test_assign_prototypes_per_class_and_void():
    torch.manual_seed(0)
    n, c, m = 7, 3, 2
    cosines = torch.rand(n, c, m) * 2 - 1
    labels = torch.tensor([0, 2, 2, -1, 255, 0, 2])
    target, update = assign_prototypes(cosines, labels, update_assignment="argmax")
    assert torch.equal(target, update)
    assert target[3] == VOID and target[4] == VOID
    valid = target >= 0
    assert torch.equal(target[valid] // m, labels[valid])  # own class's prototypes only
    # the argmax target of class 2 is the argmax of Sinkhorn on class 2's pixels alone
    rows = labels == 2
    expected = sinkhorn_knopp(cosines[rows, 2]).argmax(dim=1) + 2 * m
    assert torch.equal(target[rows], expected)

    torch.manual_seed(1)
    target_g, update_g = assign_prototypes(cosines, labels, update_assignment="gumbel")
    assert torch.equal(target_g, target)  # PPC/PPD targets stay the argmax
    assert torch.equal(update_g < 0, target < 0)
    assert torch.equal(update_g[valid] // m, labels[valid])


def test_assign_prototypes_rejects_unknown_mode():
    with pytest.raises(ValueError, match="UPDATE_ASSIGNMENT"):
        assign_prototypes(
            torch.zeros(1, 1, 1), torch.zeros(1, dtype=torch.long), update_assignment="x"
        )


# --------------------------------------------------------------------------- momentum update
def _unit_protos():
    e0, e1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    return torch.stack([torch.stack([e0, e1]), torch.stack([e0, e1])])  # (C=2, M=2, D=2)


def test_momentum_update_hand_built():
    protos = _unit_protos()
    emb = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    ids = torch.tensor([0, 0, 0, VOID])
    correct = torch.tensor([True, True, False, True])  # pixel 2 is misclassified
    new = momentum_update_prototypes(protos, emb, ids, correct, momentum=0.5)
    # prototype (0, 0): 0.5 * [1, 0] + 0.5 * l2norm([0, 1] + [1, 0]), renormalised
    s = 1 / math.sqrt(2)
    v = torch.tensor([0.5 + 0.5 * s, 0.5 * s])
    assert torch.allclose(new[0, 0], v / v.norm(), atol=1e-6)
    assert torch.equal(new[0, 1], protos[0, 1]) and torch.equal(new[1], protos[1])
    assert torch.allclose(new.norm(dim=-1), torch.ones(2, 2))


def test_momentum_update_uses_only_correct_pixels_and_renormalises():
    protos = _unit_protos() * 3.0  # not unit: every prototype is renormalised, none moves
    emb = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    new = momentum_update_prototypes(
        protos, emb, torch.tensor([0, 2]), torch.tensor([False, False]), momentum=0.0
    )
    assert torch.allclose(new, _unit_protos())
    # momentum 0 with one correct pixel: the prototype becomes that pixel's embedding
    new = momentum_update_prototypes(
        protos, emb, torch.tensor([0, 2]), torch.tensor([True, False]), momentum=0.0
    )
    assert torch.allclose(new[0, 0], torch.tensor([0.0, 1.0]))
    assert torch.allclose(new[1, 0], torch.tensor([1.0, 0.0]))


# --------------------------------------------------------------------------- PPC / PPD
def test_ppc_and_ppd_by_hand_with_void():
    logits = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.5, 0.2, -0.3, 0.9], [7.0, -7.0, 3.0, 1.0]])
    targets = torch.tensor([0, 3, VOID])
    ppc0 = -math.log(math.e / (math.e + 3))
    ppc1 = -math.log(math.exp(0.9) / sum(math.exp(x) for x in (0.5, 0.2, -0.3, 0.9)))
    assert ppc_loss(logits, targets).item() == pytest.approx((ppc0 + ppc1) / 2, rel=1e-5)
    ppc_t = -math.log(math.exp(2) / (math.exp(2) + 3))
    assert ppc_loss(logits[:1], targets[:1], temperature=0.5).item() == pytest.approx(
        ppc_t, rel=1e-5
    )
    # (1 - 1)^2 and (1 - 0.9)^2, void excluded
    assert ppd_loss(logits, targets).item() == pytest.approx((0.0 + 0.01) / 2, rel=1e-5)


def test_ppc_ppd_all_void_is_zero_with_graph():
    logits = torch.randn(3, 4, requires_grad=True)
    targets = torch.full((3,), VOID)
    for loss in (ppc_loss(logits, targets), ppd_loss(logits, targets)):
        assert loss.item() == 0.0
        loss.backward()
    assert torch.equal(logits.grad, torch.zeros(3, 4))


# --------------------------------------------------------------------------- model
@pytest.fixture
def model():
    torch.manual_seed(0)
    cfg = get_cfg()
    cfg.merge_from_file(QUICK)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.PROTOSEG.LOGITS_NORM = False  # so that tied prototypes give tied logits
    cfg.MODEL.PROTOSEG.MOMENTUM = 0.5
    return build_model(cfg)


def _inputs(label, size=(40, 56)):
    torch.manual_seed(1)
    return [
        {"image": torch.rand(3, *size) * 255, "sem_seg": torch.full(size, label, dtype=torch.long)}
        for _ in range(2)
    ]


def test_prototypes_are_a_buffer_without_gradient(model):
    assert "prototypes" in dict(model.named_buffers())
    assert all("prototypes" not in n for n, _ in model.named_parameters())
    assert torch.allclose(model.prototypes.norm(dim=-1), torch.ones(8, 3))
    model.train()
    losses = model(_inputs(1))
    assert set(losses) == {"loss_sem_seg", "loss_ppc", "loss_ppd"}
    sum(losses.values()).backward()
    assert model.prototypes.grad is None and not model.prototypes.requires_grad
    assert torch.allclose(model.prototypes.norm(dim=-1), torch.ones(8, 3), atol=1e-6)


def test_update_only_from_correctly_predicted_pixels(model):
    model.train()
    # Every prototype of every class is the same vector: every class ties and the argmax
    # predicts class 0 at every pixel.
    v = F.normalize(torch.randn(16), dim=0)
    model.prototypes = v.expand(8, 3, 16).clone()
    before = model.prototypes.clone()
    with torch.no_grad():
        model(_inputs(1))  # all pixels labelled 1, all predicted 0: nothing moves
    # (up to the renormalisation every update ends with)
    assert torch.allclose(model.prototypes, before, atol=1e-6, rtol=0)
    with torch.no_grad():
        model(_inputs(0))  # all labelled 0, all correct: only class 0's prototypes move
    assert torch.allclose(model.prototypes[1:], before[1:], atol=1e-6, rtol=0)
    assert (model.prototypes[0] - before[0]).abs().max() > 1e-3


def test_losses_use_prototypes_from_before_the_update(model):
    model.train()
    images = model.preprocess_images(_inputs(2))
    targets = model.targets(_inputs(2), images)
    torch.manual_seed(5)  # the same ASPP dropout in every pass
    with torch.no_grad():
        v = F.normalize(model.embed(images.tensor).mean(dim=(0, 2, 3)), dim=0)
    # class 2's prototypes are the mean embedding direction, the others its opposite: class 2
    # is predicted (correctly) at most pixels, so its prototypes move.
    protos = -v.expand(8, 3, 16).clone()
    protos[2] = v
    model.prototypes = protos
    before = protos.clone()
    torch.manual_seed(5)
    with torch.no_grad():
        out = model.forward_head(images.tensor, targets)
    assert (model.prototypes[2] - before[2]).abs().max() > 1e-3
    torch.manual_seed(5)
    emb = model.embed(images.tensor)  # BN in train mode: the same batch statistics
    expected = model.prototype_cosines(emb, before).permute(0, 3, 4, 1, 2).reshape(-1, 24)
    assert torch.allclose(out["proto_logits"], expected, atol=1e-5)
    after = model.prototype_cosines(emb).permute(0, 3, 4, 1, 2).reshape(-1, 24)
    assert not torch.allclose(out["proto_logits"], after, atol=1e-5)


def test_all_void_batch_gives_finite_losses_and_no_update(model):
    model.train()
    before = model.prototypes.clone()
    losses = model(_inputs(255))
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_ppc"].item() == 0.0 and losses["loss_ppd"].item() == 0.0
    assert torch.allclose(model.prototypes, before, atol=1e-6, rtol=0)


def test_prototypes_saved_and_loaded_by_checkpointer(model, tmp_path):
    model.prototypes = F.normalize(torch.randn_like(model.prototypes), dim=-1)
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("m")
    cfg = get_cfg()
    cfg.merge_from_file(QUICK)
    cfg.MODEL.DEVICE = "cpu"
    other = build_model(cfg)
    assert not torch.equal(other.prototypes, model.prototypes)
    DetectionCheckpointer(other).load(str(tmp_path / "m.pth"))
    assert torch.equal(other.prototypes, model.prototypes)


def test_nearest_prototypes_and_inference(model):
    model.eval()
    inputs = [{"image": torch.rand(3, 37, 45) * 255, "height": 30, "width": 50}]
    ids = model.nearest_prototypes(inputs)[0]
    assert ids.shape == (30, 50) and ids.dtype == torch.long
    assert 0 <= int(ids.min()) and int(ids.max()) < 8 * 3
    sem = model(inputs)[0]["sem_seg"]
    assert sem.shape == (8, 30, 50)
    # without the logits LayerNorm the predicted class is the nearest prototype's class
    assert (sem.argmax(dim=0) == ids // 3).float().mean() > 0.99
