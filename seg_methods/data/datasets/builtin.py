"""Register every dataset under ``$DETECTRON2_DATASETS`` (default ``./datasets``) at import.

Nothing is read or written here: real datasets are checked when loaded, and the synthetic one is
generated on the first ``DatasetCatalog.get``.
"""

import os

from ._synthetic import register_synthetic
from .layout import datasets_root
from .register_ade20k import register_all_ade20k
from .register_big import register_all_big
from .register_cityscapes import register_all_cityscapes
from .register_coco import register_all_coco
from .register_mapillary_vistas import (
    register_all_mapillary_vistas,
    register_all_mapillary_vistas_v2,
)
from .register_pascal_person_part import register_all_pascal_person_part
from .superpixel import register_all_bsds500, register_synthetic_superpixel
from .synthetic_highres import register_synthetic_highres


def register_all(root: str) -> None:
    """Register the real datasets and the default synthetic dataset under ``root``."""
    register_all_coco(root)
    register_all_ade20k(root)
    register_all_cityscapes(root)
    register_all_mapillary_vistas(root)
    register_all_mapillary_vistas_v2(root)  # classes from its config_v2.0.json when present
    register_all_pascal_person_part(root)
    # absolute: the data is generated lazily, possibly after the working directory changed
    register_all_bsds500(root)
    names = register_synthetic("synthetic", root=os.path.join(os.path.abspath(root), "synthetic"))
    register_synthetic_superpixel(names)  # synthetic_superpixel_{train,val}
    # mask refinement (CRM): BIG and the high-resolution synthetic split, generated on first use
    register_all_big(root)
    register_synthetic_highres(
        "synthetic_highres", root=os.path.join(os.path.abspath(root), "synthetic_highres")
    )


_ROOT = datasets_root()
register_all(_ROOT)
