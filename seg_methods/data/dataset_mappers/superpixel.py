"""Dataset mapper of superpixel segmentation (``cfg.INPUT.DATASET_MAPPER_NAME = "superpixel"``).

Training (ClustSeg Sec. 4.4: random horizontal and vertical flips, scale jitter, crop): resize the
shortest edge to one of ``MIN_SIZE_TRAIN``, random crop when ``INPUT.CROP.ENABLED``, horizontal
flip (``INPUT.RANDOM_FLIP``) and vertical flip (probability 0.5), pad to
``INPUT.SIZE_DIVISIBILITY``. The output has "image" (3, H, W) uint8 and "regions" (H, W) int64:
the ground-truth segment ids (one annotator drawn at random for BSDS500), -1 on padding.

Test: the test-time resize only; the evaluator reads the ground truth at full resolution.
"""

from typing import Dict, List

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

from ..build import DATASET_MAPPER_REGISTRY
from ..datasets.superpixel import read_regions
from .base import IMAGE_PAD_VALUE, _pad_bottom_right, inference_policy, read_image_checked

REGION_PAD_ID = -1


class SuperpixelDatasetMapper:
    """Dataset dict with ``regions_file_name`` -> {"image", "regions"} (see module docstring)."""

    @configurable
    def __init__(
        self,
        is_train: bool = True,
        *,
        augmentations: List,
        image_format: str,
        size_divisibility: int = -1,
    ):
        """
        Args:
            is_train (bool): training (targets, augmentation) or test mode.
            augmentations (list): detectron2 augmentations.
            image_format (str): ``cfg.INPUT.FORMAT``.
            size_divisibility (int): pad training images to a multiple of this (<= 0: none).
        """
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.size_divisibility = size_divisibility

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        if not is_train:
            return {
                "is_train": False,
                "augmentations": inference_policy(cfg),
                "image_format": cfg.INPUT.FORMAT,
            }
        augs: List = [
            T.ResizeShortestEdge(
                cfg.INPUT.MIN_SIZE_TRAIN,
                cfg.INPUT.MAX_SIZE_TRAIN,
                cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING,
            )
        ]
        if cfg.INPUT.CROP.ENABLED:
            augs.append(T.RandomCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE))
        if cfg.INPUT.RANDOM_FLIP != "none":
            augs.append(T.RandomFlip(horizontal=True, vertical=False))
            augs.append(T.RandomFlip(horizontal=False, vertical=True))
        return {
            "is_train": True,
            "augmentations": augs,
            "image_format": cfg.INPUT.FORMAT,
            "size_divisibility": cfg.INPUT.SIZE_DIVISIBILITY,
        }

    def __call__(self, dataset_dict: Dict) -> Dict:
        record = dict(dataset_dict)
        image = read_image_checked(record["file_name"], self.image_format)
        utils.check_image_size(record, image)
        regions = None
        if self.is_train:
            maps = read_regions(record["regions_file_name"])
            regions = maps[np.random.randint(len(maps))] if len(maps) > 1 else maps[0]
            if regions.shape != image.shape[:2]:
                raise utils.SizeMismatchError(
                    f"regions map '{record['regions_file_name']}' is {regions.shape}, image "
                    f"'{record['file_name']}' is {image.shape[:2]}"
                )
            regions = regions.astype(np.float64)  # exact ids through detectron2's resize
        aug_input = T.AugInput(image, sem_seg=regions)
        self.augmentations(aug_input)
        image = aug_input.image
        image_t = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if not self.is_train:
            record["image"] = image_t
            return record
        h, w = image.shape[:2]
        d = self.size_divisibility
        size = (-(-h // d) * d, -(-w // d) * d) if d > 0 else (h, w)
        record["image"] = _pad_bottom_right(image_t, size, IMAGE_PAD_VALUE)
        regions_t = torch.from_numpy(np.array(aug_input.sem_seg, dtype=np.int64))
        record["regions"] = _pad_bottom_right(regions_t, size, REGION_PAD_ID)
        return record


@DATASET_MAPPER_REGISTRY.register()
def superpixel(cfg, is_train: bool = True) -> SuperpixelDatasetMapper:
    """Image + ground-truth region ids (superpixel segmentation)."""
    return SuperpixelDatasetMapper(cfg, is_train)
