"""The one dataset mapper behind every registered mask-classification mapper.

:class:`SegDatasetMapper` reads an image and whatever labels the record has (semantic PNG,
panoptic PNG + ``segments_info``, or COCO polygon/RLE ``annotations``), applies one
augmentation list to all of them, pads, and hands the augmented labels to a per-format target
builder (:mod:`.targets`). The registered mappers (``mask_former_*``, ``coco_*_lsj``) differ only
in their augmentation policy and target format.

Reading is strict: a missing or undecodable file, or a label PNG whose size differs from its
image, raises an error naming the files; nothing is skipped silently. Grayscale, palette and RGBA
images are converted to ``cfg.INPUT.FORMAT`` (3 channels; alpha is dropped).

Shape shorthand:
    H, W: image size after augmentation and padding; N: number of target segments.
"""

import copy
import logging
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import pycocotools.mask as mask_util
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.projects.point_rend import ColorAugSSDTransform

from ..datasets.panoptic_utils import rgb_to_ids
from .targets import instance_targets, panoptic_targets, semantic_from_panoptic, semantic_targets

logger = logging.getLogger(__name__)

# Image padding value (grey in 0-255), as Mask2Former's mappers use.
IMAGE_PAD_VALUE = 128
# Padding value of panoptic segment ids: never a segment id, so padding produces no target.
PAN_PAD_ID = -1


# ----------------------------------------------------------------------------- reading
def read_image_checked(file_name: str, image_format: Optional[str], what: str = "image"):
    """``detectron2.data.detection_utils.read_image`` with errors that name the file.

    Args:
        file_name (str): path of the file.
        image_format (str or None): PIL mode or "BGR"; None keeps the stored mode (labels).
        what (str): kind of file, for the error message.

    Returns:
        np.ndarray: (H, W, C) for colour formats, (H, W) for single-channel labels.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file exists but cannot be decoded.
    """
    try:
        return utils.read_image(file_name, format=image_format)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{what} file not found: '{file_name}'") from e
    except (OSError, ValueError, SyntaxError) as e:
        # PIL raises UnidentifiedImageError (an OSError) for unknown data, OSError for
        # truncated files and ValueError/SyntaxError for some malformed headers.
        raise ValueError(f"cannot decode {what} file '{file_name}': {e}") from e


def _check_same_size(label: np.ndarray, label_file: str, image: np.ndarray, image_file: str, what):
    if label.shape[:2] != image.shape[:2]:
        raise utils.SizeMismatchError(
            f"{what} '{label_file}' is {label.shape[1]}x{label.shape[0]} (WxH) but its image "
            f"'{image_file}' is {image.shape[1]}x{image.shape[0]}; they must have the same size."
        )


def _rasterize_annotation(segm, height: int, width: int, file_name: str) -> np.ndarray:
    """COCO polygon list or RLE (compressed or not) -> (H, W) uint8 mask."""
    if isinstance(segm, list):
        polygons = [np.asarray(p, dtype=np.float64) for p in segm if len(p) >= 6]
        if not polygons:
            return np.zeros((height, width), dtype=np.uint8)
        return utils.polygons_to_bitmask(polygons, height, width).astype(np.uint8)
    if isinstance(segm, dict):
        if tuple(segm["size"]) != (height, width):
            raise utils.SizeMismatchError(
                f"RLE mask of image '{file_name}' has size {segm['size']} (HxW) but the image "
                f"is {height}x{width}."
            )
        if isinstance(segm["counts"], list):  # uncompressed RLE
            segm = mask_util.frPyObjects(segm, height, width)
        return mask_util.decode(segm).astype(np.uint8)
    if isinstance(segm, np.ndarray):
        if segm.shape != (height, width):
            raise utils.SizeMismatchError(
                f"mask of image '{file_name}' has shape {segm.shape} but the image is "
                f"{height}x{width}."
            )
        return segm.astype(np.uint8)
    raise ValueError(f"unsupported segmentation of type {type(segm)} in image '{file_name}'")


def _pad_bottom_right(t: torch.Tensor, size: Tuple[int, int], value) -> torch.Tensor:
    """Pad the last two dims of ``t`` to ``size`` = (H, W) at the bottom/right."""
    pad_h, pad_w = size[0] - t.shape[-2], size[1] - t.shape[-1]
    if pad_h == 0 and pad_w == 0:
        return t
    return F.pad(t, (0, pad_w, 0, pad_h), value=value).contiguous()


# ------------------------------------------------------------------ augmentation policies
def _flip(cfg) -> List[T.Augmentation]:
    if cfg.INPUT.RANDOM_FLIP == "none":
        return []
    return [
        T.RandomFlip(
            horizontal=cfg.INPUT.RANDOM_FLIP == "horizontal",
            vertical=cfg.INPUT.RANDOM_FLIP == "vertical",
        )
    ]


def shortest_edge_policy(cfg, target: str, ignore_label: int) -> Tuple[List, None]:
    """Mask2Former's training augmentation: resize the shortest edge, random crop (with the
    single-category area constraint when a semantic map exists), optional SSD colour jitter,
    flip.

    Returns:
        tuple: (augmentations, None): no fixed output size (SIZE_DIVISIBILITY padding applies).
    """
    augs: List = [
        T.ResizeShortestEdge(
            cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING
        )
    ]
    if cfg.INPUT.CROP.ENABLED:
        if target == "instance":  # no semantic map to constrain the crop with
            augs.append(T.RandomCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE))
        else:
            augs.append(
                T.RandomCrop_CategoryAreaConstraint(
                    cfg.INPUT.CROP.TYPE,
                    cfg.INPUT.CROP.SIZE,
                    cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA,
                    ignore_label,
                )
            )
    if cfg.INPUT.COLOR_AUG_SSD:
        augs.append(ColorAugSSDTransform(img_format=cfg.INPUT.FORMAT))
    return augs + _flip(cfg), None


def lsj_policy(cfg, target: str, ignore_label: int) -> Tuple[List, Tuple[int, int]]:
    """Large-scale jitter (COCO "new baselines"): flip, resize the IMAGE_SIZE square by a random
    scale in [MIN_SCALE, MAX_SCALE], crop to at most IMAGE_SIZE.

    Returns:
        tuple: (augmentations, (IMAGE_SIZE, IMAGE_SIZE)): the mapper pads to that fixed size,
        each label with its own pad value.
    """
    size = cfg.INPUT.IMAGE_SIZE
    augs = _flip(cfg) + [
        T.ResizeScale(
            min_scale=cfg.INPUT.MIN_SCALE,
            max_scale=cfg.INPUT.MAX_SCALE,
            target_height=size,
            target_width=size,
        ),
        T.FixedSizeCrop(crop_size=(size, size), pad=False),
    ]
    return augs, (size, size)


def inference_policy(cfg) -> List:
    """detectron2's test-time resize (``ResizeShortestEdge`` with MIN_SIZE_TEST)."""
    return [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, "choice")]


# policy name -> (cfg, target, ignore_label) -> (training augmentations, fixed size or None).
AUGMENTATION_POLICIES: Dict[str, Callable] = {
    "shortest_edge": shortest_edge_policy,
    "lsj": lsj_policy,
}
TARGET_FORMATS = ("semantic", "panoptic", "instance")


# ----------------------------------------------------------------------------- mapper
class SegDatasetMapper:
    """Dataset dict -> model input dict for mask-classification models.

    Training output (Mask2Former's format):

    * "image": (3, H, W) uint8 tensor in ``image_format``;
    * "height", "width": original image size; "file_name", "image_id" and the other record keys
      are passed through;
    * "sem_seg": (H, W) int64 when the record has a semantic PNG (or, for panoptic records,
      derived from the panoptic PNG); padding is ``ignore_label``;
    * "instances": ``Instances`` with gt_classes (N,), gt_masks (N, H, W) bool, gt_boxes.

    Test output: "image" resized by the test policy plus the record's keys (no targets).
    """

    @configurable
    def __init__(
        self,
        is_train: bool = True,
        *,
        augmentations: List,
        image_format: str,
        target: str,
        ignore_label: int = 255,
        num_classes: Optional[int] = None,
        size_divisibility: int = -1,
        fixed_size: Optional[Tuple[int, int]] = None,
    ):
        """
        Args:
            is_train (bool): build targets (training) or only the image (test).
            augmentations (list): detectron2 augmentations/transforms applied to every input.
            image_format (str): "RGB", "BGR", ... (``cfg.INPUT.FORMAT``).
            target (str): "semantic", "panoptic" or "instance": which labels become targets.
            ignore_label (int): void label of semantic maps; also their padding value.
            num_classes (int or None): number of classes the labels index; labels outside
                [0, num_classes) raise. None disables the check.
            size_divisibility (int): pad the augmented image so both sides are divisible by
                this (training only; <= 0 disables).
            fixed_size (tuple[int, int] or None): pad to exactly this (H, W) (LSJ). Takes
                precedence over ``size_divisibility``.
        """
        if target not in TARGET_FORMATS:
            raise ValueError(f"target must be one of {TARGET_FORMATS}, got '{target}'")
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.target = target
        self.ignore_label = ignore_label
        self.num_classes = num_classes
        self.size_divisibility = size_divisibility
        self.fixed_size = tuple(fixed_size) if fixed_size is not None else None
        mode = "training" if is_train else "inference"
        logger.info(f"[SegDatasetMapper] {target} targets, {mode} augmentations: {augmentations}")

    @classmethod
    def from_config(cls, cfg, is_train: bool = True, *, target: str, policy: str):
        """Build from config.

        Args:
            target (str): see ``__init__``.
            policy (str): key of :data:`AUGMENTATION_POLICIES` used for training.
        """
        meta = MetadataCatalog.get(cfg.DATASETS.TRAIN[0]) if len(cfg.DATASETS.TRAIN) else None
        ignore_label = cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE
        num_classes = None
        if meta is not None:
            ignore_label = meta.get("ignore_label", ignore_label)
            names = meta.get("thing_classes" if target == "instance" else "stuff_classes", None)
            num_classes = len(names) if names else None
        if not is_train:
            augs, size_div, fixed = inference_policy(cfg), -1, None
        else:
            if policy not in AUGMENTATION_POLICIES:
                raise KeyError(f"unknown augmentation policy '{policy}'")
            augs, fixed = AUGMENTATION_POLICIES[policy](cfg, target, ignore_label)
            size_div = cfg.INPUT.SIZE_DIVISIBILITY
        return {
            "is_train": is_train,
            "augmentations": augs,
            "image_format": cfg.INPUT.FORMAT,
            "target": target,
            "ignore_label": ignore_label,
            "num_classes": num_classes,
            "size_divisibility": size_div,
            "fixed_size": fixed,
        }

    # ------------------------------------------------------------------ helpers
    def _read_sem_seg(self, record: Dict, image: np.ndarray) -> Optional[np.ndarray]:
        path = record.get("sem_seg_file_name")
        if path is None:
            return None
        sem = read_image_checked(path, None, what="semantic label PNG")
        if sem.ndim != 2:
            raise ValueError(
                f"semantic label PNG '{path}' has {sem.shape[2]} channels; it must be a "
                "single-channel (grayscale or palette) image of class ids."
            )
        _check_same_size(sem, path, image, record["file_name"], "semantic label PNG")
        # uint8 maps take PIL's fast path in detectron2 transforms; wider ints are carried as
        # float64 (exact) because torch's nearest interpolation does not take int32.
        return sem if sem.dtype == np.uint8 else sem.astype(np.float64)

    def _read_pan_seg(self, record: Dict, image: np.ndarray) -> np.ndarray:
        path = record.get("pan_seg_file_name")
        if path is None or "segments_info" not in record:
            raise KeyError(
                f"record of image '{record['file_name']}' has no 'pan_seg_file_name' and "
                "'segments_info'; the panoptic mappers need panoptic records."
            )
        pan_rgb = read_image_checked(path, "RGB", what="panoptic PNG")
        _check_same_size(pan_rgb, path, image, record["file_name"], "panoptic PNG")
        return pan_rgb

    def _read_instance_masks(self, record: Dict, image: np.ndarray):
        annos = [a for a in record.get("annotations", []) if a.get("iscrowd", 0) == 0]
        h, w = image.shape[:2]
        masks = [_rasterize_annotation(a["segmentation"], h, w, record["file_name"]) for a in annos]
        return masks, [int(a["category_id"]) for a in annos]

    def _pad_size(self, h: int, w: int) -> Tuple[int, int]:
        if self.fixed_size is not None:
            return max(h, self.fixed_size[0]), max(w, self.fixed_size[1])
        d = self.size_divisibility
        if d > 0:
            return -(-h // d) * d, -(-w // d) * d
        return h, w

    # ------------------------------------------------------------------ main
    def __call__(self, dataset_dict: Dict) -> Dict:
        """
        Args:
            dataset_dict (dict): one record in detectron2's dataset format.

        Returns:
            dict: the model input described in the class docstring.
        """
        record = copy.deepcopy(dataset_dict)
        file_name = record["file_name"]
        image = read_image_checked(file_name, self.image_format)
        utils.check_image_size(record, image)

        if not self.is_train:
            aug_input = T.AugInput(image)
            self.augmentations(aug_input)
            image = aug_input.image
            record["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
            record.pop("annotations", None)
            return record

        sem = self._read_sem_seg(record, image)
        pan_rgb = None
        inst_masks, inst_classes = [], []
        if self.target == "panoptic":
            pan_rgb = self._read_pan_seg(record, image)
            if sem is None:  # needed by the category-area crop and useful as "sem_seg"
                sem = semantic_from_panoptic(
                    rgb_to_ids(pan_rgb), record["segments_info"], self.ignore_label
                )
        elif self.target == "instance":
            inst_masks, inst_classes = self._read_instance_masks(record, image)
        elif sem is None:
            raise KeyError(
                f"record of image '{file_name}' has no 'sem_seg_file_name'; the semantic "
                "mapper needs semantic label PNGs."
            )

        aug_input = T.AugInput(image, sem_seg=sem)
        transforms = self.augmentations(aug_input)
        image, sem = aug_input.image, aug_input.sem_seg
        if pan_rgb is not None:
            pan_rgb = transforms.apply_segmentation(pan_rgb)
        inst_masks = [transforms.apply_segmentation(m) for m in inst_masks]

        h, w = image.shape[:2]
        size = self._pad_size(h, w)
        image_t = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        record["image"] = _pad_bottom_right(image_t, size, IMAGE_PAD_VALUE)  # (3, H, W)

        sem_t = None
        if sem is not None:
            sem_t = torch.from_numpy(
                np.array(sem, dtype=np.int64)
            )  # copy: PIL arrays are read-only
            sem_t = _pad_bottom_right(sem_t, size, self.ignore_label)  # (H, W)
            record["sem_seg"] = sem_t

        if self.target == "semantic":
            record["instances"] = semantic_targets(
                sem_t,
                ignore_label=self.ignore_label,
                num_classes=self.num_classes,
                source=record.get("sem_seg_file_name", ""),
            )
        elif self.target == "panoptic":
            pan_t = torch.from_numpy(np.array(rgb_to_ids(pan_rgb), dtype=np.int64))
            pan_t = _pad_bottom_right(pan_t, size, PAN_PAD_ID)  # (H, W)
            record["instances"] = panoptic_targets(
                pan_t,
                record["segments_info"],
                num_classes=self.num_classes,
                source=record["pan_seg_file_name"],
            )
        else:
            masks = [
                _pad_bottom_right(torch.from_numpy(np.array(m, dtype=bool)), size, False)
                for m in inst_masks
            ]
            record["instances"] = instance_targets(
                masks, inst_classes, size, num_classes=self.num_classes, source=file_name
            )
            record.pop("annotations", None)
        return record


__all__ = [
    "AUGMENTATION_POLICIES",
    "SegDatasetMapper",
    "lsj_policy",
    "read_image_checked",
    "inference_policy",
    "shortest_edge_policy",
]
