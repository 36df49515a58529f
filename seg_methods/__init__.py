"""seg_methods: recent image-segmentation papers as Detectron2 meta-architectures.

Importing the package registers every component (datasets, mappers, backbones, meta-archs) in
detectron2's and seg_methods' registries.
"""
import warnings

# detectron2 scripts a few helpers at import time; torch >= 2.10 warns about torch.jit.script.
warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=FutureWarning)

from . import config  # noqa: F401,E402
from . import data  # noqa: F401,E402  registers datasets and dataset mappers
from . import modeling  # noqa: F401,E402  registers backbones, heads, meta-architectures

__version__ = "0.1.0"
