"""Dataset facts a model needs when it is built (from detectron2's ``MetadataCatalog``).

Heads (e.g. ClustSeg's decoder, which builds one query per stuff class) and the inference
post-processing both need the thing classes of the training data; they read them here, so that a
decoder never imports post-processing.
"""

from typing import Set

from detectron2.data import MetadataCatalog

__all__ = ["thing_ids_from_metadata", "train_thing_ids"]


def thing_ids_from_metadata(metadata) -> Set[int]:
    """Contiguous ids of the thing classes (``thing_dataset_id_to_contiguous_id.values()``).

    Args:
        metadata: a detectron2 ``Metadata``.

    Returns:
        set[int]: empty when the metadata has no thing mapping.
    """
    mapping = getattr(metadata, "thing_dataset_id_to_contiguous_id", None)
    return set(int(v) for v in mapping.values()) if mapping else set()


def train_thing_ids(cfg) -> Set[int]:
    """Thing classes of the first training dataset (``cfg.DATASETS.TRAIN[0]``), as Mask2Former.

    Args:
        cfg (CfgNode): a config.

    Returns:
        set[int]: contiguous thing ids; empty without a training dataset or thing mapping.
    """
    if not len(cfg.DATASETS.TRAIN):
        return set()
    return thing_ids_from_metadata(MetadataCatalog.get(cfg.DATASETS.TRAIN[0]))
