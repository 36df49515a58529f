"""Dataset registration: the embedded synthetic dataset and the real datasets of the papers.

Importing this package (``import seg_methods`` does) registers, lazily:

* ``synthetic_{panoptic,sem_seg,instance}_{train,val}`` (generated on first use, see ``synthetic``);
* ``coco_2017_{train,val}_panoptic_with_sem_seg`` (plus detectron2's ``coco_2017_*``);
* ``ade20k_panoptic_{train,val}`` (plus detectron2's ``ade20k_sem_seg_*``);
* detectron2's ``cityscapes_fine_{instance_seg,sem_seg,panoptic}_*`` (layout checks, hierarchy);
* ``mapillary_vistas_{sem_seg,panoptic}_{train,val}``;
* ``mapillary_vistas_v2_sem_seg_{train,val}`` (classes read from the dataset's config_v2.0.json);
* ``pascal_person_part_sem_seg_{train,val}``.

Layouts and preparation scripts: ``datasets/README.md``.
"""

from . import builtin  # noqa: F401  registers everything
from ._synthetic import SyntheticConfig, generate_synthetic_dataset, register_synthetic
from .layout import DatasetLayoutError, datasets_root

__all__ = [
    "DatasetLayoutError",
    "datasets_root",
    "SyntheticConfig",
    "generate_synthetic_dataset",
    "register_synthetic",
]
