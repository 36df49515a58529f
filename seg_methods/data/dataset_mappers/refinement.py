"""Dataset mapper of mask refinement (``cfg.INPUT.DATASET_MAPPER_NAME = "refinement"``; CRM).

Records: ``file_name`` (image), ``mask_file_name`` (binary ground-truth PNG of ONE object,
0 / 255 or 0 / 1), and at test time a coarse mask: ``coarse_mask_file_name`` (PNG 0..255; a 0 / 1
PNG is read as 0 / 1) or ``coarse_mask`` given in the record ((H, W) array or tensor, float in
[0, 1] or uint8 0..255). BIG and ``synthetic_highres_*`` have this format.

Training (low resolution, as CRM's and CascadePSP's online training set):

1. if ``INPUT.REFINEMENT.MAX_SIZE_TRAIN`` > 0, images with a longer side above it are shrunk;
2. a random ``CROP_SIZE`` x ``CROP_SIZE`` crop (224), the same for image and mask, then
   ``INPUT.RANDOM_FLIP``, then (``COLOR_JITTER``) brightness x U(0.8, 1.2), contrast
   x U(0.95, 1.05), saturation x U(0.95, 1.05) and greyscale with probability 0.1, as the
   official ``ColorJitter(0.2, 0.05, 0.05, 0)`` + ``RandomGrayscale()``; images smaller than the
   crop are padded at the bottom/right (image 0, masks 0);
3. the coarse mask is made online by the ``coarse_mask`` target generator
   (``seg_methods/data/target_generators/coarse_mask.py``) from the cropped ground truth.

Training records without ``mask_file_name`` (the embedded semantic / panoptic / instance
datasets, COCO, ...) go through the ``mask_former_*`` pipeline instead (``INPUT.MIN_SIZE_TRAIN``,
``INPUT.CROP``, ...) with the ``coarse_mask`` generator, which draws one segment of the image as
the object; so one mapper name serves training on those and testing on BIG / the
high-resolution split.

The official online set degrades the ground truth differently: it deletes and jitters boundary
polygon vertices, then applies up to 250 rounds of random dilations / erosions in random boxes
until the IoU falls below a target drawn from U(0.8, 1.0) (CascadePSP ``util/de_transform.py``,
``util/boundary_modification.py``). The generator here dilates or erodes the whole mask once,
then shrinks and re-enlarges it (a low-resolution segmenter's loss of detail); its parameters are
the generator's.

Output (training): "image" (3, S, S) uint8 in ``INPUT.FORMAT``, "gt_mask" (S, S) bool,
"coarse_mask" (S, S) float32 in [0, 1], plus the record's keys. Test: the image at FULL
resolution (no resize; the model refines at the original size), "coarse_mask" (H, W) float32,
"gt_mask" (H, W) bool when the record has ``mask_file_name``. A coarse mask or ground truth
whose size differs from its image raises ``ValueError`` (detectron2's ``SizeMismatchError``)
naming both files and sizes.

Shape shorthand:
    S: CROP_SIZE; H, W: image size.
"""

import copy
import logging
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from PIL import Image

from ..build import DATASET_MAPPER_REGISTRY, build_target_generator
from ..target_generators import TargetGenerator, TargetLabels
from .base import SegDatasetMapper, _pad_bottom_right, read_image_checked

__all__ = ["RefinementDatasetMapper", "read_coarse_mask", "read_gt_mask", "refinement"]

logger = logging.getLogger(__name__)


def _read_grey(path: str, what: str) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("L"))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{what} file not found: '{path}'") from e
    except (OSError, ValueError, SyntaxError) as e:
        raise ValueError(f"cannot decode {what} file '{path}': {e}") from e


def read_gt_mask(path: str) -> np.ndarray:
    """Binary ground truth: 0 / 255 PNGs as ``> 128`` (the official test), 0 / 1 PNGs as ``> 0``.

    Returns:
        np.ndarray: (H, W) uint8 in {0, 1}.
    """
    grey = _read_grey(path, "ground-truth mask")
    return (grey > (0 if grey.max() <= 1 else 128)).astype(np.uint8)


def read_coarse_mask(path: str) -> np.ndarray:
    """Coarse mask PNG 0..255 (0 / 1 PNGs are read as 0 / 1) -> (H, W) float32 in [0, 1]."""
    grey = _read_grey(path, "coarse mask")
    return grey.astype(np.float32) / (1.0 if grey.max() <= 1 else 255.0)


def _coarse_from_record(value) -> np.ndarray:
    arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    return np.clip(arr.astype(np.float32), 0.0, 1.0)


def _size_error(what: str, path: str, shape, image_file: str, image_shape) -> ValueError:
    return utils.SizeMismatchError(
        f"{what} '{path}' is {shape[1]}x{shape[0]} (WxH) but its image '{image_file}' is "
        f"{image_shape[1]}x{image_shape[0]}; they must have the same size."
    )


class RefinementDatasetMapper:
    """Record -> model input of a mask-refinement model (see the module docstring)."""

    @configurable
    def __init__(
        self,
        is_train: bool = True,
        *,
        image_format: str,
        crop_size: int = 224,
        max_size_train: int = 0,
        color_jitter: bool = True,
        random_flip: str = "horizontal",
        coarse_generator: Optional[TargetGenerator] = None,
        segment_mapper: Optional[Callable[[Dict], Dict]] = None,
    ):
        """
        Args:
            is_train (bool): training (crops, online coarse masks) or test (full resolution,
                stored coarse masks).
            image_format (str): ``cfg.INPUT.FORMAT``.
            crop_size (int): S, side of the training crops.
            max_size_train (int): shrink training images whose longer side exceeds this
                (0: never).
            color_jitter (bool): the official colour jitter + random greyscale.
            random_flip (str): "horizontal", "vertical" or "none".
            coarse_generator (TargetGenerator or None): makes "gt_mask"/"coarse_mask" from the
                augmented ground truth; required for training.
            segment_mapper (callable or None): maps training records WITHOUT
                ``mask_file_name`` (semantic / panoptic / instance datasets: one random segment
                is the object); None makes such records an error.
        """
        if is_train and coarse_generator is None:
            raise ValueError("a training refinement mapper needs a coarse_generator")
        if crop_size < 1:
            raise ValueError(f"INPUT.REFINEMENT.CROP_SIZE must be >= 1, got {crop_size}")
        self.is_train = is_train
        self.image_format = image_format
        self.crop_size = int(crop_size)
        self.max_size_train = int(max_size_train)
        self.coarse_generator = coarse_generator
        self.segment_mapper = segment_mapper
        augs: List = [T.RandomCrop("absolute", (self.crop_size, self.crop_size))]
        if random_flip != "none":
            augs.append(
                T.RandomFlip(
                    horizontal=random_flip == "horizontal", vertical=random_flip == "vertical"
                )
            )
        if color_jitter:
            augs += [
                T.RandomBrightness(0.8, 1.2),
                T.RandomContrast(0.95, 1.05),
                T.RandomSaturation(0.95, 1.05),
                T.RandomApply(T.RandomSaturation(0.0, 0.0), prob=0.1),  # greyscale
            ]
        self.augmentations = augs
        if is_train:
            logger.info(f"[RefinementDatasetMapper] training augmentations: {augs}")

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        segment_mapper = None
        if is_train:
            # the mask_former_* pipeline with the coarse_mask generator (once, even when
            # INPUT.EXTRA_TARGETS, which SegDatasetMapper appends, names it too)
            extra = [n.rstrip("?") for n in cfg.INPUT.EXTRA_TARGETS]
            targets = () if "coarse_mask" in extra else ("coarse_mask",)
            segment_mapper = SegDatasetMapper(cfg, True, targets=targets, policy="shortest_edge")
        return {
            "is_train": is_train,
            "image_format": cfg.INPUT.FORMAT,
            "crop_size": cfg.INPUT.REFINEMENT.CROP_SIZE,
            "max_size_train": cfg.INPUT.REFINEMENT.MAX_SIZE_TRAIN,
            "color_jitter": cfg.INPUT.REFINEMENT.COLOR_JITTER,
            "random_flip": cfg.INPUT.RANDOM_FLIP,
            "coarse_generator": build_target_generator("coarse_mask", cfg) if is_train else None,
            "segment_mapper": segment_mapper,
        }

    # ------------------------------------------------------------------ reading
    @staticmethod
    def _gt(record: Dict, image: np.ndarray, required: bool) -> Optional[np.ndarray]:
        path = record.get("mask_file_name")
        if path is None:
            if required:
                raise KeyError(
                    f"record of image '{record['file_name']}' has no 'mask_file_name' (binary "
                    "ground-truth PNG); the refinement mapper needs it for training."
                )
            return None
        gt = read_gt_mask(path)
        if gt.shape != image.shape[:2]:
            raise _size_error("ground-truth mask", path, gt.shape, record["file_name"], image.shape)
        return gt

    @staticmethod
    def _coarse(record: Dict, image: np.ndarray) -> np.ndarray:
        if record.get("coarse_mask") is not None:
            coarse, path = _coarse_from_record(record["coarse_mask"]), "coarse_mask of the record"
        elif "coarse_mask_file_name" in record:
            path = record["coarse_mask_file_name"]
            coarse = read_coarse_mask(path)
        else:
            raise KeyError(
                f"record of image '{record['file_name']}' has no 'coarse_mask_file_name' (or "
                "'coarse_mask'): refinement at test time needs the coarse mask to refine."
            )
        if coarse.shape != image.shape[:2]:
            raise _size_error("coarse mask", path, coarse.shape, record["file_name"], image.shape)
        return coarse

    # ------------------------------------------------------------------ main
    def __call__(self, dataset_dict: Dict) -> Dict:
        """
        Args:
            dataset_dict (dict): one record (see the module docstring).

        Returns:
            dict: the model input described in the module docstring.
        """
        if self.is_train and "mask_file_name" not in dataset_dict and self.segment_mapper:
            return self.segment_mapper(dataset_dict)  # a semantic / panoptic / instance record
        record = copy.deepcopy(dataset_dict)
        file_name = record["file_name"]
        image = read_image_checked(file_name, self.image_format)
        utils.check_image_size(record, image)
        if not self.is_train:
            coarse = self._coarse(record, image)
            gt = self._gt(record, image, required=False)
            record["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
            record["coarse_mask"] = torch.from_numpy(np.ascontiguousarray(coarse))  # (H, W)
            if gt is not None:
                record["gt_mask"] = torch.from_numpy(gt.astype(bool))  # (H, W)
            return record

        gt = self._gt(record, image, required=True)
        augs = list(self.augmentations)
        h, w = image.shape[:2]
        if self.max_size_train > 0 and max(h, w) > self.max_size_train:
            scale = self.max_size_train / max(h, w)
            augs.insert(0, T.Resize((max(1, round(h * scale)), max(1, round(w * scale)))))
        aug_input = T.AugInput(image, sem_seg=gt)
        T.AugmentationList(augs)(aug_input)
        image, gt = aug_input.image, aug_input.sem_seg
        h, w = image.shape[:2]
        size = (self.crop_size, self.crop_size)
        image_t = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        gt_t = torch.from_numpy(np.array(gt, dtype=bool))
        labels = TargetLabels(
            image_size=size,
            valid_size=(h, w),
            instance_masks=[_pad_bottom_right(gt_t, size, False)],  # (S, S)
            instance_classes=[0],
            sources={"image": file_name, "annotations": record["mask_file_name"]},
        )
        record["image"] = _pad_bottom_right(image_t, size, 0)  # (3, S, S)
        record.update(self.coarse_generator(labels))  # "gt_mask", "coarse_mask" (S, S)
        return record


@DATASET_MAPPER_REGISTRY.register()
def refinement(cfg, is_train: bool = True) -> RefinementDatasetMapper:
    """Image + one object's ground truth + coarse mask (online in training, stored at test)."""
    return RefinementDatasetMapper(cfg, is_train)
