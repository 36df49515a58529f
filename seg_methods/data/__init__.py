"""Data: dataset registration (embedded synthetic + real datasets), target generators and
dataset mappers."""

from . import datasets  # noqa: F401  registers datasets in DatasetCatalog/MetadataCatalog
from . import target_generators  # noqa: F401  registers generators in TARGET_GENERATOR_REGISTRY
from . import dataset_mappers  # noqa: F401  registers mappers in DATASET_MAPPER_REGISTRY
