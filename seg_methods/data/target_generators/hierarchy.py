"""Class-hierarchy labels (HSSN-style hierarchical semantic segmentation).

Registered as ``class_hierarchy``: requires the ``sem_seg`` label kind and writes
``"hierarchy_labels"`` (L, H, W) int64, the node id of every pixel at each level of the class
tree. Level 0 is the training classes (the semantic map itself); level l + 1 holds the parent of
the level-l node. Void and padding pixels (``ignore_label``) stay ``ignore_label`` at every level.

The tree is the training set's metadata ``class_hierarchy`` (see
``seg_methods.data.datasets.panoptic_utils.make_class_hierarchy`` and datasets/README.md)::

    {"names":   [[level-0 class names], [level-1 node names], ..., [level-(L-1) node names]],
     "parents": [[parent (level-1 index) of each level-0 class], ...,
                 [parent (level-(L-1) index) of each level-(L-2) node]]}

``parents[l][i]`` is the index, within level ``l + 1``, of the parent of node ``i`` of level
``l``; there are ``L - 1`` parent lists. Example (synthetic dataset, L = 3): class "ellipse" (0)
-> super-class "curved" -> root "thing".

Shape shorthand:
    L: number of levels; C: number of level-0 classes; H, W: padded image size.
"""

from typing import Dict, Mapping, Sequence

import torch
from detectron2.config import configurable

from ..build import TARGET_GENERATOR_REGISTRY
from .base import TargetGenerator, TargetLabels, check_class_range, train_metadata


def hierarchy_lookup(parents: Sequence[Sequence[int]], num_classes: int) -> torch.Tensor:
    """Ancestor table of every level-0 class.

    Args:
        parents (Sequence[Sequence[int]]): ``class_hierarchy["parents"]`` (L - 1 lists).
        num_classes (int): C, the number of level-0 classes.

    Returns:
        Tensor: (L, C) int64; entry [l, c] is the level-l ancestor of class c (row 0 = arange).
    """
    rows = [torch.arange(num_classes, dtype=torch.int64)]
    for level, par in enumerate(parents):
        par_t = torch.as_tensor(list(par), dtype=torch.int64)
        used = int(rows[-1].max()) if num_classes else -1
        if par_t.numel() <= used:
            raise ValueError(
                f"class_hierarchy: level {level} has {par_t.numel()} parent entries but its "
                f"node {used} is used."
            )
        rows.append(par_t[rows[-1]])
    return torch.stack(rows)


def class_hierarchy_labels(
    sem_seg: torch.Tensor,
    parents: Sequence[Sequence[int]],
    num_classes: int,
    *,
    ignore_label: int,
    source: str = "",
) -> torch.Tensor:
    """Node ids of every pixel at every level of the class tree.

    Args:
        sem_seg (Tensor): (H, W) int64 level-0 class ids, ``ignore_label`` on void/padding.
        parents (Sequence[Sequence[int]]): ``class_hierarchy["parents"]``.
        num_classes (int): C, the number of level-0 classes (``len(names[0])``).
        ignore_label (int): void label, kept at every level.
        source (str): file name for error messages.

    Returns:
        Tensor: (L, H, W) int64.
    """
    void = sem_seg == ignore_label  # (H, W)
    present = [int(c) for c in torch.unique(sem_seg[~void]).tolist()]
    check_class_range(present, num_classes, f"semantic label map '{source}' (class_hierarchy)")
    lut = hierarchy_lookup(parents, num_classes)  # (L, C)
    idx = torch.where(void, torch.zeros_like(sem_seg), sem_seg).to(torch.int64)
    out = lut[:, idx]  # (L, H, W)
    return out.masked_fill(void.unsqueeze(0), ignore_label)


class ClassHierarchyTargets(TargetGenerator):
    """``{"hierarchy_labels": (L, H, W) int64}`` (see the module docstring)."""

    requires = ("sem_seg",)

    @configurable
    def __init__(self, *, class_hierarchy: Mapping):
        """
        Args:
            class_hierarchy (Mapping): ``{"names": [...], "parents": [...]}`` as documented in
                the module docstring.
        """
        names, parents = class_hierarchy["names"], class_hierarchy["parents"]
        if len(parents) != len(names) - 1:
            raise ValueError(
                f"class_hierarchy has {len(names)} levels of names but {len(parents)} parent "
                "lists; it needs one parent list per level except the coarsest."
            )
        for level, par in enumerate(parents):
            if len(par) != len(names[level]):
                raise ValueError(
                    f"class_hierarchy level {level}: {len(par)} parents for "
                    f"{len(names[level])} nodes"
                )
            if any(not 0 <= int(p) < len(names[level + 1]) for p in par):
                raise ValueError(f"class_hierarchy level {level}: parent index out of range")
        self.parents = [list(p) for p in parents]
        self.num_classes = len(names[0])
        self.num_levels = len(names)

    @classmethod
    def from_config(cls, cfg):
        meta = train_metadata(cfg)
        hierarchy = meta.get("class_hierarchy", None) if meta is not None else None
        if hierarchy is None:
            name = cfg.DATASETS.TRAIN[0] if len(cfg.DATASETS.TRAIN) else "<no DATASETS.TRAIN>"
            raise KeyError(
                f"the 'class_hierarchy' target generator needs metadata 'class_hierarchy' on the "
                f"training set '{name}' (see datasets/README.md); set it when registering the "
                "dataset or remove 'class_hierarchy' from INPUT.EXTRA_TARGETS."
            )
        return {"class_hierarchy": hierarchy}

    def __call__(self, labels: TargetLabels) -> Dict:
        return {
            "hierarchy_labels": class_hierarchy_labels(
                labels.sem_seg,
                self.parents,
                self.num_classes,
                ignore_label=labels.ignore_label,
                source=labels.source("sem_seg"),
            )
        }


@TARGET_GENERATOR_REGISTRY.register()
def class_hierarchy(cfg) -> ClassHierarchyTargets:
    """Node ids per level of the metadata's class tree (HSSN)."""
    return ClassHierarchyTargets(cfg)


__all__ = ["ClassHierarchyTargets", "class_hierarchy_labels", "hierarchy_lookup"]
