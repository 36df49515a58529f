"""The one dataset mapper behind every registered mapper.

:class:`SegDatasetMapper` reads an image and the labels its target generators need (semantic
PNG, panoptic PNG + ``segments_info``, COCO polygon/RLE ``annotations``, superpixel regions),
applies one augmentation list to the image and every label map, pads, and hands the augmented
labels (:class:`~seg_methods.data.target_generators.TargetLabels`) to its target generators
(``seg_methods/data/target_generators``), merging the dicts they return into the model input.
The registered mappers (``mask_former_*``, ``coco_*_lsj``, ``superpixel``) differ only in their
augmentation policy and generators; ``cfg.INPUT.EXTRA_TARGETS`` adds generators to any of them.

Reading is strict: a missing or undecodable file, or a label PNG whose size differs from its
image, raises an error naming the files; nothing is skipped silently. Grayscale, palette and RGBA
images are converted to ``cfg.INPUT.FORMAT`` (3 channels; alpha is dropped).

Shape shorthand:
    H, W: image size after augmentation and padding; N: number of target segments.
"""

import copy
import logging
from typing import AbstractSet, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pycocotools.mask as mask_util
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.projects.point_rend import ColorAugSSDTransform

from ..build import build_target_generator
from ..datasets.panoptic_utils import rgb_to_ids
from ..datasets.superpixel import read_regions
from ..target_generators import (
    InstanceMaskTargets,
    PanopticMaskTargets,
    SemanticMaskTargets,
    SemanticSegTargets,
    TargetGenerator,
    TargetLabels,
)

logger = logging.getLogger(__name__)

# Image padding value (grey in 0-255), as Mask2Former's mappers use.
IMAGE_PAD_VALUE = 128
# Padding value of panoptic segment ids: never a segment id, so padding produces no target.
PAN_PAD_ID = -1
# Padding value of superpixel region ids.
REGION_PAD_ID = -1


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


def semantic_from_segments(
    pan_ids: np.ndarray, segments_info: List[Dict], ignore_label: int
) -> np.ndarray:
    """Semantic label map of a panoptic id map, computed before augmentation.

    Every segment (crowd included) gets its category id; pixels of unknown ids (void) get
    ``ignore_label``.

    Args:
        pan_ids (np.ndarray): (H, W) int segment ids.
        segments_info (list[dict]): records with "id" and contiguous "category_id".
        ignore_label (int): label for void pixels.

    Returns:
        np.ndarray: (H, W) label map, uint8 when every label fits, else float64 (exact for
        integers and supported by every detectron2 transform).
    """
    labels = [int(s["category_id"]) for s in segments_info] + [ignore_label]
    dtype = np.uint8 if 0 <= min(labels) and max(labels) <= 255 else np.float64
    sem = np.full(pan_ids.shape, ignore_label, dtype=dtype)
    for s in segments_info:
        sem[pan_ids == int(s["id"])] = int(s["category_id"])
    return sem


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


def shortest_edge_policy(
    cfg, label_kinds: AbstractSet[str], ignore_label: int
) -> Tuple[List, None]:
    """Mask2Former's training augmentation: resize the shortest edge, random crop (with the
    single-category area constraint when the generators need a semantic or panoptic map),
    optional SSD colour jitter, flip.

    Args:
        cfg (CfgNode): the config.
        label_kinds (set[str]): label kinds the mapper's generators require.
        ignore_label (int): void label of the semantic map (for the area constraint).

    Returns:
        tuple: (augmentations, None): no fixed output size (SIZE_DIVISIBILITY padding applies).
    """
    augs: List = [
        T.ResizeShortestEdge(
            cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING
        )
    ]
    if cfg.INPUT.CROP.ENABLED:
        if not {"sem_seg", "panoptic"} & set(label_kinds):  # no semantic map to constrain with
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


def lsj_policy(
    cfg, label_kinds: AbstractSet[str], ignore_label: int
) -> Tuple[List, Tuple[int, int]]:
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


def superpixel_policy(cfg, label_kinds: AbstractSet[str], ignore_label: int) -> Tuple[List, None]:
    """ClustSeg Sec. 4.4 (superpixels): resize the shortest edge, random crop when
    ``INPUT.CROP.ENABLED``, horizontal and vertical flips (probability 0.5 each) unless
    ``INPUT.RANDOM_FLIP`` is "none".

    Returns:
        tuple: (augmentations, None).
    """
    augs: List = [
        T.ResizeShortestEdge(
            cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING
        )
    ]
    if cfg.INPUT.CROP.ENABLED:
        augs.append(T.RandomCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE))
    if cfg.INPUT.RANDOM_FLIP != "none":
        augs.append(T.RandomFlip(horizontal=True, vertical=False))
        augs.append(T.RandomFlip(horizontal=False, vertical=True))
    return augs, None


def inference_policy(cfg) -> List:
    """detectron2's test-time resize (``ResizeShortestEdge`` with MIN_SIZE_TEST)."""
    return [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, "choice")]


# policy name -> (cfg, required label kinds, ignore_label) -> (augmentations, fixed size or None).
AUGMENTATION_POLICIES: Dict[str, Callable] = {
    "shortest_edge": shortest_edge_policy,
    "lsj": lsj_policy,
    "superpixel": superpixel_policy,
}

# Shorthands of the ``target`` argument (direct construction, e.g. in tests): the generators
# of the registered mask_former_<target> mappers as (class, registered name, optional). The
# registered mappers build the same generators through the registry (see mask_former.py).
TARGET_FORMATS: Dict[str, Tuple[Tuple[Callable[[], TargetGenerator], str, bool], ...]] = {
    "semantic": (
        (SemanticMaskTargets, "semantic_masks", False),
        (SemanticSegTargets, "sem_seg", False),
    ),
    "panoptic": (
        (PanopticMaskTargets, "panoptic_masks", False),
        (SemanticSegTargets, "sem_seg", False),
    ),
    "instance": (
        (InstanceMaskTargets, "instance_masks", False),
        (SemanticSegTargets, "sem_seg", True),
    ),
}


def _generators_of_format(target: str) -> List[TargetGenerator]:
    if target not in TARGET_FORMATS:
        raise ValueError(f"target must be one of {tuple(TARGET_FORMATS)}, got '{target}'")
    generators = []
    for make, name, optional in TARGET_FORMATS[target]:
        g = make()
        g.name, g.optional = name, optional
        generators.append(g)
    return generators


def required_label_kinds(generators: Sequence[TargetGenerator]) -> set:
    """Label kinds that every record must provide (``requires`` of non-optional generators)."""
    return {k for g in generators if not g.optional for k in g.requires}


# ----------------------------------------------------------------------------- mapper
class SegDatasetMapper:
    """Dataset dict -> model input dict, with targets made by target generators.

    Training output:

    * "image": (3, H, W) uint8 tensor in ``image_format``, padded with 128;
    * "height", "width": original image size; "file_name", "image_id" and the other record keys
      are passed through (COCO "annotations" are removed once read);
    * the keys written by the target generators, e.g. (Mask2Former's format) "sem_seg" (H, W)
      int64 and "instances" with gt_classes (N,), gt_masks (N, H, W) bool, gt_boxes.

    Test output: "image" resized by the test policy plus the record's keys (no targets).
    """

    @configurable
    def __init__(
        self,
        is_train: bool = True,
        *,
        augmentations: List,
        image_format: str,
        target_generators: Optional[Sequence[TargetGenerator]] = None,
        target: Optional[str] = None,
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
            target_generators (list[TargetGenerator] or None): generators called on the
                augmented labels, in order.
            target (str or None): shorthand instead of ``target_generators``: "semantic",
                "panoptic" or "instance", the generators of ``mask_former_<target>``.
            ignore_label (int): void label of semantic maps; also their padding value.
            num_classes (int or None): number of classes the labels index (handed to the
                generators, which raise for labels outside [0, num_classes)). None disables
                the check.
            size_divisibility (int): pad the augmented image so both sides are divisible by
                this (training only; <= 0 disables).
            fixed_size (tuple[int, int] or None): pad to exactly this (H, W) (LSJ). Takes
                precedence over ``size_divisibility``.
        """
        if (target is None) == (target_generators is None):
            raise ValueError("give exactly one of target_generators and target")
        if target is not None:
            target_generators = _generators_of_format(target)
        if not target_generators and is_train:
            raise ValueError("a training mapper needs at least one target generator")
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.target = target
        self.target_generators = list(target_generators)
        self.ignore_label = ignore_label
        self.num_classes = num_classes
        self.size_divisibility = size_divisibility
        self.fixed_size = tuple(fixed_size) if fixed_size is not None else None
        self._required = required_label_kinds(self.target_generators)
        self._wanted = {
            k for g in self.target_generators for k in tuple(g.requires) + tuple(g.uses)
        }
        if is_train:
            names = [g.name or type(g).__name__ for g in self.target_generators]
            logger.info(
                f"[SegDatasetMapper] target generators {names}, training augmentations: "
                f"{augmentations}"
            )
        else:
            logger.info(f"[SegDatasetMapper] inference augmentations: {augmentations}")

    @classmethod
    def from_config(
        cls,
        cfg,
        is_train: bool = True,
        *,
        targets: Sequence[str] = (),
        target: Optional[str] = None,
        policy: str,
    ):
        """Build from config.

        Args:
            targets (Sequence[str]): registered target-generator names (a trailing "?" makes
                one optional); ``cfg.INPUT.EXTRA_TARGETS`` is appended.
            target (str or None): alternative to ``targets`` (see ``__init__``); extra targets
                are then not added.
            policy (str): key of :data:`AUGMENTATION_POLICIES` used for training.
        """
        meta = MetadataCatalog.get(cfg.DATASETS.TRAIN[0]) if len(cfg.DATASETS.TRAIN) else None
        ignore_label = cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE
        generators = None
        if target is None:
            names = list(targets) + list(cfg.INPUT.EXTRA_TARGETS)
            generators = [build_target_generator(n, cfg) for n in names] if is_train else []
            kinds = required_label_kinds(generators)
        else:
            kinds = required_label_kinds(_generators_of_format(target))
        num_classes = None
        if meta is not None:
            ignore_label = meta.get("ignore_label", ignore_label)
            # COCO annotations index thing_classes; semantic/panoptic maps index stuff_classes
            # (every class, Mask2Former's convention).
            instance_only = "annotations" in kinds and not {"sem_seg", "panoptic"} & kinds
            names = meta.get("thing_classes" if instance_only else "stuff_classes", None)
            num_classes = len(names) if names else None
        if not is_train:
            augs, size_div, fixed = inference_policy(cfg), -1, None
        else:
            if policy not in AUGMENTATION_POLICIES:
                raise KeyError(f"unknown augmentation policy '{policy}'")
            augs, fixed = AUGMENTATION_POLICIES[policy](cfg, kinds, ignore_label)
            size_div = cfg.INPUT.SIZE_DIVISIBILITY
        return {
            "is_train": is_train,
            "augmentations": augs,
            "image_format": cfg.INPUT.FORMAT,
            "target_generators": generators,
            "target": target,
            "ignore_label": ignore_label,
            "num_classes": num_classes,
            "size_divisibility": size_div,
            "fixed_size": fixed,
        }

    # ------------------------------------------------------------------ reading
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
                f"'segments_info'; the target generators {self._needing('panoptic')} need "
                "panoptic records."
            )
        pan_rgb = read_image_checked(path, "RGB", what="panoptic PNG")
        _check_same_size(pan_rgb, path, image, record["file_name"], "panoptic PNG")
        return pan_rgb

    def _read_instance_masks(self, record: Dict, image: np.ndarray):
        annos = [a for a in record.get("annotations", []) if a.get("iscrowd", 0) == 0]
        h, w = image.shape[:2]
        masks = [_rasterize_annotation(a["segmentation"], h, w, record["file_name"]) for a in annos]
        return masks, [int(a["category_id"]) for a in annos]

    def _read_regions(self, record: Dict, image: np.ndarray) -> np.ndarray:
        path = record.get("regions_file_name")
        if path is None:
            raise KeyError(
                f"record of image '{record['file_name']}' has no 'regions_file_name'; the target "
                f"generators {self._needing('regions')} need superpixel ground truth."
            )
        maps = read_regions(path)
        regions = maps[np.random.randint(len(maps))] if len(maps) > 1 else maps[0]
        if regions.shape != image.shape[:2]:
            raise utils.SizeMismatchError(
                f"regions map '{path}' is {regions.shape}, image '{record['file_name']}' is "
                f"{image.shape[:2]}"
            )
        return regions.astype(np.float64)  # exact ids through detectron2's resize

    def _needing(self, kind: str) -> List[str]:
        return [g.name or type(g).__name__ for g in self.target_generators if kind in g.requires]

    def _kinds_to_read(self, record: Dict) -> set:
        """Required kinds, plus the wanted ones (``uses``, optional generators) the record has."""
        present = {
            "sem_seg": "sem_seg_file_name" in record,
            "panoptic": "pan_seg_file_name" in record and "segments_info" in record,
            "annotations": "annotations" in record,
            "regions": "regions_file_name" in record,
        }
        kinds = set(self._required) | {k for k in self._wanted if present.get(k, False)}
        if "panoptic" in kinds and "sem_seg" in self._wanted:
            kinds.add("sem_seg")  # derivable from the panoptic PNG
        return kinds

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

        # ---- read the labels the generators need (before any random draw of the augmentations)
        kinds = self._kinds_to_read(record)
        sources = {"image": file_name}
        sem = self._read_sem_seg(record, image) if "sem_seg" in kinds else None
        pan_rgb = regions = None
        inst_masks, inst_classes = [], []
        if sem is not None:
            sources["sem_seg"] = record["sem_seg_file_name"]
        if "panoptic" in kinds:
            pan_rgb = self._read_pan_seg(record, image)
            sources["panoptic"] = record["pan_seg_file_name"]
            if sem is None and "sem_seg" in kinds:  # for the category-area crop and "sem_seg"
                sem = semantic_from_segments(
                    rgb_to_ids(pan_rgb), record["segments_info"], self.ignore_label
                )
                sources["sem_seg"] = record["pan_seg_file_name"]
        if "annotations" in kinds:
            inst_masks, inst_classes = self._read_instance_masks(record, image)
        if "regions" in kinds:
            regions = self._read_regions(record, image)
            sources["regions"] = record["regions_file_name"]
        if sem is None and "sem_seg" in self._required:
            raise KeyError(
                f"record of image '{file_name}' has no 'sem_seg_file_name'; the target "
                f"generators {self._needing('sem_seg')} need semantic label PNGs (or panoptic "
                "labels to derive them from)."
            )

        # ---- one augmentation list for the image and every label map
        aug_input = T.AugInput(image, sem_seg=sem)
        transforms = self.augmentations(aug_input)
        image, sem = aug_input.image, aug_input.sem_seg
        if pan_rgb is not None:
            pan_rgb = transforms.apply_segmentation(pan_rgb)
        inst_masks = [transforms.apply_segmentation(m) for m in inst_masks]
        if regions is not None:
            regions = transforms.apply_segmentation(regions)

        # ---- pad
        h, w = image.shape[:2]
        size = self._pad_size(h, w)
        image_t = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        record["image"] = _pad_bottom_right(image_t, size, IMAGE_PAD_VALUE)  # (3, H, W)
        labels = TargetLabels(
            image_size=size,
            valid_size=(h, w),
            ignore_label=self.ignore_label,
            num_classes=self.num_classes,
            sources=sources,
        )
        if sem is not None:
            sem_t = torch.from_numpy(np.array(sem, dtype=np.int64))  # copy: PIL arrays are RO
            labels.sem_seg = _pad_bottom_right(sem_t, size, self.ignore_label)  # (H, W)
        if pan_rgb is not None:
            pan_t = torch.from_numpy(np.array(rgb_to_ids(pan_rgb), dtype=np.int64))
            labels.pan_ids = _pad_bottom_right(pan_t, size, PAN_PAD_ID)  # (H, W)
            labels.segments_info = record["segments_info"]
        if "annotations" in kinds:
            labels.instance_masks = [
                _pad_bottom_right(torch.from_numpy(np.array(m, dtype=bool)), size, False)
                for m in inst_masks
            ]  # N x (H, W)
            labels.instance_classes = inst_classes
            record.pop("annotations", None)
        if regions is not None:
            regions_t = torch.from_numpy(np.array(regions, dtype=np.int64))
            labels.regions = _pad_bottom_right(regions_t, size, REGION_PAD_ID)  # (H, W)

        # ---- targets
        written: Dict[str, str] = {}
        for g in self.target_generators:
            if g.optional and g.missing(labels):
                continue
            gname = g.name or type(g).__name__
            for key, value in g(labels).items():
                if key in written and not _same(record[key], value):
                    raise ValueError(
                        f"target generators '{written[key]}' and '{gname}' both write "
                        f"'{key}' with different values (image '{file_name}'); remove one of "
                        "them from the mapper / INPUT.EXTRA_TARGETS."
                    )
                record[key] = value
                written.setdefault(key, gname)
        return record


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and torch.equal(a, b)
    return a is b


__all__ = [
    "AUGMENTATION_POLICIES",
    "SegDatasetMapper",
    "inference_policy",
    "lsj_policy",
    "read_image_checked",
    "required_label_kinds",
    "semantic_from_segments",
    "shortest_edge_policy",
    "superpixel_policy",
]
