"""What a target generator receives (:class:`TargetLabels`) and is (:class:`TargetGenerator`).

The dataset mapper reads the labels a record has, applies one augmentation list to the image and
every label map, pads them, and hands them to its generators as one :class:`TargetLabels`. A
generator is a pure function of that object: it returns a dict of targets that the mapper merges
into the model input. A new kind of target is a new generator (a new file registered in
``TARGET_GENERATOR_REGISTRY``), not a mapper edit.

Label kinds (the values of ``TargetGenerator.requires`` / ``uses``):

==============  ==========================================  =====================================
kind            read from the record                        in :class:`TargetLabels`
==============  ==========================================  =====================================
``sem_seg``     ``sem_seg_file_name`` (class-id PNG), or    ``sem_seg`` (H, W) int64, void and
                derived from the panoptic PNG when the      padding = ``ignore_label``
                record has none and panoptic labels are
                read
``panoptic``    ``pan_seg_file_name`` + ``segments_info``   ``pan_ids`` (H, W) int64, padding -1,
                                                            ids not in ``segments_info`` = void;
                                                            ``segments_info``
``annotations`` COCO polygons/RLE in ``annotations``        ``instance_masks`` N x (H, W) bool,
                (crowd dropped; a record without the key    ``instance_classes`` N ints
                has no objects)
``regions``     ``regions_file_name`` (superpixel ground    ``regions`` (H, W) int64, padding -1
                truth; one annotator drawn at random)
==============  ==========================================  =====================================

Shape shorthand:
    H, W: padded image size; h, w: image size before padding; N: number of objects.
"""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import MetadataCatalog

LABEL_KINDS = ("sem_seg", "panoptic", "annotations", "regions")


@dataclass
class TargetLabels:
    """The augmented, padded labels of one training image (see the module docstring).

    Attributes:
        image_size (tuple[int, int]): (H, W) after padding; every map below has this size.
        valid_size (tuple[int, int]): (h, w) of the augmented image before padding; pixels at
            row >= h or column >= w are padding.
        ignore_label (int): void label of ``sem_seg`` (also its padding value).
        num_classes (int or None): number of classes the mapper's labels index (the
            ``stuff_classes`` of the training set, or its ``thing_classes`` when only COCO
            annotations are read); None disables class-range checks.
        sem_seg (Tensor or None): (H, W) int64 class ids.
        pan_ids (Tensor or None): (H, W) int64 panoptic segment ids.
        segments_info (list[dict] or None): panoptic segments ("id", contiguous "category_id",
            optional "iscrowd", "isthing").
        instance_masks (list[Tensor] or None): N masks (H, W) bool of non-crowd annotations.
        instance_classes (list[int] or None): N contiguous category ids.
        regions (Tensor or None): (H, W) int64 region ids.
        sources (dict[str, str]): label kind (and "image") -> file name, for error messages.
        rng (np.random.Generator or None): random generator of generators that draw (coarse
            masks). None: :meth:`random` seeds one from NumPy's global generator on first use
            (the generator the augmentations draw from, which detectron2 seeds from
            ``cfg.SEED`` in every data-loader worker, so runs with a fixed SEED repeat);
            generators that draw nothing leave the global stream untouched.
    """

    image_size: Tuple[int, int]
    valid_size: Optional[Tuple[int, int]] = None
    ignore_label: int = 255
    num_classes: Optional[int] = None
    sem_seg: Optional[torch.Tensor] = None
    pan_ids: Optional[torch.Tensor] = None
    segments_info: Optional[List[Dict]] = None
    instance_masks: Optional[List[torch.Tensor]] = None
    instance_classes: Optional[List[int]] = None
    regions: Optional[torch.Tensor] = None
    sources: Dict[str, str] = field(default_factory=dict)
    rng: Optional[np.random.Generator] = None

    def __post_init__(self):
        self.image_size = tuple(int(s) for s in self.image_size)
        if self.valid_size is None:
            self.valid_size = self.image_size
        self.valid_size = tuple(int(s) for s in self.valid_size)

    def has(self, kind: str) -> bool:
        """Whether labels of ``kind`` (one of :data:`LABEL_KINDS`) are present."""
        if kind == "sem_seg":
            return self.sem_seg is not None
        if kind == "panoptic":
            return self.pan_ids is not None and self.segments_info is not None
        if kind == "annotations":
            return self.instance_masks is not None
        if kind == "regions":
            return self.regions is not None
        raise KeyError(f"unknown label kind '{kind}'; expected one of {LABEL_KINDS}")

    def random(self) -> np.random.Generator:
        """The random generator of this image (created on first use, see ``rng``)."""
        if self.rng is None:
            self.rng = np.random.default_rng(np.random.randint(2**31 - 1))
        return self.rng

    def source(self, kind: str) -> str:
        """File name of the labels of ``kind`` (or of the image), for error messages."""
        return self.sources.get(kind, self.sources.get("image", "<unknown file>"))


class TargetGenerator:
    """Base class of target generators: ``generator(labels) -> {target name: value}``.

    Subclasses set ``requires`` (label kinds that must be present; the mapper reads them and
    raises when a record lacks them) and ``uses`` (kinds read when the record has them), and
    implement :meth:`__call__`. ``name`` (the registered name) and ``optional`` (skip records
    that lack a required kind) are set by :func:`seg_methods.data.build.build_target_generator`.
    """

    requires: Tuple[str, ...] = ()
    uses: Tuple[str, ...] = ()
    name: str = ""
    optional: bool = False

    @configurable
    def __init__(self):
        """Generators without parameters; a generator with parameters overrides ``__init__``
        (``@configurable``, typed keyword arguments) and :meth:`from_config`."""

    @classmethod
    def from_config(cls, cfg) -> Dict[str, Any]:
        return {}

    def __call__(self, labels: TargetLabels) -> Dict[str, Any]:
        raise NotImplementedError

    def missing(self, labels: TargetLabels) -> List[str]:
        """Required label kinds absent from ``labels``."""
        return [k for k in self.requires if not labels.has(k)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, optional={self.optional})"


def train_metadata(cfg):
    """Metadata of ``cfg.DATASETS.TRAIN[0]`` (None without training sets)."""
    return MetadataCatalog.get(cfg.DATASETS.TRAIN[0]) if len(cfg.DATASETS.TRAIN) else None


def thing_contiguous_ids(metadata) -> Optional[List[int]]:
    """Sorted contiguous ids of the thing classes (values of
    ``thing_dataset_id_to_contiguous_id``), or None when the metadata has no such map."""
    if metadata is None:
        return None
    mapping = metadata.get("thing_dataset_id_to_contiguous_id", None)
    return sorted(int(v) for v in mapping.values()) if mapping else None


def check_class_range(labels, num_classes: Optional[int], source: str) -> None:
    """Raise ``ValueError`` naming ``source`` if a label lies outside [0, num_classes)."""
    if num_classes is None:
        return
    bad = sorted({int(c) for c in labels if not 0 <= int(c) < num_classes})
    if bad:
        raise ValueError(
            f"{source}: labels {bad} are outside [0, {num_classes}) (the dataset metadata has "
            f"{num_classes} classes) and are not the ignore label."
        )


def segment_is_thing(segment: Dict, thing_ids: Optional[List[int]], source: str) -> bool:
    """``segment["isthing"]``, else whether its category is in ``thing_ids``.

    Raises:
        KeyError: neither is known (names the file and the metadata key).
    """
    if "isthing" in segment:
        return bool(segment["isthing"])
    if thing_ids is None:
        raise KeyError(
            f"panoptic segment {segment.get('id')} of '{source}' has no 'isthing' flag and the "
            "training set's metadata has no 'thing_dataset_id_to_contiguous_id' to tell things "
            "from stuff."
        )
    return int(segment["category_id"]) in thing_ids


__all__ = [
    "LABEL_KINDS",
    "TargetLabels",
    "TargetGenerator",
    "check_class_range",
    "segment_is_thing",
    "thing_contiguous_ids",
    "train_metadata",
]
