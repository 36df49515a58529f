"""Dataset-mapper and target-generator registries, and the data loaders used by
:class:`seg_methods.engine.Trainer`.

A dataset mapper turns one dataset dict (detectron2's standard format) into the model's input
dict. ``cfg.INPUT.DATASET_MAPPER_NAME`` names the mapper; every registered entry is a callable
``(cfg, is_train: bool) -> mapper`` (see ``seg_methods/data/dataset_mappers``).

A target generator turns the augmented, padded labels of one image into training targets (the
way Panoptic-DeepLab hands its target generator to its mapper). A mapper calls the generators its
registered entry names plus ``cfg.INPUT.EXTRA_TARGETS``; every registered entry is a callable
``(cfg) -> generator`` (see ``seg_methods/data/target_generators``).
"""

from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.utils.registry import Registry

DATASET_MAPPER_REGISTRY = Registry("DATASET_MAPPER")
DATASET_MAPPER_REGISTRY.__doc__ = """
Dataset mappers: dataset dict -> model input dict. Each entry is called as
``entry(cfg, is_train)`` and returns a callable mapper. The training output follows
Mask2Former's format: "image" (3, H, W) uint8, "height"/"width", "file_name", "image_id",
"sem_seg" (H, W) long when available and "instances" with ``gt_classes`` (N,) and
``gt_masks`` (N, H, W) bool.
"""

TARGET_GENERATOR_REGISTRY = Registry("TARGET_GENERATOR")
TARGET_GENERATOR_REGISTRY.__doc__ = """
Target generators: augmented labels of one image -> dict of training targets. Each entry is
called as ``entry(cfg)`` and returns a
:class:`~seg_methods.data.target_generators.TargetGenerator`; the mapper merges the dicts its
generators return into the model input.
"""


def build_dataset_mapper(cfg, is_train: bool = True):
    """Build the mapper named by ``cfg.INPUT.DATASET_MAPPER_NAME``.

    Args:
        cfg (CfgNode): the full config.
        is_train (bool): training mapper (augmentations and targets) or test mapper (test-time
            resize only).

    Returns:
        callable: dataset dict -> model input dict.
    """
    name = cfg.INPUT.DATASET_MAPPER_NAME
    if name not in DATASET_MAPPER_REGISTRY:
        known = sorted(k for k, _ in DATASET_MAPPER_REGISTRY)
        raise KeyError(f"Unknown INPUT.DATASET_MAPPER_NAME '{name}'. Registered mappers: {known}")
    return DATASET_MAPPER_REGISTRY.get(name)(cfg, is_train)


def build_target_generator(name: str, cfg):
    """Build the target generator registered as ``name``.

    A trailing ``"?"`` (e.g. ``"sem_seg?"``) makes the generator optional: the mapper skips it
    for records that lack the labels it requires instead of raising.

    Args:
        name (str): registered name, optionally followed by "?".
        cfg (CfgNode): the full config (generators read the training set's metadata from it).

    Returns:
        TargetGenerator: the generator, with ``optional`` and ``name`` set.
    """
    optional = name.endswith("?")
    key = name[:-1] if optional else name
    if key not in TARGET_GENERATOR_REGISTRY:
        known = sorted(k for k, _ in TARGET_GENERATOR_REGISTRY)
        raise KeyError(
            f"Unknown target generator '{key}' (asked for by the dataset mapper "
            f"'{cfg.INPUT.DATASET_MAPPER_NAME}' or INPUT.EXTRA_TARGETS). Registered: {known}"
        )
    generator = TARGET_GENERATOR_REGISTRY.get(key)(cfg)
    generator.name = key
    generator.optional = optional
    return generator


def build_train_loader(cfg):
    """Training loader over ``cfg.DATASETS.TRAIN`` with the configured mapper.

    Uses detectron2's ``build_detection_train_loader`` (``cfg.DATALOADER.NUM_WORKERS`` workers,
    ``cfg.SOLVER.IMS_PER_BATCH`` images per batch).
    """
    return build_detection_train_loader(cfg, mapper=build_dataset_mapper(cfg, is_train=True))


def build_test_loader(cfg, dataset_name: str):
    """Inference loader over one dataset, batch size 1, with the test-time mapper."""
    return build_detection_test_loader(
        cfg, dataset_name, mapper=build_dataset_mapper(cfg, is_train=False)
    )


__all__ = [
    "DATASET_MAPPER_REGISTRY",
    "TARGET_GENERATOR_REGISTRY",
    "build_dataset_mapper",
    "build_target_generator",
    "build_train_loader",
    "build_test_loader",
]
