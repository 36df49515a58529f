"""Lovász losses: convex surrogates of the Jaccard (IoU) loss, written once for every method.

Berman, Rannen Triki and Blaschko, "The Lovász-Softmax loss: A tractable surrogate for the
optimization of the intersection-over-union measure in neural networks", CVPR 2018. Used by
Hierarchical Lovász Embeddings (instance hinge, class softmax: HLE Eq. 3-6, 11-12) and by
Unifying Training and Inference.

The Jaccard loss of a set of mispredicted pixels M for class c is
``Delta_J(M) = 1 - |y* ∩ ŷ| / |y* ∪ ŷ|`` (Berman Eq. 3). It is submodular, so its Lovász
extension ``Δ̄(m) = sum_i m_(i) g_i(m)`` is convex and piecewise linear in the error vector m
(Eq. 8-9), where ``m_(1) >= m_(2) >= ...`` are the errors sorted in decreasing order and
``g_i = Delta_J({1..i}) - Delta_J({1..i-1})`` (Alg. 1, :func:`lovasz_grad`). At a vertex
(every error 0 or 1) the extension equals ``Delta_J`` of the set of pixels whose error is 1.

Which input each loss takes (the reference implementation's convention, kept here):

* :func:`lovasz_hinge` takes LOGITS (real margins) of a binary problem; the errors are
  ``max(0, 1 - logit * sign)`` with ``sign = 2 * label - 1`` (Berman Eq. 10-11).
* :func:`lovasz_softmax` takes PROBABILITIES (softmax output, (B, C, H, W)); the errors of class c
  are ``|[label == c] - p_c|`` (Berman Eq. 12).

Edge cases (each gives a defined, finite result attached to the autograd graph):

* void pixels (``ignore``) are removed before sorting: they take part in no term;
* an image (``per_image=True``) or batch whose pixels are all void gives 0 for that image; it still
  counts in the per-image mean (the reference hinge's behaviour; its softmax returns an empty
  tensor there, which we do not inherit);
* a single valid pixel is a 1-element problem: the loss is that pixel's error (the reference's
  softmax crashes on it, ``squeeze`` turns its index into a scalar);
* ``classes="present"``: classes absent from the (valid) labels are skipped; if none is present the
  loss is 0. ``"all"`` averages over every class (an absent class then contributes ``Δ̄`` of its
  false positives, i.e. 1 as soon as any probability mass is on it, 0 if none). A list selects
  classes. Strings are compared by value (the reference tests ``classes is 'present'`` by
  identity, so a string read from a config silently behaves like ``"all"``; not here).

Shape shorthand: B images, C classes, H x W pixels, P flattened valid pixels.
"""

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

__all__ = [
    "lovasz_grad",
    "lovasz_hinge_flat",
    "lovasz_hinge",
    "lovasz_softmax_flat",
    "lovasz_softmax",
    "jaccard_loss",
]

Classes = Union[str, Sequence[int]]


def lovasz_grad(gt_sorted: torch.Tensor) -> torch.Tensor:
    """Gradient of the Lovász extension of the Jaccard loss w.r.t. sorted errors (Berman Alg. 1).

    Args:
        gt_sorted (Tensor): (P,) ground truth in {0, 1} (any dtype), ordered by DEcreasing error.

    Returns:
        Tensor: (P,) float ``g_i = Delta_J({1..i}) - Delta_J({1..i-1})`` (``Delta_J(∅) = 0``);
        ``sum_i g_i = Delta_J(all pixels)``.
    """
    gt = gt_sorted.to(torch.float32)
    gts = gt.sum()
    intersection = gts - gt.cumsum(0)
    union = gts + (1.0 - gt).cumsum(0)  # >= 1 at every index: pixel i is in gt or counted here
    jaccard = 1.0 - intersection / union
    if jaccard.numel() > 1:
        jaccard = torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])
    return jaccard


def _lovasz_extension(errors: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """``Δ̄(errors)`` for one binary problem (Berman Eq. 9): errors (P,) >= 0, gt (P,) {0, 1}."""
    errors_sorted, perm = torch.sort(errors, dim=0, descending=True)
    grad = lovasz_grad(gt[perm]).to(errors_sorted.dtype)
    return torch.dot(errors_sorted, grad)


def _valid(labels: torch.Tensor, ignore: Optional[int]) -> torch.Tensor:
    return torch.ones_like(labels, dtype=torch.bool) if ignore is None else labels != ignore


def lovasz_hinge_flat(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary Lovász hinge of one flattened problem (Berman Eq. 10-11).

    Args:
        logits (Tensor): (P,) real scores (margins); positive means foreground.
        labels (Tensor): (P,) ground truth in {0, 1}.

    Returns:
        Tensor: scalar; ``logits.sum() * 0`` (0, on the graph) when P = 0.
    """
    if logits.numel() == 0:
        return logits.sum() * 0.0
    signs = 2.0 * labels.to(logits.dtype) - 1.0
    errors = F.relu(1.0 - logits * signs)
    # ReLU before sorting leaves the order of the positive errors unchanged; the zero errors add 0
    # whatever their order (the reference sorts first, then applies ReLU: same value).
    return _lovasz_extension(errors, labels)


def lovasz_hinge(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    per_image: bool = True,
    ignore: Optional[int] = None,
) -> torch.Tensor:
    """Binary Lovász hinge loss on logits (reference default ``per_image=True``).

    Args:
        logits (Tensor): (B, H, W) logits (any trailing shape after B).
        labels (Tensor): (B, H, W) in {0, 1} (or ``ignore``).
        per_image (bool): mean over images of each image's loss (an all-void image gives 0 and
            counts), else one problem over the whole batch.
        ignore (int or None): void label.

    Returns:
        Tensor: scalar loss.
    """
    if logits.shape != labels.shape:
        raise ValueError(
            f"lovasz_hinge: logits {tuple(logits.shape)} and labels {tuple(labels.shape)} differ"
        )
    if not per_image:
        valid = _valid(labels, ignore)
        return lovasz_hinge_flat(logits[valid], labels[valid])
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    losses = []
    for logit, label in zip(logits, labels):
        valid = _valid(label, ignore)
        losses.append(lovasz_hinge_flat(logit[valid], label[valid]))
    return torch.stack(losses).mean()


def _class_list(classes: Classes, num_classes: int) -> Sequence[int]:
    if isinstance(classes, str):
        if classes not in ("all", "present"):
            raise ValueError(
                f"lovasz_softmax: classes must be 'all', 'present' or a list, got {classes!r}"
            )
        return range(num_classes)
    out = [int(c) for c in classes]
    bad = [c for c in out if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"lovasz_softmax: classes {bad} outside [0, {num_classes})")
    return out


def lovasz_softmax_flat(
    probas: torch.Tensor, labels: torch.Tensor, classes: Classes = "present"
) -> torch.Tensor:
    """Multi-class Lovász-Softmax of flattened valid pixels (Berman Eq. 12).

    Args:
        probas (Tensor): (P, C) class probabilities.
        labels (Tensor): (P,) ground truth in [0, C).
        classes: "all", "present" or a list of class indices to average over.

    Returns:
        Tensor: scalar; 0 (on the graph) when P = 0 or no selected class is present.
    """
    if probas.dim() != 2:
        raise ValueError(f"lovasz_softmax_flat: probas must be (P, C), got {tuple(probas.shape)}")
    zero = probas.sum() * 0.0
    if probas.shape[0] == 0:
        return zero
    losses = []
    for c in _class_list(classes, probas.shape[1]):
        fg = labels == c
        if isinstance(classes, str) and classes == "present" and not bool(fg.any()):
            continue
        errors = (fg.to(probas.dtype) - probas[:, c]).abs()
        losses.append(_lovasz_extension(errors, fg))
    if not losses:
        return zero
    return torch.stack(losses).mean()


def lovasz_softmax(
    probas: torch.Tensor,
    labels: torch.Tensor,
    *,
    classes: Classes = "present",
    per_image: bool = False,
    ignore: Optional[int] = None,
) -> torch.Tensor:
    """Multi-class Lovász-Softmax loss on probabilities (reference defaults: batch-wise, "present").

    Args:
        probas (Tensor): (B, C, H, W) probabilities (softmax over C).
        labels (Tensor): (B, H, W) in [0, C) or ``ignore``.
        classes: "all", "present" or a list of class indices.
        per_image (bool): mean over images (an all-void image gives 0 and counts) or one batch-wide
            problem.
        ignore (int or None): void label.

    Returns:
        Tensor: scalar loss.
    """
    if probas.dim() != 4 or labels.shape != (probas.shape[0], *probas.shape[2:]):
        raise ValueError(
            f"lovasz_softmax: probas must be (B, C, H, W) and labels (B, H, W); got "
            f"{tuple(probas.shape)} and {tuple(labels.shape)}"
        )
    flat_p = probas.permute(0, 2, 3, 1).reshape(probas.shape[0], -1, probas.shape[1])
    flat_l = labels.reshape(labels.shape[0], -1)
    if not per_image:
        valid = _valid(flat_l, ignore)
        return lovasz_softmax_flat(flat_p[valid], flat_l[valid], classes)
    if probas.shape[0] == 0:
        return probas.sum() * 0.0
    losses = []
    for p, l in zip(flat_p, flat_l):
        valid = _valid(l, ignore)
        losses.append(lovasz_softmax_flat(p[valid], l[valid], classes))
    return torch.stack(losses).mean()


def jaccard_loss(pred: torch.Tensor, gt: torch.Tensor) -> float:
    """The set function ``Delta_J = 1 - |pred ∩ gt| / |pred ∪ gt|`` of two boolean masks (0 if both
    are empty); the value the surrogates equal at the vertices. For tests and diagnostics."""
    pred, gt = pred.bool(), gt.bool()
    union = (pred | gt).sum().item()
    return 0.0 if union == 0 else 1.0 - (pred & gt).sum().item() / union
