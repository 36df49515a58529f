"""Valid numbers of superpixels (ClustSeg Sec. 4.4: 50 to 2500), checked in one place.

Used by the ClustSeg meta-architecture (the count of each call, and the config at build time) and
by its dreamy-start (the seeds it samples). Both import it from here, so neither imports the
other's private helpers.
"""

from typing import List, Optional, Sequence

__all__ = [
    "MIN_SUPERPIXELS",
    "MAX_SUPERPIXELS",
    "check_num_superpixels",
    "check_superpixel_range",
]

MIN_SUPERPIXELS, MAX_SUPERPIXELS = 50, 2500  # ClustSeg Sec. 4.4


def check_num_superpixels(num: int, num_pixels: Optional[int] = None, key: str = "") -> None:
    """Raise ``ValueError`` for a superpixel count outside [50, 2500] or above the pixel count.

    Args:
        num (int): requested number of superpixels (clusters).
        num_pixels (int or None): pixels of the map the clusters are assigned on (stride-4
            features); None skips that check (at build time the image size is unknown).
        key (str): where the number comes from (a config key), named in the error.
    """
    where = f"{key}: " if key else ""
    if not isinstance(num, int) or isinstance(num, bool):
        raise ValueError(f"{where}number of superpixels must be an int, got {num!r}")
    if not MIN_SUPERPIXELS <= num <= MAX_SUPERPIXELS:
        raise ValueError(
            f"{where}number of superpixels must be in [{MIN_SUPERPIXELS}, {MAX_SUPERPIXELS}] "
            f"(ClustSeg Sec. 4.4), got {num}"
        )
    if num_pixels is not None and num > num_pixels:
        raise ValueError(
            f"{where}{num} superpixels requested but the stride-4 feature map has only "
            f"{num_pixels} pixels: more clusters than pixels. Use a larger image or fewer "
            "superpixels."
        )


def check_superpixel_range(train_range: Sequence[int], key: str) -> List[int]:
    """Validate a ``[min, max]`` range of superpixel counts drawn per training batch.

    Both ends must be valid counts (:func:`check_num_superpixels`) and ``min <= max``. Checking
    this when the model is built means a bad range fails at once, not at the random training
    iteration that first draws a bad count.

    Args:
        train_range (sequence[int]): ``[min, max]``.
        key (str): the config key it comes from, named in the error.

    Returns:
        list[int]: ``[min, max]``.
    """
    values = list(train_range)
    if len(values) != 2:
        raise ValueError(f"{key} must be [min, max], got {values}")
    for v in values:
        check_num_superpixels(v, key=key)
    if values[0] > values[1]:
        raise ValueError(f"{key} must be [min, max] with min <= max, got {values}")
    return values
