"""The test-time strategy of every per-pixel semantic model, built once from the config.

:class:`SemSegTestTime` combines the pure functions of :mod:`.sliding_window` and
:mod:`.augmentation`:

* ``TEST.PER_PIXEL.MODE``: "whole" (the image padded to the size divisibility, one pass) or
  "slide" (``TEST.PER_PIXEL.CROP_SIZE`` windows every ``TEST.PER_PIXEL.STRIDE`` pixels, padded to
  the crop size, logits averaged where they overlap);
* ``TEST.AUG.ENABLED``: multi-scale (``TEST.AUG.MIN_SIZES``, ``TEST.AUG.MAX_SIZE``, detectron2's
  keys and meaning: shortest edge of the *original* image) and horizontal flip
  (``TEST.AUG.FLIP``) on top of either mode, averaging as ``TEST.PER_PIXEL.AVERAGE`` says.

Shape shorthand:
    C: classes, H, W: size of the network input, H_out, W_out: output size
"""

from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable

from .augmentation import AVERAGE_MODES, multi_scale_flip_inference, tta_sizes
from .sliding_window import DenseFn, slide_inference, sliding_windows, whole_inference

__all__ = ["MODES", "SemSegTestTime"]

MODES = ("whole", "slide")


class SemSegTestTime:
    """Whole-image or sliding-window inference, optionally with multi-scale + flip TTA.

    Args:
        mode (str): "whole" or "slide" (``TEST.PER_PIXEL.MODE``).
        crop_size (Sequence[int]): (h_c, w_c) window of "slide" (``TEST.PER_PIXEL.CROP_SIZE``);
            must be divisible by ``size_divisibility``.
        stride (Sequence[int]): (h_s, w_s) window step of "slide", at most the crop size
            (``TEST.PER_PIXEL.STRIDE``).
        size_divisibility (int): "whole" pads the image to a multiple of this (<= 1: no padding).
        aug_enabled (bool): multi-scale + flip TTA (``TEST.AUG.ENABLED``).
        aug_min_sizes (Sequence[int]): shortest-edge test sizes (``TEST.AUG.MIN_SIZES``).
        aug_max_size (int): cap of the longest edge (``TEST.AUG.MAX_SIZE``).
        aug_flip (bool): add mirrored views (``TEST.AUG.FLIP``).
        average (str): "probs" or "logits", what TTA averages (``TEST.PER_PIXEL.AVERAGE``).
    """

    @configurable
    def __init__(
        self,
        *,
        mode: str = "whole",
        crop_size: Sequence[int] = (512, 512),
        stride: Sequence[int] = (341, 341),
        size_divisibility: int = 0,
        aug_enabled: bool = False,
        aug_min_sizes: Sequence[int] = (),
        aug_max_size: int = 4000,
        aug_flip: bool = True,
        average: str = "probs",
    ):
        if mode not in MODES:
            raise ValueError(f"TEST.PER_PIXEL.MODE must be one of {MODES}, got {mode!r}")
        if average not in AVERAGE_MODES:
            raise ValueError(
                f"TEST.PER_PIXEL.AVERAGE must be one of {AVERAGE_MODES}, got {average!r}"
            )
        self.mode = mode
        self.crop_size = tuple(int(c) for c in crop_size)
        self.stride = tuple(int(s) for s in stride)
        self.size_divisibility = int(size_divisibility)
        if mode == "slide":
            if len(self.crop_size) != 2 or len(self.stride) != 2:
                raise ValueError(
                    "TEST.PER_PIXEL.CROP_SIZE and TEST.PER_PIXEL.STRIDE must be (height, width), "
                    f"got {crop_size} and {stride}"
                )
            try:
                sliding_windows(1, 1, self.crop_size, self.stride)
            except ValueError as e:
                raise ValueError(f"TEST.PER_PIXEL.CROP_SIZE / STRIDE: {e}") from e
            d = self.size_divisibility
            if d > 1 and (self.crop_size[0] % d or self.crop_size[1] % d):
                raise ValueError(
                    f"TEST.PER_PIXEL.CROP_SIZE {self.crop_size} must be divisible by the model's "
                    f"size divisibility {d}"
                )
        self.aug_enabled = bool(aug_enabled)
        self.aug_min_sizes = tuple(int(s) for s in aug_min_sizes)
        self.aug_max_size = int(aug_max_size)
        self.aug_flip = bool(aug_flip)
        if self.aug_enabled and not self.aug_min_sizes:
            raise ValueError("TEST.AUG.ENABLED needs at least one size in TEST.AUG.MIN_SIZES")
        self.average = average

    @classmethod
    def from_config(cls, cfg, size_divisibility: int = 0):
        node = cfg.TEST.PER_PIXEL
        return {
            "mode": node.MODE,
            "crop_size": node.CROP_SIZE,
            "stride": node.STRIDE,
            "size_divisibility": size_divisibility,
            "aug_enabled": cfg.TEST.AUG.ENABLED,
            "aug_min_sizes": cfg.TEST.AUG.MIN_SIZES,
            "aug_max_size": cfg.TEST.AUG.MAX_SIZE,
            "aug_flip": cfg.TEST.AUG.FLIP,
            "average": node.AVERAGE,
        }

    def single_view(self, fn: DenseFn, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, C, H, W) logits, by ``mode``."""
        if self.mode == "slide":
            return slide_inference(fn, images, self.crop_size, self.stride)
        return whole_inference(fn, images, self.size_divisibility)

    def __call__(
        self,
        fn: DenseFn,
        image: torch.Tensor,
        output_size: Tuple[int, int],
        original_size: Optional[Tuple[int, int]] = None,
        to_probs: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    ) -> torch.Tensor:
        """Per-pixel scores of one image at the output size.

        Args:
            fn (DenseFn): dense model function, (B, 3, h, w) -> (B, C, h, w) logits.
            image (Tensor): (1, 3, H, W) normalised image (unpadded).
            output_size (tuple[int, int]): (H_out, W_out).
            original_size (tuple[int, int] or None): size of the image before the test-time
                resize, which ``TEST.AUG.MIN_SIZES`` refer to (None: ``image``'s own size).
            to_probs (callable or None): logits -> probabilities for ``average="probs"``
                (None: softmax over classes).

        Returns:
            Tensor: (1, C, H_out, W_out): logits for a single view (as detectron2's
            ``sem_seg_postprocess`` returns them); with TTA the mean probabilities
            (``average="probs"``) or mean logits of the views.
        """
        if not self.aug_enabled:
            logits = self.single_view(fn, image)
            if tuple(logits.shape[-2:]) == tuple(output_size):
                return logits
            return F.interpolate(logits, size=output_size, mode="bilinear", align_corners=False)
        h0, w0 = original_size if original_size is not None else image.shape[-2:]
        kwargs = {} if to_probs is None else {"to_probs": to_probs}
        return multi_scale_flip_inference(
            lambda x: self.single_view(fn, x),
            image,
            sizes=tta_sizes(h0, w0, self.aug_min_sizes, self.aug_max_size),
            flip=self.aug_flip,
            output_size=output_size,
            average=self.average,
            **kwargs,
        )

    def __repr__(self) -> str:
        s = f"SemSegTestTime(mode={self.mode!r}"
        if self.mode == "slide":
            s += f", crop_size={self.crop_size}, stride={self.stride}"
        else:
            s += f", size_divisibility={self.size_divisibility}"
        if self.aug_enabled:
            s += (
                f", aug_min_sizes={self.aug_min_sizes}, aug_max_size={self.aug_max_size}, "
                f"aug_flip={self.aug_flip}, average={self.average!r}"
            )
        return s + ")"
