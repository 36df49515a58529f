"""Class tables of the real datasets and the metadata derived from them.

The long class lists (ADE20K-150, Mapillary Vistas v1.2) are small CSV files in ``meta/``; COCO
and Cityscapes reuse detectron2's ``builtin_meta`` tables.
"""

import csv
import functools
import os
from typing import Dict, List, Mapping, Sequence

from .panoptic_utils import make_class_hierarchy

_META_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "meta")

__all__ = [
    "read_class_table",
    "panoptic_metadata_from_categories",
    "hierarchy_from_keys",
    "hierarchy_from_parent_map",
]


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


def hierarchy_from_keys(
    keys: Sequence[str], names: Sequence[str] = None, sep: str = "--", mid_tokens: int = None
) -> Dict:
    """3-level hierarchy from hierarchical label keys such as ``construction--barrier--curb``.

    Level 1 is the key without its last token (``construction--barrier``), level 2 its first
    token (``construction``). Keys with two tokens have the same name on levels 1 and 2.

    Args:
        keys (Sequence[str]): one key per contiguous class.
        names (Sequence[str] or None): level-0 names (default: the keys).
        sep (str): token separator.
        mid_tokens (int or None): level 1 = the first ``mid_tokens`` tokens instead (at most
            all but the last; Vistas v2.0 has 4-token keys such as
            ``marking--discrete--arrow--left``, whose level-1 node is then
            ``marking--discrete`` with ``mid_tokens=2``). Same result for keys of <= 3 tokens.

    Returns:
        dict: see :func:`make_class_hierarchy`.
    """
    mids, roots = [], []
    leaf_parent, mid_parent = [], []
    for key in keys:
        tokens = key.split(sep)
        keep = len(tokens) - 1 if mid_tokens is None else min(mid_tokens, len(tokens) - 1)
        mid = sep.join(tokens[:keep]) if len(tokens) > 1 else tokens[0]
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


# ----------------------------------------------------------------------------- class trees
def hierarchy_from_parent_map(classes: Sequence[str], parent_of: Mapping[str, str]) -> Dict:
    """Level-format ``class_hierarchy`` from a tree given as a child -> parent map of names.

    The form a user writes a tree in (``{"classes": [...], "parent_of": {...}}`` is accepted as
    metadata ``class_hierarchy`` by HSSN's ``ClassTree``, which converts it with this). Every
    node name appears once; the tree has exactly one root (a node without parent: absent from
    ``parent_of`` as a key, or mapped to None), which is dropped (the implicit root above the
    top level); every class is a leaf, and every leaf is a class; all classes are at the same
    depth (HSSN's levels; add single-child nodes to even a branch out).

    Args:
        classes (Sequence[str]): the leaf names in class-id order (level 0).
        parent_of (Mapping[str, str]): node name -> parent name (None for the root).

    Returns:
        dict: ``{"names": [...], "parents": [...]}`` (see :func:`make_class_hierarchy`); level
        ``l + 1`` lists the parents of level ``l`` in order of first appearance.

    Raises:
        ValueError: a cycle, a class missing from the map, no root or several roots, a class with
            children, a leaf that is not a class, duplicate classes or classes at different
            depths; the message names the nodes.
    """
    classes = list(classes)
    if len(set(classes)) != len(classes):
        raise ValueError(
            f"class tree: duplicate classes {sorted({c for c in classes if classes.count(c) > 1})}"
        )
    missing = [c for c in classes if c not in parent_of]
    if missing:
        raise ValueError(f"class tree: classes {missing} are missing from parent_of (no parent)")
    nodes = set(parent_of) | {p for p in parent_of.values() if p is not None}
    for start in sorted(parent_of):  # walk up from every node: a revisited node is a cycle
        path, node = [start], parent_of.get(start)
        while node is not None:
            if node in path:
                cycle = path[path.index(node) :] + [node]
                raise ValueError(f"class tree: cycle {' -> '.join(cycle)}")
            path.append(node)
            node = parent_of.get(node)
    roots = sorted(n for n in nodes if parent_of.get(n) is None)
    if len(roots) != 1:
        raise ValueError(
            f"class tree: {len(roots)} roots {roots}; a class tree has exactly one root"
        )
    parents_used = {p for p in parent_of.values() if p is not None}
    inner = [c for c in classes if c in parents_used]
    if inner:
        raise ValueError(f"class tree: classes {inner} have children; classes must be leaves")
    stray = sorted(nodes - parents_used - set(classes))
    if stray:
        raise ValueError(f"class tree: leaves {stray} are not classes")

    def depth(n):
        d = 0
        while parent_of.get(n) is not None:
            n, d = parent_of[n], d + 1
        return d

    depths = {c: depth(c) for c in classes}
    if len(set(depths.values())) != 1:
        raise ValueError(
            f"class tree: classes at different depths {depths}; HSSN's levels need one depth"
        )
    names, parents = [classes], []
    for _ in range(depths[classes[0]] - 1):
        upper = list(dict.fromkeys(parent_of[n] for n in names[-1]))
        parents.append([upper.index(parent_of[n]) for n in names[-1]])
        names.append(upper)
    return make_class_hierarchy(names, parents)
