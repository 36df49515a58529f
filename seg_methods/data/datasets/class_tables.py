"""Class tables of the real datasets and the metadata derived from them.

The long class lists (ADE20K-150, Mapillary Vistas v1.2) are small CSV files in ``meta/``; COCO
and Cityscapes reuse detectron2's ``builtin_meta`` tables.
"""

import csv
import functools
import os
from typing import Dict, List, Sequence

from .panoptic_utils import make_class_hierarchy

_META_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "meta")

__all__ = ["read_class_table", "panoptic_metadata_from_categories", "hierarchy_from_keys"]


@functools.lru_cache(maxsize=None)
def _read(filename: str) -> tuple:
    with open(os.path.join(_META_DIR, filename), newline="") as f:
        rows = list(csv.DictReader(line for line in f if not line.startswith("#")))
    return tuple(rows)


def read_class_table(filename: str) -> List[Dict]:
    """Rows of ``meta/<filename>`` as dicts ``{id, isthing, color, name, ...}`` (ints converted).

    Args:
        filename (str): e.g. ``"ade20k_150.csv"``.

    Returns:
        list[dict]: one dict per class, in contiguous-id order.
    """
    out = []
    for row in _read(filename):
        row = dict(row)
        entry = {
            "id": int(row.pop("id")),
            "isthing": int(row.pop("isthing")),
            "color": [int(row.pop("r")), int(row.pop("g")), int(row.pop("b"))],
            "name": row.pop("name"),
        }
        entry.update(row)
        out.append(entry)
    return out


def panoptic_metadata_from_categories(categories: Sequence[Dict]) -> Dict:
    """Mask2Former-style panoptic metadata from COCO-style categories (in contiguous order).

    ``thing_classes`` lists the things; ``stuff_classes`` lists ALL classes (so one semantic label
    space serves the panoptic and the semantic evaluators); the thing map covers things only and
    the stuff map covers every class.

    Args:
        categories (Sequence[dict]): ``{"id" (dataset id), "name", "isthing", "color"}``; the
            position in the sequence is the contiguous id.

    Returns:
        dict: ``thing_classes, thing_colors, stuff_classes, stuff_colors,
        thing_dataset_id_to_contiguous_id, stuff_dataset_id_to_contiguous_id``.
    """
    return {
        "thing_classes": [c["name"] for c in categories if c["isthing"]],
        "thing_colors": [list(c["color"]) for c in categories if c["isthing"]],
        "stuff_classes": [c["name"] for c in categories],
        "stuff_colors": [list(c["color"]) for c in categories],
        "thing_dataset_id_to_contiguous_id": {
            c["id"]: i for i, c in enumerate(categories) if c["isthing"]
        },
        "stuff_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(categories)},
    }


def hierarchy_from_keys(keys: Sequence[str], names: Sequence[str] = None, sep: str = "--") -> Dict:
    """3-level hierarchy from hierarchical label keys such as ``construction--barrier--curb``.

    Level 1 is the key without its last token (``construction--barrier``), level 2 its first
    token (``construction``). Keys with two tokens have the same name on levels 1 and 2.

    Args:
        keys (Sequence[str]): one key per contiguous class.
        names (Sequence[str] or None): level-0 names (default: the keys).
        sep (str): token separator.

    Returns:
        dict: see :func:`make_class_hierarchy`.
    """
    mids, roots = [], []
    leaf_parent, mid_parent = [], []
    for key in keys:
        tokens = key.split(sep)
        mid = sep.join(tokens[:-1]) if len(tokens) > 1 else tokens[0]
        if mid not in mids:
            mids.append(mid)
            root = tokens[0]
            if root not in roots:
                roots.append(root)
            mid_parent.append(roots.index(root))
        leaf_parent.append(mids.index(mid))
    return make_class_hierarchy(
        [list(names if names is not None else keys), mids, roots], [leaf_parent, mid_parent]
    )
