"""Register every dataset under ``$DETECTRON2_DATASETS`` (default ``./datasets``) at import.

Nothing is read or written here: real datasets are checked when loaded, and the synthetic one is
generated on the first ``DatasetCatalog.get``.
"""

import os

from ._synthetic import register_synthetic
from .layout import datasets_root
from .register_ade20k import register_all_ade20k
from .register_cityscapes import register_all_cityscapes
from .register_coco import register_all_coco
from .register_mapillary_vistas import register_all_mapillary_vistas
from .superpixel import register_all_bsds500, register_synthetic_superpixel


def register_all(root: str) -> None:
    """Register the real datasets and the default synthetic dataset under ``root``."""
    register_all_coco(root)
    register_all_ade20k(root)
    register_all_cityscapes(root)
    register_all_mapillary_vistas(root)
    # absolute: the data is generated lazily, possibly after the working directory changed
    register_all_bsds500(root)
    names = register_synthetic("synthetic", root=os.path.join(os.path.abspath(root), "synthetic"))
    register_synthetic_superpixel(names)  # synthetic_superpixel_{train,val}


_ROOT = datasets_root()
register_all(_ROOT)
