"""One registration for every dataset in the COCO panoptic format (Mask2Former's conventions).

COCO, ADE20K and Mapillary Vistas register their panoptic splits with
:func:`register_panoptic_dataset`, so the loader and the metadata keys the evaluators and mappers
read (``image_root``, ``panoptic_root``, ``panoptic_json``, ``sem_seg_root``, ``json_file``,
``evaluator_type`` and the class metadata) are written in one place. (The synthetic dataset sets
the same keys in ``_synthetic.register_synthetic``; it can pass ``loader=`` and ``layout=None``.)
"""

import dataclasses
import functools
from typing import Callable, Dict, List, Mapping, Optional

from detectron2.data import DatasetCatalog, MetadataCatalog

from .layout import register_checked
from .panoptic_utils import load_panoptic_json

__all__ = ["PanopticFiles", "register_panoptic_dataset"]


@dataclasses.dataclass(frozen=True)
class PanopticFiles:
    """The files of one split of a COCO-format panoptic dataset (names = metadata keys).

    Attributes:
        image_root (str): folder of the images.
        panoptic_root (str): folder of the panoptic PNGs.
        panoptic_json (str): the COCO panoptic json.
        sem_seg_root (str): folder of the semantic PNGs (same names as the panoptic PNGs).
        json_file (str): COCO instance json of the things (read by the instance evaluator).
    """

    image_root: str
    panoptic_root: str
    panoptic_json: str
    sem_seg_root: str
    json_file: str


def register_panoptic_dataset(
    name: str,
    metadata: Mapping,
    files: PanopticFiles,
    *,
    evaluator_type: str,
    layout: Optional[str] = None,
    loader: Optional[Callable[[], List[Dict]]] = None,
    **extra_metadata,
) -> None:
    """Register a COCO-format panoptic dataset and set its metadata.

    The metadata is ``files`` (as its five keys), ``evaluator_type``, ``metadata`` and
    ``extra_metadata``.

    Args:
        name (str): dataset name.
        metadata (Mapping): class metadata (``thing_classes``, the two id maps, colours, ...), as
            made by ``panoptic_metadata_from_categories``; the loader maps category ids with it.
        files (PanopticFiles): where the split is.
        evaluator_type (str): metadata ``evaluator_type``.
        layout (str or None): drawing of the expected files; when given, loading first checks
            that the four inputs of the loader exist (see ``layout.register_checked``).
        loader (callable or None): returns the dataset dicts; default :func:`load_panoptic_json`
            on ``files``.
        **extra_metadata: further metadata (``ignore_label``, ``label_divisor``, ...). A key also
            present in ``metadata`` raises ``TypeError``.
    """
    if loader is None:
        loader = functools.partial(
            load_panoptic_json,
            files.panoptic_json,
            files.image_root,
            files.panoptic_root,
            files.sem_seg_root,
            metadata,
        )
    if layout is None:
        DatasetCatalog.register(name, loader)
    else:
        required = [files.image_root, files.panoptic_root, files.panoptic_json, files.sem_seg_root]
        register_checked(name, loader, required, layout)
    MetadataCatalog.get(name).set(
        **dataclasses.asdict(files),
        evaluator_type=evaluator_type,
        **metadata,
        **extra_metadata,
    )
