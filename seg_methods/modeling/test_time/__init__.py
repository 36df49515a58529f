"""Test-time strategies shared by every per-pixel semantic model.

Pure functions of a dense model function ``fn(images (B, 3, h, w)) -> logits (B, C, h, w)``:
whole-image and sliding-window inference (:mod:`.sliding_window`), multi-scale + flip averaging
(:mod:`.augmentation`), and the config-built combination of both (:class:`SemSegTestTime`).
"""

from .augmentation import AVERAGE_MODES, multi_scale_flip_inference, tta_sizes  # noqa: F401
from .sliding_window import (  # noqa: F401
    pad_to_divisible,
    slide_inference,
    sliding_windows,
    whole_inference,
)
from .strategy import MODES, SemSegTestTime  # noqa: F401
