"""Multi-scale + horizontal-flip test-time augmentation on top of a single-view inference.

A *view function* ``view_fn(x) -> logits`` runs one view (whole image or sliding windows, see
:mod:`.sliding_window`) on a normalised image (1, 3, h, w) and returns (1, C, h, w) logits. Here
the image is resized to each test size and optionally mirrored; every view's logits are mirrored
back, resized to the output size and averaged.

What is averaged (``average``):

* ``"probs"`` (default): the softmax probabilities of each view. Softmax is invariant to a
  per-pixel shift of the logits, so the logits of different scales need not share an offset or
  magnitude; probabilities are bounded, so every view gets an equal vote and one over-confident
  view cannot dominate. This is what DeepLab's and mmsegmentation's multi-scale testing do.
* ``"logits"``: the raw logits (a geometric-mean-like vote); offered for heads whose scores are
  not softmax logits (e.g. sigmoid scores) or to compare.

Shape shorthand:
    C: classes, h, w: size of one view, H_out, W_out: output size
"""

from typing import Callable, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.data.transforms import ResizeShortestEdge

__all__ = ["AVERAGE_MODES", "multi_scale_flip_inference", "tta_sizes"]

AVERAGE_MODES = ("probs", "logits")


def tta_sizes(
    height: int, width: int, min_sizes: Sequence[int], max_size: int
) -> List[Tuple[int, int]]:
    """Test sizes of an image for detectron2-style ``TEST.AUG.MIN_SIZES`` / ``MAX_SIZE``.

    Each entry resizes the shortest edge of a (height, width) image to ``min_sizes[i]``, keeping
    the aspect ratio, unless the longest edge would exceed ``max_size`` (then it is capped), as
    detectron2's ``ResizeShortestEdge`` does (its ``get_output_shape`` is used).

    Returns:
        list[tuple[int, int]]: one (h, w) per entry of ``min_sizes``, in order.
    """
    return [
        ResizeShortestEdge.get_output_shape(height, width, int(s), int(max_size)) for s in min_sizes
    ]


def _resize(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def multi_scale_flip_inference(
    view_fn: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    *,
    sizes: Sequence[Tuple[int, int]],
    flip: bool,
    output_size: Tuple[int, int],
    average: str = "probs",
    to_probs: Callable[[torch.Tensor], torch.Tensor] = lambda s: s.softmax(dim=1),
) -> torch.Tensor:
    """Average a view function's predictions over test sizes and horizontal flips.

    Args:
        view_fn (callable): (1, 3, h, w) normalised image -> (1, C, h, w) logits.
        image (Tensor): (1, 3, H, W) normalised image.
        sizes (Sequence[tuple[int, int]]): the (h, w) sizes the image is resized to (bilinear,
            antialiased when shrinking), e.g. from :func:`tta_sizes`.
        flip (bool): also run every size mirrored left-right (twice as many views).
        output_size (tuple[int, int]): (H_out, W_out) every view's logits are resized to
            (bilinear) before averaging.
        average (str): "probs" (mean of ``to_probs`` of each view) or "logits" (mean of the
            logits); see the module docstring.
        to_probs (callable): logits (1, C, H_out, W_out) -> probabilities; softmax over classes
            by default.

    Returns:
        Tensor: (1, C, H_out, W_out), the mean probabilities or mean logits of all views.
    """
    if average not in AVERAGE_MODES:
        raise ValueError(f"average must be one of {AVERAGE_MODES}, got {average!r}")
    if not sizes:
        raise ValueError("multi_scale_flip_inference needs at least one test size")
    total, num_views = None, 0
    for size in sizes:
        size = (int(size[0]), int(size[1]))
        if tuple(image.shape[-2:]) == size:
            scaled = image
        else:
            shrink = size[0] < image.shape[-2] or size[1] < image.shape[-1]
            scaled = F.interpolate(
                image, size=size, mode="bilinear", align_corners=False, antialias=shrink
            )
        for mirrored in (False, True) if flip else (False,):
            x = scaled.flip(-1) if mirrored else scaled
            logits = view_fn(x)  # (1, C, h, w)
            if logits.shape[-2:] != x.shape[-2:]:
                raise ValueError(
                    f"the view function returned {tuple(logits.shape)} for an input of "
                    f"{tuple(x.shape)}; it must keep the input's resolution"
                )
            if mirrored:
                logits = logits.flip(-1)
            scores = _resize(logits, output_size)  # (1, C, H_out, W_out)
            if average == "probs":
                scores = to_probs(scores)
            total = scores if total is None else total + scores
            num_views += 1
    return total / num_views
