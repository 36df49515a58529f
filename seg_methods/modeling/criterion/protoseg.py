"""ProtoSeg's clustering, prototype update and losses as pure functions.

Zhou et al., "Rethinking Semantic Segmentation: A Prototype View" (CVPR 2022); official code
tfzhou/ProtoSeg (``lib/models/modules/sinkhorn.py``, ``lib/models/nets/hrnet.py``,
``lib/loss/loss_proto.py``), read for understanding, not copied.

* :func:`sinkhorn_knopp`: the entropic optimal-transport assignment of one class's pixels to its
  M prototypes (equipartition over prototypes, every pixel fully assigned).
* :func:`assign_prototypes`: per-pixel prototype ids drawn from the Sinkhorn plans of every
  class: the argmax (the PPC/PPD targets) and the update assignment (argmax or, as the official
  code, a hard Gumbel sample).
* :func:`momentum_update_prototypes`: the moving average of the prototypes over the correctly
  classified pixels assigned to them.
* :func:`ppc_loss`, :func:`ppd_loss`: the pixel-prototype contrastive and distance losses.

Pixels are flattened: N pixels, C classes, M prototypes per class, D embedding dims. A global
prototype id is ``class * M + m``; :data:`VOID` (-1) marks pixels with no target.
"""

from typing import Tuple

import torch
import torch.nn.functional as F

__all__ = [
    "UPDATE_ASSIGNMENTS",
    "VOID",
    "assign_prototypes",
    "momentum_update_prototypes",
    "ppc_loss",
    "ppd_loss",
    "sinkhorn_knopp",
]

VOID = -1
UPDATE_ASSIGNMENTS = ("gumbel", "argmax")


def sinkhorn_knopp(scores: torch.Tensor, iterations: int = 3, epsilon: float = 0.05):
    """Sinkhorn-Knopp transport plan from N pixels to M prototypes of one class.

    The plan maximises ``tr(Q^T S) + epsilon * H(Q)`` over Q with equipartition constraints; it
    has the form ``diag(u) exp(S / epsilon) diag(v)`` and is found by alternately normalising
    the prototype marginals (to 1/M) and the pixel marginals (to 1/N), ``iterations`` times each,
    starting from ``exp(S / epsilon)`` scaled to total mass 1, as the official
    ``distributed_sinkhorn``. The result is multiplied by N so that each pixel's row sums to
    exactly 1 and each prototype's column to about N / M (exactly in the limit).

    Args:
        scores (Tensor): (N, M) cosine similarities of the pixels to the prototypes.
        iterations (int): normalisation rounds (official: 3).
        epsilon (float): entropic regularisation, the temperature of ``exp(S / epsilon)``
            (official: 0.05).

    Returns:
        Tensor: (N, M) plan, float32, without gradient; rows sum to 1.
    """
    if scores.dim() != 2 or scores.shape[0] == 0:
        raise ValueError(f"sinkhorn_knopp needs (N > 0, M) scores, got {tuple(scores.shape)}")
    if epsilon <= 0:
        raise ValueError(f"MODEL.PROTOSEG.SINKHORN_EPSILON must be > 0, got {epsilon}")
    with torch.no_grad():
        s = scores.detach().float() / epsilon
        # Subtracting the maximum changes nothing after the first normalisation but keeps exp()
        # finite for small epsilon (the official code exponentiates directly).
        q = torch.exp(s - s.max())
        q = q / q.sum()
        n, m = q.shape
        for _ in range(iterations):
            q = q / (q.sum(dim=0, keepdim=True) * m)  # each prototype (column) gets mass 1/M
            q = q / (q.sum(dim=1, keepdim=True) * n)  # each pixel (row) gets mass 1/N
        return q * n


def assign_prototypes(
    cosines: torch.Tensor,
    labels: torch.Tensor,
    *,
    iterations: int = 3,
    epsilon: float = 0.05,
    update_assignment: str = "gumbel",
    gumbel_tau: float = 0.5,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Online clustering of each class's pixels onto that class's prototypes.

    For every class k present in ``labels``, :func:`sinkhorn_knopp` runs on the cosines of the
    pixels labelled k to the M prototypes of k only. Void pixels (label < 0 or >= C) take part
    in no clustering.

    Args:
        cosines (Tensor): (N, C, M) cosine similarity of every pixel to every prototype.
        labels (Tensor): (N,) int64 class per pixel; anything outside [0, C) is void.
        iterations, epsilon: Sinkhorn settings (see :func:`sinkhorn_knopp`).
        update_assignment (str): how the update ids are drawn from each plan: "argmax" (the
            paper) or "gumbel" (official: ``F.gumbel_softmax(plan, tau, hard=True)``, i.e. the
            plan's entries are used as logits; tau does not change a hard sample's value).
        gumbel_tau (float): Gumbel-softmax temperature.

    Returns:
        (Tensor, Tensor): ``target_ids`` and ``update_ids``, both (N,) int64 global prototype ids
        ``k * M + m``, :data:`VOID` for void pixels. ``target_ids`` is the plan's argmax (the
        PPC/PPD target in both the paper and the official code); ``update_ids`` follows
        ``update_assignment``.
    """
    if update_assignment not in UPDATE_ASSIGNMENTS:
        raise ValueError(
            f"MODEL.PROTOSEG.UPDATE_ASSIGNMENT must be one of {UPDATE_ASSIGNMENTS}, got "
            f"{update_assignment!r}"
        )
    n, num_classes, m = cosines.shape
    if labels.shape != (n,):
        raise ValueError(f"labels {tuple(labels.shape)} must be ({n},) like cosines' first dim")
    target_ids = torch.full((n,), VOID, dtype=torch.long, device=cosines.device)
    update_ids = target_ids.clone()
    for k in labels.unique().tolist():
        if not 0 <= k < num_classes:
            continue  # void
        rows = labels == k
        plan = sinkhorn_knopp(cosines[rows, k], iterations, epsilon)  # (n_k, M)
        target_ids[rows] = plan.argmax(dim=1) + k * m
        if update_assignment == "gumbel":
            sample = F.gumbel_softmax(plan, tau=gumbel_tau, hard=True)
            update_ids[rows] = sample.argmax(dim=1) + k * m
        else:
            update_ids[rows] = target_ids[rows]
    return target_ids, update_ids


def momentum_update_prototypes(
    prototypes: torch.Tensor,
    embeddings: torch.Tensor,
    update_ids: torch.Tensor,
    correct: torch.Tensor,
    momentum: float = 0.999,
) -> torch.Tensor:
    """Moving-average prototype update from the correctly classified pixels.

    For every prototype p with at least one correctly classified pixel assigned to it,
    ``p <- gamma * p + (1 - gamma) * l2norm(sum of those pixels' embeddings)``; prototypes with no
    such pixel keep their value. Every prototype is L2-normalised afterwards (official
    ``prototype_learning``; the paper writes the update with the mean embedding, whose direction
    is the same as the normalised sum's).

    Args:
        prototypes (Tensor): (C, M, D) current prototypes.
        embeddings (Tensor): (N, D) L2-normalised pixel embeddings.
        update_ids (Tensor): (N,) global prototype id per pixel (:data:`VOID`: none).
        correct (Tensor): (N,) bool, True where the pixel's predicted class is its label.
        momentum (float): gamma in [0, 1].

    Returns:
        Tensor: (C, M, D) new prototypes, unit norm, without gradient.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"MODEL.PROTOSEG.MOMENTUM must be in [0, 1], got {momentum}")
    num_classes, m, d = prototypes.shape
    with torch.no_grad():
        flat = prototypes.detach().reshape(num_classes * m, d).float()
        use = correct & (update_ids >= 0)
        ids = update_ids[use]
        sums = torch.zeros_like(flat).index_add_(0, ids, embeddings.detach()[use].float())
        counts = torch.zeros(num_classes * m, device=flat.device).index_add_(
            0, ids, torch.ones_like(ids, dtype=torch.float)
        )
        touched = counts > 0
        moved = momentum * flat + (1.0 - momentum) * F.normalize(sums, dim=-1)
        flat = torch.where(touched[:, None], moved, flat)
        return F.normalize(flat, dim=-1).reshape(num_classes, m, d).to(prototypes.dtype)


def ppc_loss(
    proto_logits: torch.Tensor, target_ids: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Pixel-prototype contrastive loss: cross-entropy over all C * M prototypes with the
    assigned prototype as the target, averaged over the non-void pixels.

    Args:
        proto_logits (Tensor): (N, C * M) cosines of the pixels to every prototype.
        target_ids (Tensor): (N,) assigned global prototype id, :data:`VOID` to skip.
        temperature (float): the cosines are divided by it (official: 1, no temperature).

    Returns:
        Tensor: scalar; 0 (attached to the graph) when every pixel is void.
    """
    valid = target_ids >= 0
    if not bool(valid.any()):
        return proto_logits.sum() * 0.0
    return F.cross_entropy(proto_logits[valid] / temperature, target_ids[valid])


def ppd_loss(proto_logits: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
    """Pixel-prototype distance loss: mean over non-void pixels of ``(1 - cos(i, p_assigned))^2``.

    Args:
        proto_logits (Tensor): (N, C * M) cosines of the pixels to every prototype.
        target_ids (Tensor): (N,) assigned global prototype id, :data:`VOID` to skip.

    Returns:
        Tensor: scalar; 0 (attached to the graph) when every pixel is void.
    """
    valid = target_ids >= 0
    if not bool(valid.any()):
        return proto_logits.sum() * 0.0
    assigned = proto_logits[valid].gather(1, target_ids[valid, None])[:, 0]
    return (1.0 - assigned).pow(2).mean()
