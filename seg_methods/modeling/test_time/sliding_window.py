"""Single-view dense inference: the whole (padded) image at once, or overlapping windows.

Both take a *dense model function* ``fn(x) -> logits``: ``x`` is a normalised image batch
(B, 3, h, w) and the result holds per-pixel class scores at the same resolution (B, C, h, w).
They are pure functions of ``fn`` and the image, shared by every per-pixel method
(:class:`~seg_methods.modeling.meta_arch.per_pixel.PerPixelSemanticModel`).

Shape shorthand:
    B: batch, C: classes, H, W: image size, h_c, w_c: window (crop) size
"""

from typing import Callable, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.structures import ImageList

__all__ = ["DenseFn", "pad_to_divisible", "sliding_windows", "slide_inference", "whole_inference"]

# fn(images (B, 3, h, w)) -> logits (B, C, h, w)
DenseFn = Callable[[torch.Tensor], torch.Tensor]


def _check_output(logits: torch.Tensor, x: torch.Tensor, what: str) -> None:
    if logits.dim() != 4 or logits.shape[0] != x.shape[0] or logits.shape[-2:] != x.shape[-2:]:
        raise ValueError(
            f"{what}: the dense model function must return (B, C, h, w) logits at its input's "
            f"resolution; got {tuple(logits.shape)} for an input of {tuple(x.shape)}"
        )


def pad_to_divisible(x: torch.Tensor, size_divisibility: int) -> torch.Tensor:
    """Zero-pad the bottom/right of ``x`` (B, ·, H, W) so both sides divide ``size_divisibility``.

    Zero is the mean colour once the image is normalised. The padding is detectron2's
    ``ImageList.from_tensors``, which keeps the padded size symbolic under ``torch.jit.trace``
    (so an exported model pads every input size correctly). ``size_divisibility <= 1`` returns
    ``x`` unchanged.
    """
    if size_divisibility <= 1:
        return x
    return ImageList.from_tensors(list(x), size_divisibility).tensor


def whole_inference(fn: DenseFn, images: torch.Tensor, size_divisibility: int = 0) -> torch.Tensor:
    """Run ``fn`` once on the whole image, padded to ``size_divisibility``.

    Args:
        fn (DenseFn): dense model function.
        images (Tensor): (B, 3, H, W) normalised images.
        size_divisibility (int): pad both sides to a multiple of this first (<= 1: no padding).

    Returns:
        Tensor: (B, C, H, W) logits, the padding cut off.
    """
    h, w = images.shape[-2:]
    x = pad_to_divisible(images, size_divisibility)
    logits = fn(x)
    _check_output(logits, x, "whole_inference")
    return logits[..., :h, :w]


def _axis_windows(length: int, crop: int, stride: int) -> List[Tuple[int, int]]:
    # ceil((length - crop) / stride) + 1 windows; the last one is moved back to end at the border
    # (so only an image shorter than the crop has a window shorter than the crop).
    num = max(length - crop + stride - 1, 0) // stride + 1
    spans = []
    for i in range(num):
        end = min(i * stride + crop, length)
        spans.append((max(end - crop, 0), end))
    return spans


def sliding_windows(
    height: int, width: int, crop_size: Sequence[int], stride: Sequence[int]
) -> List[Tuple[int, int, int, int]]:
    """The windows that tile an image, row by row.

    Windows start every ``stride`` pixels; the last one of a row/column is shifted back so that it
    ends at the image border, so every window lies inside the image and is exactly ``crop_size``
    unless the image is smaller than the crop along that axis (then it covers the whole axis).

    Args:
        height, width (int): image size H, W.
        crop_size (Sequence[int]): (h_c, w_c), positive.
        stride (Sequence[int]): (h_s, w_s) with 0 < h_s <= h_c and 0 < w_s <= w_c, so that every
            pixel is covered.

    Returns:
        list[tuple[int, int, int, int]]: (y1, y2, x1, x2) of each window, end exclusive.
    """
    (hc, wc), (hs, ws) = tuple(crop_size), tuple(stride)
    if min(hc, wc) <= 0 or min(hs, ws) <= 0:
        raise ValueError(f"crop size {crop_size} and stride {stride} must be positive")
    if hs > hc or ws > wc:
        raise ValueError(
            f"stride {tuple(stride)} larger than the crop size {tuple(crop_size)} would leave "
            "pixels that no window covers"
        )
    rows, cols = _axis_windows(height, hc, hs), _axis_windows(width, wc, ws)
    return [(y1, y2, x1, x2) for (y1, y2) in rows for (x1, x2) in cols]


def slide_inference(
    fn: DenseFn, images: torch.Tensor, crop_size: Sequence[int], stride: Sequence[int]
) -> torch.Tensor:
    """Sliding-window inference: logits averaged over overlapping windows.

    Each window (:func:`sliding_windows`) is zero-padded at the bottom/right to the full crop size
    before ``fn`` sees it, so the network always runs at its training crop size (needed, e.g.,
    by an ASPP whose image pooling has a fixed kernel); the padded part of its logits is dropped.
    Every pixel's logits are the mean over the windows that contain it.

    Args:
        fn (DenseFn): dense model function.
        images (Tensor): (B, 3, H, W) normalised images.
        crop_size (Sequence[int]): window size (h_c, w_c).
        stride (Sequence[int]): window step (h_s, w_s), at most the crop size.

    Returns:
        Tensor: (B, C, H, W) logits.
    """
    h, w = images.shape[-2:]
    hc, wc = crop_size
    summed, count = None, images.new_zeros((1, 1, h, w))
    for y1, y2, x1, x2 in sliding_windows(h, w, crop_size, stride):
        window = images[..., y1:y2, x1:x2]
        window = F.pad(window, (0, wc - (x2 - x1), 0, hc - (y2 - y1)))  # (B, 3, h_c, w_c)
        logits = fn(window)
        _check_output(logits, window, "slide_inference")
        if summed is None:
            summed = logits.new_zeros((images.shape[0], logits.shape[1], h, w))
        summed[..., y1:y2, x1:x2] += logits[..., : y2 - y1, : x2 - x1]
        count[..., y1:y2, x1:x2] += 1
    return summed / count
