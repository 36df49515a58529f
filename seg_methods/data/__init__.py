"""Data: dataset registration (embedded synthetic + real datasets) and dataset mappers."""
from . import datasets  # noqa: F401  registers datasets in DatasetCatalog/MetadataCatalog
from . import dataset_mappers  # noqa: F401  registers mappers in DATASET_MAPPER_REGISTRY
